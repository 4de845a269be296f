"""LogicChains (E1): the worked example, a unique answer, closed chains of one shape, no shortcut, knobs, splits."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, LogicChains
from hydra_kit.data.task import best_no_skill

EXAMPLE_IDS = [4, 9, 7, 5, 9, 4, 7, 9, 3, 2, 9, 8, 3, 9, 5, 2, 10, 7, 6, 9, 1, 7, 10, 5, 8, 9, 6, 1, 9, 2, 11, 3, 12, 12]
EXAMPLE_TARGETS = [IGNORE_INDEX] * 33 + [4]


def facts_of(task: LogicChains, ids: np.ndarray) -> np.ndarray:
    """(F, 3): the facts before the first query."""
    query_at = int(np.flatnonzero(ids == task.query)[0])
    body = ids[:query_at]
    return body[body != task.pad].reshape(-1, 3)


def near_chance(task: LogicChains) -> float:
    """The bar a no-skill heuristic must stay under: max(2 * chance, chance + 0.05).

    Over 500 answers the standard error of an accuracy near chance (1/32) is about 0.008, so chance + 0.05 is
    six standard errors above it; the shortcuts of issue 17 scored 0.17-0.66.
    """
    return max(2 * task.chance, task.chance + 0.05)


def test_worked_example_matches_docstring():
    task = LogicChains(num_nodes=8, min_hops=2, max_hops=2, num_distractors=2)
    example = task.sample(0, "train", 0)
    assert example.input_ids.tolist() == EXAMPLE_IDS
    assert example.targets.tolist() == EXAMPLE_TARGETS
    assert example.meta["hops"] == 2
    import hydra_kit.data.logic_chains as module

    assert str(EXAMPLE_IDS) in module.__doc__ and str(EXAMPLE_TARGETS) in module.__doc__


def test_answer_is_unique_reachable_and_not_given_away():
    task = LogicChains(num_nodes=24, min_hops=1, max_hops=6, num_distractors=10)
    for i in range(200):
        ex = task.sample(5, "train" if i % 2 else "val", i)
        assert ex.input_ids.shape == ex.targets.shape == (task.seq_len,)
        assert ex.input_ids.max() < task.vocab_size and ex.input_ids.min() >= 0
        answer_pos = np.flatnonzero(ex.targets != IGNORE_INDEX)
        assert answer_pos.tolist() == [task.seq_len - 1]
        answer = int(ex.targets[-1])
        facts = facts_of(task, ex.input_ids)
        chain_sources = facts[facts[:, 1] == task.rel, 0]
        assert len(set(chain_sources.tolist())) == len(chain_sources)  # -> is functional: one path from any node
        assert task.follow(ex.input_ids) == answer  # the facts determine the answer
        query = ex.input_ids[np.flatnonzero(ex.input_ids == task.query)[-1] :]
        assert answer not in query  # the query names only the start node
        assert (query == task.hop).sum() == ex.meta["hops"]


def test_closed_chains_of_one_shape_and_a_fixed_number_of_facts():
    task = LogicChains(num_nodes=24, max_hops=4, num_distractors=6, num_chains=3)
    assert task.chain_len == 8
    out_of_start = out_of_answer = 0
    for i in range(100):
        ex = task.sample(1, "train", i)
        facts = facts_of(task, ex.input_ids)
        assert len(facts) == 3 * 8 + 6  # every example, whatever its hop count: padding tells nothing
        arrows, branches = facts[facts[:, 1] == task.rel], facts[facts[:, 1] == task.nrel]
        assert len(branches) == 6 and len({(a, b) for a, _, b in branches}) == 6
        step = {int(a): int(b) for a, _, b in arrows}
        assert sorted(step) == sorted(step.values()) == list(range(1, 25))  # a permutation: no chain end, no sink
        cycles, todo = [], set(step)
        while todo:  # walk every closed chain once
            node, length = todo.pop(), 1
            nxt = step[node]
            while nxt != node:
                todo.discard(nxt)
                nxt, length = step[nxt], length + 1
            cycles.append(length)
        assert cycles == [8, 8, 8]
        start = int(ex.input_ids[np.flatnonzero(ex.input_ids == task.query)[-1] + 1])
        out_of_start += start in branches[:, 0]
        out_of_answer += int(ex.targets[-1]) in branches[:, 0]
        for a, _, b in branches:
            assert step[int(a)] != b  # a branch never restates a -> edge
    assert out_of_start > 5 and out_of_answer > 5  # branches leave any node, the start and the answer included


@pytest.mark.slow
def test_every_shortcut_stays_near_chance():
    # The E1 training instance: 32 nodes, 8 branches, hops 1..4, the length of the 8-hop test instance.
    task = LogicChains(num_nodes=32, max_hops=4, num_distractors=8, seq_len=LogicChains(num_nodes=32, max_hops=8).seq_len)
    examples = [task.sample(1_000_000_007, "val", i) for i in range(600)]
    baselines = task.no_skill_baselines(examples)
    assert baselines["chance"] == pytest.approx(1 / 32)
    assert set(baselines) == {"chance", "most frequent node", "chain end", "a node with no outgoing edge", "last node mentioned", "one hop", "length tell"}
    for name, accuracy in baselines.items():
        if name != "one hop":
            assert accuracy <= near_chance(task), f"{name}: {accuracy:.3f}"
    # "one hop" is the rule at L = 1 and must be useless beyond: it shows whether accuracy at L >= 2 is composition.
    multi = [e for e in examples if e.meta["hops"] >= 2]
    assert len(multi) >= 400
    assert task.no_skill_baselines(multi)["one hop"] <= near_chance(task)
    assert task.no_skill_baselines([e for e in examples if e.meta["hops"] == 1])["one hop"] == 1.0
    name, accuracy = best_no_skill({k: v for k, v in task.no_skill_baselines(multi).items()})
    assert accuracy <= near_chance(task), name


@pytest.mark.slow
def test_heuristics_find_the_shortcuts_they_name():
    # An open chain 1 -> 2 -> 3 (3 has no outgoing edge), a branch 5 ~> 2 and a stray fact 4 -> 2, asked 1 HOP HOP.
    task = LogicChains(num_nodes=8, max_hops=2)
    r, n, q, h = task.rel, task.nrel, task.query, task.hop
    ids = np.array([0, 0, 1, r, 2, 5, n, 2, 2, r, 3, 4, r, 2, q, 1, h, h])
    t = len(ids) - 1
    guesses = {name: f(ids, t) for name, f in task.heuristics().items()}
    assert guesses["most frequent node"] == 2  # mentioned four times
    assert guesses["chain end"] == 3
    assert guesses["a node with no outgoing edge"] == 3  # 5 has none either, but no -> edge leads to it
    assert guesses["one hop"] == 2
    assert guesses["last node mentioned"] == 2


def test_hop_knob_and_seq_len():
    task = LogicChains(min_hops=3, max_hops=5)
    hops = {task.sample(0, "train", i).meta["hops"] for i in range(200)}
    assert hops == {3, 4, 5}
    assert task.seq_len == task.min_seq_len == 3 * (32 + 8) + 2 + 5
    assert LogicChains(max_hops=4, seq_len=200).sample(0, "train", 0).input_ids.shape == (200,)


def test_deterministic_per_seed():
    task = LogicChains()
    a, b = task.sample(9, "train", 3), task.sample(9, "train", 3)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.input_ids, task.sample(10, "train", 3).input_ids)


@pytest.mark.slow
def test_train_val_and_length_generalisation_sets_are_disjoint():
    seq_len = LogicChains(num_nodes=24, max_hops=6, num_distractors=2).min_seq_len
    train_task = LogicChains(num_nodes=24, max_hops=3, num_distractors=2, seq_len=seq_len)
    test_task = LogicChains(num_nodes=24, max_hops=6, num_distractors=2, seq_len=seq_len)
    assert train_task.vocab_size == test_task.vocab_size and train_task.chain_len == test_task.chain_len == 12
    train = {tuple(train_task.sample(0, "train", i).input_ids) for i in range(1000)}
    val = {tuple(train_task.sample(0, "val", i).input_ids) for i in range(200)}
    test = [test_task.sample(0, "val", i) for i in range(300)]
    assert not train & val
    assert not train & {tuple(e.input_ids) for e in test}
    assert {e.meta["hops"] for e in test} == set(range(1, 7))
    # a tiny space, where train/val collisions would be certain without the hash split
    tiny = LogicChains(num_nodes=4, min_hops=1, max_hops=1, num_distractors=0)
    small_train = {tuple(tiny.sample(0, "train", i).input_ids) for i in range(300)}
    small_val = {tuple(tiny.sample(0, "val", i).input_ids) for i in range(50)}
    assert len(small_train) > 5 and small_val and not small_train & small_val


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_hops": 0}, "min_hops"),
        ({"min_hops": 5, "max_hops": 4}, "max_hops"),
        ({"num_nodes": 12, "max_hops": 4}, "chain_len"),
        ({"num_chains": 1}, "num_chains"),
        ({"chain_len": 20}, "chain_len"),
        ({"num_distractors": -1}, "num_distractors"),
        ({"max_hops": 8, "seq_len": 20}, "seq_len"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogicChains(**kwargs)


def test_supervise_every_hop_targets_each_prefix_and_keeps_the_inputs():
    plain = LogicChains(num_nodes=16, max_hops=4, num_distractors=4)
    dense = LogicChains(num_nodes=16, max_hops=4, num_distractors=4, supervise_every_hop=True)
    hops_seen = set()
    for i in range(60):
        a, b = plain.sample(2, "train", i), dense.sample(2, "train", i)
        assert np.array_equal(a.input_ids, b.input_ids) and a.meta == b.meta
        hops = a.meta["hops"]
        answered = np.flatnonzero(b.targets != IGNORE_INDEX)
        assert answered.tolist() == list(range(dense.seq_len - hops, dense.seq_len))
        for t in answered:  # the i-th HOP's target: the node i hops from the start, found from the input so far
            assert b.targets[t] == dense.follow(b.input_ids[: t + 1]) and b.targets[t] not in b.input_ids[dense.seq_len - hops - 2 :]
        assert b.targets[-1] == a.targets[-1]
        hops_seen.add(hops)
    assert hops_seen == {1, 2, 3, 4}


def test_curriculum_hook_shortens_the_task_and_restores_it_exactly():
    task = LogicChains(num_nodes=32, min_hops=1, max_hops=4, num_distractors=8, seq_len=130, supervise_every_hop=True)
    easy = task.with_params({"max_hops": 1, "num_chains": 2, "chain_len": 2, "num_distractors": 0, "seq_len": None})
    assert easy.vocab_size == task.vocab_size and easy.seq_len == 3 * 4 + 2 + 1
    for i in range(20):  # one hop over two 2-node chains, answered by the one -> edge out of the start
        example = easy.sample(0, "train", i)
        assert example.meta["hops"] == 1 and easy.follow(example.input_ids) == example.targets[-1]
    back = easy.with_params(task.params())
    assert back.params() == task.params() and back.seq_len == 130 and back.chain_len == 16
    assert np.array_equal(back.sample(3, "train", 7).targets, task.sample(3, "train", 7).targets)
    with pytest.raises(ValueError, match=r"cannot change 'num_nodes'.*adjustable: min_hops"):
        task.with_params({"num_nodes": 8})
    with pytest.raises(ValueError, match="chain_len"):
        task.with_params({"chain_len": 4})  # shorter than 2 * max_hops


def test_several_queries_share_the_facts_and_the_first_is_the_single_query():
    single = LogicChains(num_nodes=16, max_hops=3, num_distractors=4, supervise_every_hop=True)
    multi = LogicChains(num_nodes=16, max_hops=3, num_distractors=4, supervise_every_hop=True, num_queries=5)
    assert multi.seq_len == 3 * (16 + 4) + 5 * (2 + 3)
    for i in range(40):
        one, many = single.generate(np.random.default_rng(i)), multi.generate(np.random.default_rng(i))
        body = one.input_ids[one.input_ids != single.pad]
        # the same facts, then the single query first; a one-query example does not depend on num_queries
        assert np.array_equal(many.input_ids[many.input_ids != multi.pad][: len(body)], body)
        first_answers = one.targets[one.targets != IGNORE_INDEX]
        answers = many.targets[many.targets != IGNORE_INDEX]
        assert np.array_equal(answers[: len(first_answers)], first_answers)
        queries = np.flatnonzero(many.input_ids == multi.query)
        assert len(queries) == 5
        starts = many.input_ids[queries + 1]
        assert len(set(starts.tolist())) == 5  # distinct start nodes
        answered = np.flatnonzero(many.targets != IGNORE_INDEX)
        assert (many.input_ids[answered] == multi.hop).all() and len(answered) == (many.input_ids == multi.hop).sum()
        for t in answered:  # every HOP of every query: the node reached from that query's start so far
            assert many.targets[t] == multi.follow(many.input_ids[: t + 1])
    last_only = LogicChains(num_nodes=16, max_hops=3, num_distractors=4, num_queries=5).generate(np.random.default_rng(0))
    assert (last_only.targets != IGNORE_INDEX).sum() == 5  # one answer per query, at its last HOP
    with pytest.raises(ValueError, match=r"num_queries must lie in 1..num_chains \* chain_len = 16"):
        LogicChains(num_nodes=16, max_hops=3, num_queries=17)


def test_the_split_hashes_the_facts_so_held_out_prompts_are_never_trained_on():
    # 72 possible fact lists: with a hash of the whole input, most would be trained on under some queries
    single = LogicChains(num_nodes=4, min_hops=1, max_hops=1, num_distractors=0)
    multi = single.with_params({"num_queries": 4})
    trained = {facts_of(multi, multi.sample(0, "train", i).input_ids).tobytes() for i in range(2000)}
    held_out = {facts_of(single, single.sample(0, "val", i).input_ids).tobytes() for i in range(200)}
    assert len(trained) > 40 and held_out and not trained & held_out
