"""DomainMixture (E5): the worked example, every rule against a plain-Python oracle, no leakage, knobs, errors."""

import numpy as np
import pytest

from hydra_kit.data import IGNORE_INDEX, DomainMixture
from hydra_kit.data.domain_mixture import DOMAINS

EXAMPLE_IDS, EXAMPLE_TARGETS = [4, 3, 2, 2, 9, 10, 11, 12, 13], [-100, -100, -100, -100, -100, 4, 1, 2, 3]


def oracle(name: str, x: list[int], m: int) -> list[int]:
    if name == "copy":
        return list(x)
    if name == "reverse":
        return x[::-1]
    if name == "sort":
        return sorted(x)
    if name == "prefix_sum":
        return [sum(x[: i + 1]) % m for i in range(len(x))]
    if name == "successor":
        return [(v + 1) % m for v in x]
    if name == "rotate":
        return [*x[1:], x[0]]
    raise AssertionError(name)


def test_worked_example_matches_docstring():
    example = DomainMixture(num_domains=4, seq_len=9, num_symbols=5).sample(0, "train", 0)
    assert example.input_ids.tolist() == EXAMPLE_IDS and example.targets.tolist() == EXAMPLE_TARGETS
    assert example.meta == {"domain": 3, "domain_name": "prefix_sum"}
    import hydra_kit.data.domain_mixture as module

    assert str(EXAMPLE_IDS) in module.__doc__ and str(EXAMPLE_TARGETS) in module.__doc__


@pytest.mark.parametrize("seq_len", [17, 18])
def test_every_domain_follows_its_rule_and_answers_stay_out_of_the_input(seq_len):
    task = DomainMixture(num_domains=len(DOMAINS), seq_len=seq_len, num_symbols=7)
    n = task.length
    assert n == 8
    seen = set()
    for i in range(300):
        ex = task.sample(3, "train" if i % 2 else "val", i)
        ids, targets = ex.input_ids, ex.targets
        assert ids.shape == targets.shape == (seq_len,) and ids.max() < task.vocab_size
        body = ids[seq_len - (2 * n + 1) :]
        x, op, pos = body[:n] - 1, body[n], body[n + 1 :]
        assert op == task.op0 + ex.meta["domain"]
        assert pos.tolist() == list(range(task.pos0, task.pos0 + n))  # answer positions hold position tokens only
        answer_at = np.flatnonzero(targets != IGNORE_INDEX)
        assert answer_at.tolist() == list(range(seq_len - n, seq_len))
        assert (targets[answer_at] - 1).tolist() == oracle(ex.meta["domain_name"], x.tolist(), 7)
        assert not np.isin(ids[answer_at.min() - 1 :], np.arange(1, 8)).any()  # no symbol from the operator on
        assert ((ids[: seq_len - 2 * n - 1]) == 0).all()  # the leading PAD of an even length
        seen.add(ex.meta["domain_name"])
    assert seen == set(DOMAINS)


def test_domains_are_balanced_and_num_domains_limits_them():
    task = DomainMixture(num_domains=3)
    counts = np.bincount([task.sample(0, "train", i).meta["domain"] for i in range(600)], minlength=3)
    assert len(counts) == 3 and counts.min() > 150
    assert task.domains == ("copy", "reverse", "sort")


def test_deterministic_and_splits_disjoint():
    task = DomainMixture(num_domains=2, seq_len=5, num_symbols=3, heldout_buckets=3)  # 18 possible inputs: collisions certain
    a, b = task.sample(0, "train", 4), task.sample(0, "train", 4)
    assert np.array_equal(a.input_ids, b.input_ids)
    train = {tuple(task.sample(0, "train", i).input_ids) for i in range(200)}
    val = {tuple(task.sample(0, "val", i).input_ids) for i in range(20)}
    assert len(train) >= 2 and val and not train & val


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_domains": 0}, "num_domains"), ({"num_domains": 7}, "num_domains"), ({"seq_len": 4}, "seq_len"), ({"num_symbols": 1}, "num_symbols")],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DomainMixture(**kwargs)
