"""FactRecall (E3): worked examples, closed vs open book, counterfactual contexts, no leakage, splits, errors."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, FactRecall

SMALL = {"num_facts": 6, "num_values": 4, "table_seed": 0, "mode": "mixed", "num_queries": 1, "context_facts": 2}
CLOSED_IDS, OPEN_IDS = [3, 9, 6, 7, 5, 8, 11, 4], [6, 7, 5, 7, 2, 9, 11, 5]


def prompt_facts(task: FactRecall, ids: np.ndarray) -> dict[int, int]:
    sep_at = int(np.flatnonzero(ids == task.sep)[0])
    pairs = ids[:sep_at].reshape(-1, 2)
    assert len(set(pairs[:, 0].tolist())) == len(pairs)  # one fact per subject in a prompt
    return {int(s): int(v) for s, v in pairs}


def test_worked_examples_match_docstring():
    task = FactRecall(**SMALL)
    assert task.table.tolist() == [10, 9, 9, 8, 8, 7]
    closed, opened = task.sample(0, "train", 0), task.sample(0, "train", 1)
    assert closed.input_ids.tolist() == CLOSED_IDS and closed.targets.tolist() == [IGNORE_INDEX] * 7 + [8]
    assert closed.meta == {"book": "closed", "counterfactual": 0}
    assert opened.input_ids.tolist() == OPEN_IDS and opened.targets.tolist() == [IGNORE_INDEX] * 7 + [7]
    assert opened.meta == {"book": "open", "counterfactual": 1}
    import hydra_kit.data.fact_recall as module

    assert str(CLOSED_IDS) in module.__doc__ and str(OPEN_IDS) in module.__doc__


@pytest.mark.parametrize("num_queries", [1, 3])
def test_books_answer_from_table_or_prompt_and_never_leak(num_queries):
    task = FactRecall(num_facts=64, num_values=16, num_queries=num_queries, context_facts=5, counterfactual=0.5)
    books, counterfactual = {"open": 0, "closed": 0}, 0
    for i in range(300):
        ex = task.sample(2, "val" if i % 3 == 0 else "train", i)
        assert ex.input_ids.shape == ex.targets.shape == (task.seq_len,)
        assert ex.input_ids.max() < task.vocab_size
        facts = prompt_facts(task, ex.input_ids)
        assert len(facts) == 5 + num_queries  # same number of facts in both books
        answer_pos = np.flatnonzero(ex.targets != IGNORE_INDEX)
        assert len(answer_pos) == num_queries and answer_pos.min() == 2 * (5 + num_queries) + 1
        assert not np.isin(ex.input_ids[answer_pos.min() :], np.arange(65, 65 + 16)).any()  # no value after SEP
        n_cf = 0
        for pos in answer_pos:
            subject, answer = int(ex.input_ids[pos]), int(ex.targets[pos])
            if ex.meta["book"] == "closed":
                assert subject not in facts  # the fact is not in the prompt: it must be recalled
                assert answer == task.table[subject - 1]
            else:
                assert facts[subject] == answer  # the prompt states the answer: it must be read
                n_cf += answer != task.table[subject - 1]
        for subject, value in facts.items():  # distractors are true table facts
            if subject not in ex.input_ids[answer_pos]:
                assert value == task.table[subject - 1]
        assert n_cf == ex.meta["counterfactual"]
        books[ex.meta["book"]] += 1
        counterfactual += n_cf
    assert books["open"] > 100 and books["closed"] > 100
    assert counterfactual > 0.3 * books["open"] * num_queries * 0.5


def test_modes_and_fractions_do_what_they_say():
    def open_share(**kw):
        task = FactRecall(num_facts=32, context_facts=4, **kw)
        return np.mean([task.sample(0, "train", i).meta["book"] == "open" for i in range(400)])

    assert open_share(mode="closed") == 0.0
    assert open_share(mode="open") == 1.0
    assert 0.15 < open_share(mode="mixed", open_fraction=0.25) < 0.35
    task = FactRecall(num_facts=32, context_facts=4, mode="open", counterfactual=0.0)
    assert all(task.sample(0, "train", i).meta["counterfactual"] == 0 for i in range(100))
    task = FactRecall(num_facts=32, context_facts=4, mode="open", counterfactual=1.0)
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
        ({"num_facts": 10, "context_facts": 9}, "num_facts"),
        ({"num_values": 1}, "num_values"),
        ({"num_queries": 0}, "num_queries"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactRecall(**kwargs)
