"""DistantPremise (E4): the worked example, exact distance, unique answer, distractors, knobs, splits, errors."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, DistantPremise

EXAMPLE_IDS = [12, 5, 11, 3, 1, 3, 12, 7, 9, 1, 3, 12, 6, 11, 13, 7]


def premises(task: DistantPremise, ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(position, key, value) of every PREMISE marker before the question."""
    at = np.flatnonzero(ids[:-2] == task.premise)
    return [(int(p), int(ids[p + 1]), int(ids[p + 2])) for p in at]


def test_worked_example_matches_docstring():
    task = DistantPremise(distance=8, num_distractors=2, seq_len=16, num_filler=3, num_keys=4, num_values=4)
    example = task.sample(0, "train", 3)
    assert example.input_ids.tolist() == EXAMPLE_IDS
    assert example.targets.tolist() == [IGNORE_INDEX] * 15 + [9]
    assert example.meta["distance"] == 8
    import hydra_kit.data.distant_premise as module

    assert str(EXAMPLE_IDS) in module.__doc__


@pytest.mark.parametrize("distance", [5, 37, [16, 64, 200]])
def test_premise_at_exact_distance_unique_and_not_leaked(distance):
    task = DistantPremise(distance=distance, num_distractors=6)
    seen = set()
    for i in range(100):
        ex = task.sample(4, "train" if i % 2 else "val", i)
        ids = ex.input_ids
        assert ids.shape == ex.targets.shape == (task.seq_len,) and ids.max() < task.vocab_size and ids.min() >= 1
        assert np.flatnonzero(ex.targets != IGNORE_INDEX).tolist() == [task.seq_len - 1]
        assert ids[-2] == task.question and (ids == task.question).sum() == 1
        found = premises(task, ids)
        assert len(found) == 7  # the premise and 6 distractors, none overlapping (every marker starts a premise)
        assert len({k for _, k, _ in found}) == 7  # distinct keys: exactly one premise answers the question
        match = [(p, v) for p, k, v in found if k == ids[-1]]
        assert len(match) == 1
        position, value = match[0]
        assert value == ex.targets[-1]
        assert (task.seq_len - 2) - position == ex.meta["distance"]
        assert ex.targets[-1] not in ids[-2:]  # the question holds no value
        # filler and markers never overlap a premise's key/value slots
        keys_or_values = (ids >= task.key0) & (ids < task.premise)
        assert keys_or_values.sum() == 2 * 7 + 1
        seen.add(ex.meta["distance"])
    assert seen == set([distance] if isinstance(distance, int) else distance)


def test_distractors_lie_between_premise_and_question():
    task = DistantPremise(distance=[32, 256], num_distractors=4)
    for i in range(50):
        ex = task.sample(0, "train", i)
        found = premises(task, ex.input_ids)
        position = next(p for p, k, _ in found if k == ex.input_ids[-1])
        between = sum(position < p < task.seq_len - 2 for p, _, _ in found)
        assert between >= 1 and between == ex.meta["between"]
        filler_between = (ex.input_ids[position + 3 : task.seq_len - 2] <= task.num_filler).sum()
        assert filler_between == ex.meta["distance"] - 3 - 3 * between


def test_deterministic_per_seed():
    task = DistantPremise()
    a, b = task.sample(1, "train", 5), task.sample(1, "train", 5)
    assert np.array_equal(a.input_ids, b.input_ids)
    assert not np.array_equal(a.input_ids, task.sample(2, "train", 5).input_ids)


def test_longer_distance_test_set_is_disjoint_from_training():
    train_task = DistantPremise(distance=[8, 16], num_distractors=1, seq_len=40, num_filler=2, num_keys=3, num_values=2)
    test_task = DistantPremise(distance=[8, 16, 24, 32], num_distractors=1, seq_len=40, num_filler=2, num_keys=3, num_values=2)
    train = {tuple(train_task.sample(0, "train", i).input_ids) for i in range(500)}
    val = {tuple(train_task.sample(0, "val", i).input_ids) for i in range(100)}
    test = [test_task.sample(0, "val", i) for i in range(200)]
    assert not train & val
    assert not train & {tuple(e.input_ids) for e in test}
    assert {e.meta["distance"] for e in test} == {8, 16, 24, 32}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distance": 2}, "distance"),
        ({"distance": []}, "distance"),
        ({"distance": 100, "seq_len": 50}, "seq_len"),
        ({"num_distractors": 40, "num_keys": 32}, "num_distractors"),
        ({"num_values": 1}, "num_values"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistantPremise(**kwargs)
