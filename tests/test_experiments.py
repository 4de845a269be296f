"""Smoke runs of every ``hydra-kit experiment`` command at toy size, and the NMI used by E5."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hydra_kit.cli import main
from hydra_kit.experiments import EXPERIMENTS
from hydra_kit.experiments.expert_specialisation import normalized_mutual_information
from hydra_kit.experiments.runner import count_parameters, dense_transformer, hydra_config, without

SMOKE = str(Path(__file__).resolve().parents[1] / "recipes" / "experiments" / "smoke.yaml")
TINY = ["--recipe", SMOKE, "--steps", "2", "--seeds", "1", "--eval", "3", "--batch-size", "4"]

CASES = {
    "logic-chains": (["--num-nodes", "16", "--distractors", "2", "--train-hops", "2", "--test-hops", "3"], "logic_chains", "hops", {"hydra", "hydra - workspace", "transformer"}, ["accuracy"]),
    "pkm-recall": (["--num-facts", "16", "--num-values", "4", "--context-facts", "2"], "pkm_recall", "book", {"hydra", "hydra - pkm", "transformer"}, ["accuracy", "latency_ms", "pkm_gate"]),
    "distant-premise": (["--distances", "8", "16", "--distractors", "2", "--no-memory"], "distant_premise", "distance", {"hydra", "hydra - sga", "transformer"}, ["accuracy", "latency_ms", "peak_mem_mb"]),
    "expert-specialisation": (["--domains", "2", "--seq-len", "9"], "expert_specialisation", "domain", {"hydra", "hydra dense-mlp", "transformer"}, ["accuracy", "nmi_answer", "nmi_all"]),
    "mqar": (["--pairs", "2"], "mqar", "pairs", {"hydra", "transformer"}, ["accuracy"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_experiment_smoke(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra, stem, level, models, metrics = CASES[name]
    assert main(["experiment", name, *TINY, *extra, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "mean ± std over 1 seeds" in printed and "compared models" in printed
    with (tmp_path / f"{stem}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["model"] for r in rows} == models
    for m in metrics:
        assert f"{m}_mean" in rows[0] and f"{m}_std" in rows[0]
    assert {"model", level, "n_seeds", "n_examples"} <= set(rows[0])
    accuracies = [float(r["accuracy_mean"]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["summary"] and data["records"] and set(data["models"]) == models
    assert all(data["models"][m]["total_params"] > 0 for m in models)
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    if name == "pkm-recall":  # the gate is reported for Hydra only: without PKM there is no gate (NaN)
        gates = {r["model"]: r["pkm_gate_mean"] for r in data["summary"]}
        assert 0.0 < gates["hydra"] < 1.0
        assert gates["hydra - pkm"] != gates["hydra - pkm"]


def test_list_and_throughput_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out
    assert main(["experiment", "throughput"]) == 0
    assert "hydra-kit bench" in capsys.readouterr().out
    assert main(["experiment", "logic-chain"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment" in err and "logic-chains" in err


def test_bad_option_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "mqar", "--seeds", "0"]) == 2
    assert "--seeds must be positive" in capsys.readouterr().err


def test_nmi_constructed_cases() -> None:
    perfect = np.diag([10.0, 20.0, 30.0, 40.0])
    assert normalized_mutual_information(perfect) == pytest.approx(1.0)
    assert normalized_mutual_information(perfect[:, [2, 0, 3, 1]]) == pytest.approx(1.0)  # relabelled experts
    independent = np.outer([1, 2, 3], [4, 1, 1, 2]).astype(float)  # P(d, e) = P(d) P(e)
    assert normalized_mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    sampled = np.zeros((4, 8))
    np.add.at(sampled, (rng.integers(0, 4, 100_000), rng.integers(0, 8, 100_000)), 1)
    assert normalized_mutual_information(sampled) < 0.001
    two_to_one = np.array([[50.0, 0.0], [50.0, 0.0], [0.0, 100.0]])  # experts see 2 domains each: partial
    assert 0.5 < normalized_mutual_information(two_to_one) < 1.0
    assert normalized_mutual_information(np.ones((3, 1))) == 0.0  # one expert: nothing shared
    with pytest.raises(ValueError):
        normalized_mutual_information(np.zeros((2, 2)))


def test_transformer_matched_within_five_percent() -> None:
    hydra = hydra_config("cpu", 40)
    transformer, counts = dense_transformer(hydra)
    target = count_parameters(hydra)["total_params"]
    assert abs(counts["total_params"] - target) / target < 0.05
    assert set(transformer["components"]) == {"attn", "mlp"}
    _, active = dense_transformer(hydra, match="active_params")
    assert abs(active["active_params"] - count_parameters(hydra)["active_params"]) / count_parameters(hydra)["active_params"] < 0.05
    ablated = without(hydra, "workspace")
    assert ablated["dropped"] == ["workspace"] and count_parameters(ablated)["total_params"] < target
