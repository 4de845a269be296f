"""MQAR: the docstring's worked example, held-out disjointness, no answer in the input, the no-skill shortcuts."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, MQAR, Example
from hydra_kit.data.task import best_no_skill


def test_worked_example_matches_docstring():
    example = MQAR(num_pairs=2, num_queries=2, num_keys=4, num_values=4).sample(0, "train", 0)
    assert example.input_ids.tolist() == [3, 6, 4, 5, 9, 4, 3]
    assert example.targets.tolist() == [-100, -100, -100, -100, -100, 5, 6]


def test_docstring_contains_the_example():
    import hydra_kit.data.mqar as module

    assert "[3, 6, 4, 5, 9, 4, 3]" in module.__doc__
    assert "[-100, -100, -100, -100, -100, 5, 6]" in module.__doc__


def test_deterministic_per_seed_split_index():
    task = MQAR()
    a, b = task.sample(3, "train", 17), task.sample(3, "train", 17)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.input_ids, task.sample(4, "train", 17).input_ids)


def test_train_and_heldout_never_overlap():
    task = MQAR(num_pairs=2, num_queries=1, num_keys=3, num_values=2)  # a tiny example space: collisions are certain
    train = {tuple(task.sample(0, "train", i).input_ids) for i in range(400)}
    val = {tuple(task.sample(0, "val", i).input_ids) for i in range(100)}
    assert len(train) > 10 and len(val) > 1
    assert not train & val


def test_answers_are_targets_only_and_reachable():
    task = MQAR(num_pairs=6, num_queries=4)
    for i in range(50):
        ex = task.sample(1, "val", i)
        answer_pos = np.flatnonzero(ex.targets != IGNORE_INDEX)
        assert len(answer_pos) == 4 and answer_pos.min() == 2 * 6 + 1
        for pos in answer_pos:
            key, value = ex.input_ids[pos], ex.targets[pos]
            pairs = ex.input_ids[: 2 * 6].reshape(-1, 2)
            assert value in pairs[pairs[:, 0] == key, 1]  # the answer is stated in the context
            assert value not in ex.input_ids[pos:]  # and never given at or after the query


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="num_queries"):
        MQAR(num_pairs=2, num_queries=3)


def test_meta_names_the_number_of_pairs():
    assert MQAR(num_pairs=5, num_queries=2).sample(0, "train", 0).meta["pairs"] == 5


def test_values_are_distinct_and_disjoint_from_keys():
    task = MQAR(num_pairs=8, num_queries=8, num_keys=32, num_values=32)
    for i in range(200):
        pairs = task.sample(0, "train", i).input_ids[:16].reshape(-1, 2)
        assert len(set(pairs[:, 1].tolist())) == 8  # drawn without replacement, as in Zoology
        assert pairs[:, 0].max() <= 32 < pairs[:, 1].min()


def elimination_level(num_pairs: int, num_queries: int) -> float:
    """Mean over the queries of 1 / (pairs not asked before): guessing among them, query i of a uniform order."""
    return sum(1 / (num_pairs - i) for i in range(num_queries)) / num_queries


def test_no_skill_heuristics_stay_at_the_one_over_pairs_ceiling():
    # With values drawn with replacement, "most frequent value in context" scored 0.207 at 8 pairs and the
    # models converged to it (issue 17); distinct values bring every shortcut that reads no query down to
    # guessing a listed value. Ruling out the pairs earlier queries asked does better (issue 32): H_8 / 8.
    task = MQAR(num_pairs=8, num_queries=8, num_keys=32, num_values=32)
    baselines = task.no_skill_baselines([task.sample(0, "val", i) for i in range(500)])
    assert baselines["chance"] == pytest.approx(1 / 32)
    assert set(baselines) >= {"most frequent value", "last value", "value at the query's rank", "first pair not asked before"}
    # 500 examples: the standard error of the elimination level is about 0.006, so 0.03 is five of them.
    assert elimination_level(8, 8) == pytest.approx(0.3397, abs=1e-4)
    assert baselines["first pair not asked before"] == pytest.approx(elimination_level(8, 8), abs=0.03)
    assert best_no_skill(baselines)[0] == "first pair not asked before"
    for name, accuracy in baselines.items():
        if name != "first pair not asked before":
            assert accuracy <= 1 / 8 + 0.02, f"{name}: {accuracy:.3f} exceeds the 1/pairs ceiling"


def test_elimination_shortcut_is_certain_at_the_last_query_and_weaker_with_fewer_queries():
    task = MQAR(num_pairs=8, num_queries=8, num_keys=32, num_values=32)
    examples = [task.sample(0, "val", i) for i in range(200)]
    last = []
    for ex in examples:  # score the last query alone
        targets = np.full_like(ex.targets, IGNORE_INDEX)
        targets[-1] = ex.targets[-1]
        last.append(Example(ex.input_ids, targets))
    assert task.no_skill_baselines(last)["first pair not asked before"] == 1.0  # seven keys asked: the eighth is left
    fewer = MQAR(num_pairs=8, num_queries=4, num_keys=32, num_values=32)
    accuracy = fewer.no_skill_baselines([fewer.sample(0, "val", i) for i in range(500)])["first pair not asked before"]
    assert accuracy == pytest.approx(elimination_level(8, 4), abs=0.03)  # (1/8 + 1/7 + 1/6 + 1/5) / 4 = 0.159


def test_elimination_shortcut_matches_its_docstring_example():
    # Keys 1..8 with values 33..40 listed in order, SEP 65; queries k3 k1, now k5: pairs 2, 4..8 are left.
    task = MQAR(num_pairs=8, num_queries=8, num_keys=32, num_values=32)
    pairs = np.stack([np.arange(1, 9), 32 + np.arange(1, 9)], axis=1).reshape(-1)
    ids = np.concatenate([pairs, [task.sep, 3, 1, 5]])
    assert task.heuristics()["first pair not asked before"](ids, len(ids) - 1) == 34
    assert "the guess is ``v2``" in (MQAR.heuristics.__doc__ or "")


def test_too_few_values_for_distinct_values_is_explained():
    with pytest.raises(ValueError, match="num_values must be at least"):
        MQAR(num_pairs=8, num_queries=8, num_keys=32, num_values=4)


def test_evidence_is_the_asked_key_value_pair():
    task = MQAR(num_pairs=2, num_queries=2, num_keys=4, num_values=4)
    assert task.evidence(task.sample(0, "train", 0)) == {5: [2, 3], 6: [0, 1]}  # the worked example: k4 v5, k3 v6
    task = MQAR(num_pairs=8, num_queries=5)
    for i in range(20):
        example = task.sample(1, "val", i)
        found = task.evidence(example)
        assert sorted(found) == np.flatnonzero(example.targets != IGNORE_INDEX).tolist()
        for t, (key_at, value_at) in found.items():
            assert example.input_ids[key_at] == example.input_ids[t] and example.input_ids[value_at] == example.targets[t]
