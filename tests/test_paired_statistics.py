"""The paired comparison every experiment prints: Student's t over seeds, its p, and a verdict only at p < 0.05."""

from __future__ import annotations

import math

import pytest

from hydra_kit.experiments.models import ModelSpec
from hydra_kit.experiments.report import paired_rows
from hydra_kit.reporting import holm, paired_test, t_two_sided_p

# Two-sided 5% and 1% critical values of Student's t (any statistics table).
CRITICAL = [(1, 12.706, 0.05), (2, 4.303, 0.05), (2, 9.925, 0.01), (3, 3.182, 0.05), (4, 2.776, 0.05), (5, 4.032, 0.01), (9, 2.262, 0.05), (30, 2.042, 0.05)]


@pytest.mark.parametrize(("df", "t", "p"), CRITICAL)
def test_p_value_matches_the_t_table(df: int, t: float, p: float) -> None:
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)


def test_p_value_limits() -> None:
    assert t_two_sided_p(0.0, 3) == 1.0 and t_two_sided_p(math.inf, 2) == 0.0 and math.isnan(t_two_sided_p(math.nan, 2))
    # One degree of freedom is the Cauchy distribution: P(|T| >= 1) = 1/2.
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="df must be a positive integer"):
        t_two_sided_p(1.0, 0)


def test_paired_test_and_its_verdict() -> None:
    consistent = paired_test([0.30, 0.32, 0.31])
    assert consistent.ahead == 3 and consistent.p < 0.01 and consistent.verdict("a", "b") == "a ahead of b"
    noisy = paired_test([0.872, 0.126, 0.510])  # E4 at D = 16, Hydra against Hydra without SGA: ahead in every seed
    assert noisy.t == pytest.approx(2.34, abs=0.01) and noisy.p > 0.05 and noisy.verdict("a", "b") == "no difference shown"
    assert paired_test([-0.2, -0.21, -0.19]).verdict("a", "b") == "a behind b"
    assert paired_test([0.0, 0.0, 0.0]).verdict("a", "b") == "no difference shown"
    assert paired_test([0.1, None, math.nan]).verdict("a", "b") == "no test (one seed)"
    assert paired_test([]).verdict("a", "b") == "no test (no seed measured both)"


def test_rows_pair_by_seed_in_the_experiments_model_order() -> None:
    specs = [ModelSpec(label, {}, "") for label in ("hydra", "hydra - x", "transformer")]
    records = [
        {"model": model, "seed": seed, "level": 1, "accuracy": value}
        for model, values in (("transformer", [0.5, 0.41, 0.29]), ("hydra - x", [0.2, 0.6, None]), ("hydra", [0.9, 0.8, 0.7]))
        for seed, value in enumerate(values)
    ]
    rows = paired_rows(records, "level", specs)
    # The first spec is the reference whatever order the records come in (a merge of folders may start with any model).
    assert [(r["model"], r["versus"]) for r in rows] == [("hydra", "hydra - x"), ("hydra", "transformer")]
    assert rows[0]["differences"] == {0: pytest.approx(0.7), 1: pytest.approx(0.2), 2: None} and rows[0]["n_seeds"] == 2
    assert rows[1]["mean_difference"] == pytest.approx(0.4) and rows[1]["ahead"] == 3 and rows[1]["verdict"] == "hydra ahead of transformer"
    assert rows[0]["verdict"] == "no difference shown" and rows[1]["p_holm"] == pytest.approx(2 * rows[1]["p"])
    # Without the reference's runs there is nothing to compare with.
    assert paired_rows([r for r in records if r["model"] != "hydra"], "level", specs) == []


def test_holm_keeps_a_family_of_comparisons_honest() -> None:
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    assert holm([]) == [] and holm([0.5]) == [0.5] and holm([0.6, 0.6]) == [1.0, 1.0]


def test_a_lucky_level_among_many_is_no_verdict() -> None:
    """Sixteen levels at chance: a p of 0.02 at one of them (expected once in about three such tables) is not "ahead"."""
    specs = [ModelSpec("hydra", {}, ""), ModelSpec("other", {}, "")]
    records = [{"model": "other", "seed": s, "level": level, "accuracy": 0.03} for s in range(3) for level in range(16)]
    lucky = {0: 0.040, 1: 0.038, 2: 0.036}  # t = 6.93, p = 0.020 at level 0, as E1 at six hops
    records += [{"model": "hydra", "seed": s, "level": level, "accuracy": lucky[s] if level == 0 else 0.03 + 0.001 * ((s + level) % 3 - 1)} for s in range(3) for level in range(16)]
    rows = paired_rows(records, "level", specs)
    assert rows[0]["p"] == pytest.approx(0.020, abs=1e-3) and rows[0]["p_holm"] > 0.05
    assert {r["verdict"] for r in rows} == {"no difference shown"}
