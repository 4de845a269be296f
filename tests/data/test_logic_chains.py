"""LogicChains (E1): the worked example, a unique answer, no leakage, distractors, knobs, split disjointness."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, LogicChains

EXAMPLE_IDS = [3, 9, 5, 4, 9, 7, 6, 9, 5, 3, 10, 7, 5, 9, 4, 11, 3, 12, 12]
EXAMPLE_TARGETS = [IGNORE_INDEX] * 18 + [4]


def facts_of(task: LogicChains, ids: np.ndarray) -> np.ndarray:
    query_at = int(np.flatnonzero(ids == task.query)[-1])
    body = ids[:query_at]
    return body[body != task.pad].reshape(-1, 3)


def test_worked_example_matches_docstring():
    task = LogicChains(num_nodes=8, min_hops=2, max_hops=2, num_distractors=2, max_extra=1)
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


def test_distractors_present_and_branch_out_of_chain_nodes():
    task = LogicChains(num_nodes=24, max_hops=4, num_distractors=6)
    branch_out_of_chain = 0
    for i in range(100):
        ex = task.sample(1, "train", i)
        facts = facts_of(task, ex.input_ids)
        assert len(facts) == ex.meta["hops"] + ex.meta["extra"] + 6
        branches = facts[facts[:, 1] == task.nrel]
        assert len(branches) == 3
        # walk the chain from the start and check the branches leave chain nodes
        step = {int(a): int(b) for a, r, b in facts if r == task.rel}
        node, chain = int(ex.input_ids[np.flatnonzero(ex.input_ids == task.query)[-1] + 1]), []
        while node in step and node not in chain:
            chain.append(node)
            node = step[node]
        chain.append(node)
        branch_out_of_chain += sum(int(a) in chain for a in branches[:, 0])
        assert len(facts[facts[:, 1] == task.rel]) > ex.meta["hops"]  # off-chain edges of the same relation
    assert branch_out_of_chain == 100 * 3


def test_the_end_of_the_chain_is_not_always_the_answer():
    task = LogicChains(num_nodes=24, max_hops=4, num_distractors=4, max_extra=2)
    extras = [task.sample(2, "train", i).meta["extra"] for i in range(200)]
    assert set(extras) == {0, 1, 2}


def test_hop_knob_and_seq_len():
    task = LogicChains(min_hops=3, max_hops=5)
    hops = {task.sample(0, "train", i).meta["hops"] for i in range(200)}
    assert hops == {3, 4, 5}
    assert task.seq_len == task.min_seq_len
    assert LogicChains(max_hops=4, seq_len=100).sample(0, "train", 0).input_ids.shape == (100,)


def test_deterministic_per_seed():
    task = LogicChains()
    a, b = task.sample(9, "train", 3), task.sample(9, "train", 3)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.input_ids, task.sample(10, "train", 3).input_ids)


def test_train_val_and_length_generalisation_sets_are_disjoint():
    seq_len = LogicChains(num_nodes=16, max_hops=8, num_distractors=2).min_seq_len
    train_task = LogicChains(num_nodes=16, max_hops=4, num_distractors=2, seq_len=seq_len)
    test_task = LogicChains(num_nodes=16, max_hops=8, num_distractors=2, seq_len=seq_len)
    assert train_task.vocab_size == test_task.vocab_size
    train = {tuple(train_task.sample(0, "train", i).input_ids) for i in range(1000)}
    val = {tuple(train_task.sample(0, "val", i).input_ids) for i in range(200)}
    test = [test_task.sample(0, "val", i) for i in range(300)]
    assert not train & val
    assert not train & {tuple(e.input_ids) for e in test}
    assert {e.meta["hops"] for e in test} == set(range(1, 9))
    # a tiny space, where train/val collisions would be certain without the hash split
    tiny = LogicChains(num_nodes=5, min_hops=1, max_hops=1, num_distractors=1, max_extra=0)
    small_train = {tuple(tiny.sample(0, "train", i).input_ids) for i in range(300)}
    small_val = {tuple(tiny.sample(0, "val", i).input_ids) for i in range(50)}
    assert len(small_train) > 5 and small_val and not small_train & small_val


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_hops": 0}, "min_hops"),
        ({"min_hops": 5, "max_hops": 4}, "max_hops"),
        ({"num_nodes": 6, "max_hops": 4}, "num_nodes"),
        ({"num_distractors": -1}, "num_distractors"),
        ({"max_hops": 8, "seq_len": 20}, "seq_len"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogicChains(**kwargs)
