"""MQAR: the docstring's worked example, held-out disjointness, no answer in the input."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, MQAR


def test_worked_example_matches_docstring():
    example = MQAR(num_pairs=2, num_queries=2, num_keys=4, num_values=4).sample(0, "train", 0)
    assert example.input_ids.tolist() == [1, 7, 4, 8, 9, 1, 4]
    assert example.targets.tolist() == [-100, -100, -100, -100, -100, 7, 8]


def test_docstring_contains_the_example():
    import hydra_kit.data.mqar as module

    assert "[1, 7, 4, 8, 9, 1, 4]" in module.__doc__
    assert "[-100, -100, -100, -100, -100, 7, 8]" in module.__doc__


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
