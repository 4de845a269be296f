"""FactRecall (E3): worked examples, two-token subjects over a balanced table, books, no shortcut, splits, errors."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, FactRecall
from hydra_kit.data.fact_recall import balanced_table

SMALL = {"num_facts": 16, "num_values": 4, "table_seed": 0, "mode": "mixed", "num_queries": 1}
TABLE = [[7, 6, 8, 5], [8, 5, 7, 6], [6, 8, 5, 7], [5, 7, 6, 8]]
CLOSED_IDS, OPEN_IDS = [4, 3, 6, 3, 2, 8, 1, 4, 5, 4, 2, 7, 9, 3, 1], [4, 3, 6, 3, 3, 7, 4, 1, 5, 2, 1, 8, 9, 3, 3]


def prompt_facts(task: FactRecall, ids: np.ndarray) -> dict[tuple[int, int], int]:
    sep_at = int(np.flatnonzero(ids == task.sep)[0])
    facts = ids[:sep_at].reshape(-1, 3)
    subjects = [(int(a), int(b)) for a, b, _ in facts]
    assert len(set(subjects)) == len(subjects)  # one fact per subject in a prompt
    assert len(set(facts[:, 2].tolist())) == len(facts)  # distinct values
    return {s: int(v) for s, v in zip(subjects, facts[:, 2], strict=True)}


def test_worked_examples_match_docstring():
    task = FactRecall(**SMALL)
    assert task.table.tolist() == TABLE and task.context_facts == 3
    closed, opened = task.sample(0, "train", 0), task.sample(0, "train", 8)
    assert closed.input_ids.tolist() == CLOSED_IDS and closed.targets.tolist() == [IGNORE_INDEX] * 14 + [6]
    assert closed.meta == {"book": "closed", "counterfactual": 0}
    assert opened.input_ids.tolist() == OPEN_IDS and opened.targets.tolist() == [IGNORE_INDEX] * 14 + [7]
    assert opened.meta == {"book": "open", "counterfactual": 1}
    import hydra_kit.data.fact_recall as module

    assert str(CLOSED_IDS) in module.__doc__ and str(OPEN_IDS) in module.__doc__
    assert all(str(row) in module.__doc__ for row in TABLE)


@pytest.mark.parametrize(("n", "num_values"), [(4, 4), (12, 4), (16, 16), (32, 16)])
def test_table_is_balanced_in_every_row_and_column(n, num_values):
    table = balanced_table(np.random.default_rng(n), n, num_values)
    for line in (*table, *table.T):
        assert np.bincount(line, minlength=num_values).tolist() == [n // num_values] * num_values


@pytest.mark.parametrize("num_queries", [1, 3])
def test_books_answer_from_table_or_prompt_and_never_leak(num_queries):
    task = FactRecall(num_facts=256, num_values=16, num_queries=num_queries, context_facts=5, counterfactual=0.5)
    books, counterfactual = {"open": 0, "closed": 0}, 0
    for i in range(300):
        ex = task.sample(2, "val" if i % 3 == 0 else "train", i)
        assert ex.input_ids.shape == ex.targets.shape == (task.seq_len,)
        assert ex.input_ids.max() < task.vocab_size and ex.input_ids.min() >= 1
        facts = prompt_facts(task, ex.input_ids)
        assert len(facts) == 5 + num_queries  # same number of facts in both books
        answer_pos = np.flatnonzero(ex.targets != IGNORE_INDEX)
        sep_at = 3 * (5 + num_queries)
        assert answer_pos.tolist() == [sep_at + 2 * (k + 1) for k in range(num_queries)]  # each query's second token
        assert not (ex.input_ids[sep_at + 1 :] >= task.value0).any()  # no value (or SEP) after SEP
        n_cf = 0
        for pos in answer_pos:
            subject, answer = (int(ex.input_ids[pos - 1]), int(ex.input_ids[pos])), int(ex.targets[pos])
            if ex.meta["book"] == "closed":
                assert subject not in facts  # the fact is not in the prompt: it must be recalled
                assert answer == task.table[subject[0] - 1, subject[1] - 1]
            else:
                assert facts[subject] == answer  # the prompt states the answer: it must be read
                n_cf += answer != task.table[subject[0] - 1, subject[1] - 1]
        asked = {(int(ex.input_ids[p - 1]), int(ex.input_ids[p])) for p in answer_pos}
        assert len(asked) == num_queries and len(set(ex.targets[answer_pos].tolist())) == num_queries
        for (a, b), value in facts.items():  # distractors are true table facts
            if (a, b) not in asked:
                assert value == task.table[a - 1, b - 1]
        assert n_cf == ex.meta["counterfactual"]
        books[ex.meta["book"]] += 1
        counterfactual += n_cf
    assert books["open"] > 100 and books["closed"] > 100
    assert counterfactual > 0.3 * books["open"] * num_queries * 0.5


def near_chance(task: FactRecall) -> float:
    """The bar a no-skill heuristic must stay under: max(2 * chance, chance + 0.05).

    Over 500 examples of two answers the standard error of an accuracy near chance (1/16) is about 0.008, so
    chance + 0.05 is six standard errors above it; the issue 17 bigram scored 1.0 on closed-book questions.
    """
    return max(2 * task.chance, task.chance + 0.05)


@pytest.mark.slow
def test_every_shortcut_stays_near_chance_in_both_books():
    # The E3 CPU instance: 256 two-token subjects, 16 values, two queries, every value stated once.
    task = FactRecall(num_facts=256, num_values=16, num_queries=2)
    assert task.context_facts == 14
    examples = [task.sample(1_000_000_007, "val", i) for i in range(1100)]
    assert set(task.heuristics()) == {"last subject token", "first subject token", "commonest answer", "most frequent value", "last value", "first fact not asked before"}
    assert "first fact not asked before" not in FactRecall(num_facts=256, num_values=16, num_queries=1).heuristics()  # nothing asked before
    for book in ("closed", "open"):
        level = [e for e in examples if e.meta["book"] == book][:500]
        assert len(level) == 500
        for name, accuracy in task.no_skill_baselines(level).items():
            assert accuracy <= near_chance(task), f"{book}-book, {name}: {accuracy:.3f}"


def test_only_the_token_pair_identifies_a_fact():
    # The pair determines the value; either token alone leaves every value equally likely (no bigram).
    task = FactRecall(num_facts=64, num_values=8, mode="closed")
    by_pair: dict[tuple[int, int], set[int]] = {}
    for i in range(400):
        ex = task.sample(0, "train", i)
        t = int(np.flatnonzero(ex.targets != IGNORE_INDEX)[0])
        by_pair.setdefault((int(ex.input_ids[t - 1]), int(ex.input_ids[t])), set()).add(int(ex.targets[t]))
    assert all(len(values) == 1 for values in by_pair.values())  # the pair determines the value
    for token in range(1, task.pool + 1):  # every token, in either place, leaves every value equally likely
        assert np.bincount(task.table[token - 1] - task.value0).tolist() == [1] * 8
        assert np.bincount(task.table[:, token - 1] - task.value0).tolist() == [1] * 8


@pytest.mark.slow
def test_fewer_context_facts_leave_the_stated_value_ceiling():
    task = FactRecall(num_facts=256, num_values=16, num_queries=2, context_facts=6, mode="open")
    baselines = task.no_skill_baselines([task.sample(1_000_000_007, "val", i) for i in range(400)])
    assert 1 / 16 < baselines["most frequent value"] < 1 / 8 + 0.04  # one of the 8 stated values


@pytest.mark.slow
def test_elimination_rules_out_the_facts_earlier_queries_asked():
    # Prompt 1 2 -> v17, 3 4 -> v18, 5 6 -> v19 (pool 16: values 17..32, SEP 33); asked 1 2, now 5 6: 3 4 is first left.
    task = FactRecall(num_facts=256, num_values=16, num_queries=2)
    ids = np.array([1, 2, 17, 3, 4, 18, 5, 6, 19, task.sep, 1, 2, 5, 6])
    assert task.heuristics()["first fact not asked before"](ids, len(ids) - 1) == 18
    assert task.heuristics()["first fact not asked before"](ids[:12], 11) == 17  # the first query: nothing ruled out
    # Open book, 8 of 16 facts asked: 1 / (16 - i) at query i, (1/16 + ... + 1/9) / 8 = 0.083 on average, above the
    # 1/16 of guessing a stated value; 4,000 answers give a standard error of about 0.004.
    many = FactRecall(num_facts=256, num_values=16, num_queries=8, context_facts=8, mode="open")
    baselines = many.no_skill_baselines([many.sample(0, "val", i) for i in range(500)])
    assert baselines["first fact not asked before"] == pytest.approx(sum(1 / (16 - i) for i in range(8)) / 8, abs=0.02)


def test_modes_and_fractions_do_what_they_say():
    def open_share(**kw):
        task = FactRecall(num_facts=64, num_values=8, context_facts=4, **kw)
        return np.mean([task.sample(0, "train", i).meta["book"] == "open" for i in range(400)])

    assert open_share(mode="closed") == 0.0
    assert open_share(mode="open") == 1.0
    assert 0.15 < open_share(mode="mixed", open_fraction=0.25) < 0.35
    task = FactRecall(num_facts=64, num_values=8, context_facts=4, mode="open", counterfactual=0.0)
    assert all(task.sample(0, "train", i).meta["counterfactual"] == 0 for i in range(100))
    task = FactRecall(num_facts=64, num_values=8, context_facts=4, mode="open", counterfactual=1.0)
    assert all(task.sample(0, "train", i).meta["counterfactual"] == 1 for i in range(100))


def test_table_depends_only_on_table_seed():
    a, b = FactRecall(table_seed=3), FactRecall(table_seed=3, mode="open", context_facts=2)
    assert np.array_equal(a.table, b.table)
    assert not np.array_equal(a.table, FactRecall(table_seed=4).table)
    ex_a, ex_b = a.sample(1, "train", 7), a.sample(1, "train", 7)
    assert np.array_equal(ex_a.input_ids, ex_b.input_ids)
    assert not np.array_equal(ex_a.input_ids, a.sample(2, "train", 7).input_ids)


def test_train_and_heldout_prompts_never_overlap():
    task = FactRecall(num_facts=4, num_values=2, context_facts=1, mode="mixed")  # a tiny space: collisions certain
    train = {tuple(task.sample(0, "train", i).input_ids) for i in range(400)}
    val = {tuple(task.sample(0, "val", i).input_ids) for i in range(100)}
    assert len(train) > 10 and len(val) > 1 and not train & val


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "book"}, "mode"),
        ({"open_fraction": 1.5}, "open_fraction"),
        ({"num_facts": 10}, "num_facts"),
        ({"num_facts": 64, "num_values": 16}, "num_facts"),
        ({"num_values": 1}, "num_values"),
        ({"num_queries": 0}, "num_queries"),
        ({"context_facts": 16}, "context_facts"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactRecall(**kwargs)
