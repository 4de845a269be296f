"""Smoke runs of every ``hydra-kit experiment`` command at toy size, and the NMI used by E5."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from hydra_kit.cli import main
from hydra_kit.data import Example, SyntheticTask
from hydra_kit.data.task import Heuristic
from hydra_kit.experiments import EXPERIMENTS, report
from hydra_kit.experiments.expert_specialisation import normalized_mutual_information
from hydra_kit.experiments.models import count_parameters, dense_transformer, hydra_config, without

SMOKE = str(Path(__file__).resolve().parents[1] / "recipes" / "experiments" / "smoke.yaml")
TINY = ["--recipe", SMOKE, "--steps", "2", "--seeds", "1", "--eval", "3", "--batch-size", "4"]

CASES = {
    "logic-chains": (["--num-nodes", "16", "--distractors", "2", "--train-hops", "2", "--test-hops", "3"], "logic_chains", "hops", {"hydra", "hydra - workspace", "transformer"}, ["accuracy"]),
    "pkm-recall": (["--num-facts", "16", "--num-values", "4", "--context-facts", "2"], "pkm_recall", "book", {"hydra", "hydra - pkm", "transformer"}, ["accuracy", "latency_ms", "pkm_gate"]),
    "distant-premise": (["--distances", "8", "16", "--distractors", "2", "--no-memory", "--easy-steps", "1"], "distant_premise", "distance", {"hydra", "hydra - sga", "transformer"}, ["accuracy", "latency_ms", "peak_mem_mb"]),
    "expert-specialisation": (["--domains", "2", "--seq-len", "9"], "expert_specialisation", "domain", {"hydra", "hydra dense-mlp", "transformer"}, ["accuracy", "nmi_answer", "nmi_all"]),
    "mqar": (["--pairs", "2"], "mqar", "pairs", {"hydra", "hydra - router", "transformer"}, ["accuracy"]),
}
# Experiments whose tables, files and figures carry chance and the best no-skill baseline per level.
BASELINED = {"logic-chains", "pkm-recall", "distant-premise", "expert-specialisation", "mqar"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_experiment_smoke(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra, stem, level, models, metrics = CASES[name]
    assert main(["experiment", name, *TINY, *extra, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "mean ± std over 1 seed;" in printed and "compared models" in printed
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
    # The transformer trains at its own learning rate (--transformer-lr), Hydra and its variants at --lr.
    assert {m: data["models"][m]["lr"] for m in models if m.startswith("transformer")} == {"transformer": 1e-3}
    assert all(data["models"][m]["lr"] == data["settings"]["lr"] for m in models if m != "transformer")
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # The full Hydra against each other model, per level: with one seed there is nothing to test.
    assert {(r["model"], r["versus"]) for r in data["paired"]} == {("hydra", m) for m in models if m != "hydra"}
    assert {r["verdict"] for r in data["paired"]} == {"no test (one seed)"} and "paired by seed" in printed
    if name in BASELINED:
        assert "no-skill baselines per" in printed and "best no-skill" in printed and "above no-skill" in printed
        assert set(report.BASELINE_COLUMNS) <= set(rows[0])
        levels = {r[level] for r in data["baselines"]}
        for r in rows:
            if r[level] == "all":  # E5's pooled row: the mean over domains
                assert r["best_no_skill"] == "best per domain"
                continue
            assert r[level] in {str(v) for v in levels}
            assert 0.0 < float(r["chance"]) <= float(r["best_no_skill_accuracy"]) <= 1.0
            assert r["above_no_skill"] in ("yes", "no")
            assert f"{float(r['best_no_skill_accuracy']):.3f} ({r['best_no_skill']})" in printed
        for b in data["baselines"]:
            assert b["best_no_skill"] in b["baselines"] and b["baselines"]["chance"] == b["chance"]
    if name == "pkm-recall":
        # Reading is scored apart: on the all-counterfactual prompts recalling the table scores 0, on the closed book 1.
        assert {r["book"] for r in rows} == {"closed", "open", "counterfactual"}
        assert data["recall_only"]["closed"] == 1.0 and data["recall_only"]["counterfactual"] == 0.0
        # the gate is reported for Hydra only: without PKM there is no gate (NaN)
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


def test_missing_matplotlib_is_said_before_any_training(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from hydra_kit.experiments import runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("trained although the figure could not be written"))
    assert main(["experiment", "mqar", *TINY, *CASES["mqar"][0]]) == 2
    err = capsys.readouterr().err
    assert "experiment mqar: writes its figure with matplotlib, which is not installed: pip install 'hydra-kit[plots]'" in " ".join(err.split())


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


class _Echo(SyntheticTask):
    """A toy task for the report helpers: the answer repeats the first token; one heuristic copies it, one says 2."""

    vocab_size, seq_len = 3, 2

    @property
    def chance(self) -> float:
        return 0.5

    def generate(self, rng: np.random.Generator) -> Example:
        first = int(rng.integers(1, 3))
        return Example(np.array([first, 0]), np.array([-100, first]), {"level": first})

    def heuristics(self) -> dict[str, Heuristic]:
        return {"copy": lambda ids, t: int(ids[0]), "two": lambda ids, t: 2}


def test_baseline_rows_and_claims_are_computed_per_level(capsys: pytest.CaptureFixture[str]) -> None:
    task = _Echo()
    examples = {level: [Example(np.array([level, 0]), np.array([-100, level]))] * 100 for level in (1, 2)}
    rows = report.baseline_rows(task, examples, "level")
    assert rows[0] == {"level": 1, "chance": 0.5, "best_no_skill": "copy", "best_no_skill_accuracy": 1.0,
                       "baselines": {"chance": 0.5, "copy": 1.0, "two": 0.0}, "n_examples": 100}
    assert rows[1]["baselines"] == {"chance": 0.5, "copy": 1.0, "two": 1.0}
    assert report.baseline_rows({1: task, 2: task}, examples, "level") == rows  # one task per level (MQAR's pairs)
    summary = [
        {"model": "m", "level": 1, "accuracy_mean": 1.0, "accuracy_std": 0.0, "n_seeds": 1},
        {"model": "m", "level": 3, "accuracy_mean": 0.9, "accuracy_std": 0.0, "n_seeds": 1},
        {"model": "m", "level": "all", "accuracy_mean": 0.9, "accuracy_std": 0.0, "n_seeds": 1},
    ]
    out = report.with_baselines(summary, rows, "level", pooled={"all": "best per level"})
    assert [r["above_no_skill"] for r in out] == ["no", "-", "no"]  # equal to the baseline is no claim
    assert out[2]["best_no_skill"] == "best per level" and out[2]["best_no_skill_accuracy"] == 1.0
    assert math.isnan(out[1]["chance"]) and out[1]["best_no_skill"] == "-"
    report.print_table(Console(width=200), "t", out, ("model", "level"), [("accuracy", "accuracy", 3)])
    printed = capsys.readouterr().out
    assert "best no-skill" in printed and "1.000 (copy)" in printed and "above no-skill" in printed


def test_a_claim_needs_more_than_sampling_noise() -> None:
    assert report.above(0.10, 0.0, 0.05, 500) == "yes"  # 0.05 + 2 * 0.0097 < 0.10
    assert report.above(0.10, 0.0, 0.05, 20) == "no"  # one lucky answer in 20 is no claim
    assert report.above(0.10, 0.04, 0.05, 500) == "no"  # nor a mean whose spread over seeds reaches the baseline
    assert report.above(float("nan"), 0.0, 0.05, 500) == "-"


def test_baselines_of_a_single_level_are_drawn() -> None:
    # One level (E6 at one number of pairs): a line through a single point draws nothing; it must still show.
    plt = report.pyplot()
    fig, ax = plt.subplots()
    report.draw_baselines(ax, [{"pairs": 8, "chance": 0.03, "best_no_skill_accuracy": 0.125}], "pairs")
    heights = sorted(line.get_ydata()[0] for line in ax.get_lines())
    plt.close(fig)
    assert heights == [0.03, 0.125]


def _run(name: str, out: Path, *extra: str) -> dict:
    assert main(["experiment", name, *TINY, *CASES[name][0], "--out", str(out), *extra]) == 0
    return json.loads((out / f"{CASES[name][1]}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["expert-specialisation", "mqar"])
def test_seeds_run_apart_merge_into_the_result_of_one_run(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--first-seed trains the seeds named; --merge joins folders without training, as if one run had trained them all."""
    together = _run(name, tmp_path / "together", "--seeds", "2")
    first = _run(name, tmp_path / "first")
    second = _run(name, tmp_path / "second", "--first-seed", "1")
    assert {r["seed"] for r in first["records"]} == {0} and {r["seed"] for r in second["records"]} == {1}
    capsys.readouterr()
    merged = _run(name, tmp_path / "merged", "--merge", str(tmp_path / "first"), str(tmp_path / "second"))
    printed = capsys.readouterr().out
    flat = " ".join(printed.split())  # rich wraps long lines at the console width
    assert "mean ± std over 2 seeds" in flat and "(from " in flat
    assert merged["settings"]["seeds"] == 2 and merged["settings"]["merge"] == [str(tmp_path / "first"), str(tmp_path / "second")]
    assert merged["records"] == first["records"] + second["records"]
    # Nothing was retrained: the runs (with their timings) are the folders' own, tagged with where they came from.
    assert [{k: v for k, v in r.items() if k != "merged_from"} for r in merged["runs"]] == first["runs"] + second["runs"]
    assert [r["merged_from"] for r in merged["runs"]] == [str(tmp_path / "first")] * len(first["runs"]) + [str(tmp_path / "second")] * len(second["runs"])
    # Training is deterministic per seed on the CPU, so the joined summary is the one-run summary (timings aside).
    drop = {"latency_ms_mean", "latency_ms_std"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in merged["summary"]] == [{k: v for k, v in r.items() if k not in drop} for r in together["summary"]]
    if name == "expert-specialisation":  # the per-run routing counts are joined too, so the heatmaps cover both seeds
        assert merged["routing"] == first["routing"] + second["routing"] and merged["heatmaps"] == together["heatmaps"]


@pytest.mark.slow
def test_models_trained_apart_merge_into_the_result_of_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--models trains the models named (the JSON still describes all); --merge joins the folders into the one-run result."""
    together = _run("logic-chains", tmp_path / "together")
    hydras = _run("logic-chains", tmp_path / "hydras", "--models", "hydra", "hydra - workspace")
    transformer = _run("logic-chains", tmp_path / "transformer", "--models", "transformer")
    assert {r["model"] for r in hydras["runs"]} == {"hydra", "hydra - workspace"} and {r["model"] for r in transformer["runs"]} == {"transformer"}
    assert set(hydras["models"]) == set(transformer["models"]) == CASES["logic-chains"][3]
    # A folder joins when the models it has runs of match: the transformer's folder may describe another Hydra.
    written = tmp_path / "transformer" / f"{CASES['logic-chains'][1]}.json"
    payload = json.loads(written.read_text())
    payload["models"]["hydra"]["config"] = {"changed": "after this folder was trained"}
    written.write_text(json.dumps(payload))
    merged = _run("logic-chains", tmp_path / "merged", "--merge", str(tmp_path / "hydras"), str(tmp_path / "transformer"))
    assert merged["records"] == together["records"] and merged["summary"] == together["summary"]
    # Folders in either order: Hydra stays the model the others are compared with.
    swapped = _run("logic-chains", tmp_path / "swapped", "--merge", str(tmp_path / "transformer"), str(tmp_path / "hydras"))
    assert swapped["paired"] == merged["paired"] == together["paired"] and {r["model"] for r in merged["paired"]} == {"hydra"}
    assert swapped["records"] == together["records"] and swapped["summary"] == together["summary"]
    # --models under --merge takes only those models' runs: the still-valid transformer runs of an earlier joined
    # result whose Hydra runs are out of date (their configuration no longer this command's) join new Hydra runs.
    written = tmp_path / "together" / f"{CASES['logic-chains'][1]}.json"
    payload = json.loads(written.read_text())
    payload["models"]["hydra"]["config"] = {"changed": "after this folder was trained"}
    written.write_text(json.dumps(payload))
    kept = _run("logic-chains", tmp_path / "kept", "--merge", str(tmp_path / "together"), "--models", "transformer")
    assert {r["model"] for r in kept["runs"]} == {"transformer"} and kept["records"] == transformer["records"]
    rejoined = _run("logic-chains", tmp_path / "rejoined", "--merge", str(tmp_path / "hydras"), str(tmp_path / "kept"))
    assert rejoined["records"] == together["records"] and rejoined["summary"] == together["summary"]
    capsys.readouterr()
    assert main(["experiment", "logic-chains", *TINY, *CASES["logic-chains"][0], "--out", str(tmp_path / "z"), "--merge", str(tmp_path / "together")]) == 2
    assert "its models differ from this command's (hydra)" in capsys.readouterr().err
    # A folder with runs of a model trained with another configuration is refused.
    written = tmp_path / "hydras" / f"{CASES['logic-chains'][1]}.json"
    payload = json.loads(written.read_text())
    payload["models"]["hydra"]["config"] = {"changed": "after this folder was trained"}
    written.write_text(json.dumps(payload))
    assert main(["experiment", "logic-chains", *TINY, *CASES["logic-chains"][0], "--out", str(tmp_path / "y"), "--merge", str(tmp_path / "hydras"), str(tmp_path / "transformer")]) == 2
    assert "its models differ from this command's (hydra)" in capsys.readouterr().err
    assert main(["experiment", "logic-chains", *TINY, *CASES["logic-chains"][0], "--out", str(tmp_path / "x"), "--models", "hydra-workspace"]) == 2
    err = capsys.readouterr().err
    assert "--models 'hydra-workspace': no such model here; available: 'hydra', 'hydra - workspace', 'transformer'" in err and "Traceback" not in err


@pytest.mark.slow
def test_merge_refuses_what_does_not_belong_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run("mqar", tmp_path / "a")
    _run("mqar", tmp_path / "b")
    _run("mqar", tmp_path / "c", "--first-seed", "1", "--steps", "3")
    capsys.readouterr()
    cases = {
        (str(tmp_path / "a"), str(tmp_path / "b")): "mqar seed 0 is also in",
        (str(tmp_path / "a"), str(tmp_path / "c")): "trained with steps = 3, but this command has steps = 2",
        (str(tmp_path / "a"), str(tmp_path / "missing")): "no such file",
    }
    for folders, message in cases.items():
        assert main(["experiment", "mqar", *TINY, *CASES["mqar"][0], "--out", str(tmp_path / "m"), "--merge", *folders]) == 2
        err = capsys.readouterr().err
        assert message.replace("mqar seed", "hydra seed") in err and "Traceback" not in err, err
    # Another task (other pairs) is refused by its no-skill baselines and models, not joined into a wrong table.
    assert main(["experiment", "mqar", *TINY, "--pairs", "3", "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "a")]) == 2
    assert "differ" in capsys.readouterr().err
    # Another training task with the same evaluation (E1 trained on the last HOP only) is refused by its recorded task.
    _run("logic-chains", tmp_path / "last", "--last-hop-only")
    capsys.readouterr()
    assert main(["experiment", "logic-chains", *TINY, *CASES["logic-chains"][0], "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "last")]) == 2
    assert "other supervise_every_hop (supervise_every_hop=False; this command: supervise_every_hop=True)" in capsys.readouterr().err
    # Another curriculum (E4 with and without its warm-up task) is refused by the recorded settings.
    _run("distant-premise", tmp_path / "warm")
    capsys.readouterr()
    assert main(["experiment", "distant-premise", *TINY, *CASES["distant-premise"][0], "--easy-steps", "0", "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "warm")]) == 2
    assert "trained with curriculum = [{'name': 'easy'" in capsys.readouterr().err
    assert main(["experiment", "distant-premise", "--steps", "10", "--easy-steps", "10"]) == 2
    assert "--easy-steps must be at least 0 and below --steps (10) in all, got 10" in capsys.readouterr().err
    assert main(["experiment", "mqar", "--first-seed", "-1"]) == 2
    assert "--first-seed must be 0 or more" in capsys.readouterr().err


def test_warmup_stages_split_the_easy_steps_and_restore_the_task() -> None:
    from types import SimpleNamespace

    from hydra_kit.data import LogicChains
    from hydra_kit.experiments import warmup
    from hydra_kit.experiments.logic_chains import EASY_TASKS
    from hydra_kit.recipe import RecipeError

    task = LogicChains(num_nodes=32, max_hops=4, seq_len=130, supervise_every_hop=True)
    settings = SimpleNamespace(steps=1000, curriculum=[])
    assert warmup.set_stages("logic-chains", settings, None, 0.4, task, *EASY_TASKS) == 400
    assert [(s["name"], s["at_step"]) for s in settings.curriculum] == [("easy 1", 0), ("easy 2", 200), ("logic chains", 400)]
    assert settings.curriculum[-1]["data"] == task.params()
    assert warmup.set_stages("logic-chains", settings, 0, 0.4, task, *EASY_TASKS) == 0 and settings.curriculum == []
    with pytest.raises(RecipeError, match="--easy-steps must be at least 0 and below --steps"):
        warmup.set_stages("logic-chains", settings, 1000, 0.4, task, *EASY_TASKS)
    # one count per stage: the stages start at the running sums
    assert warmup.set_stages("logic-chains", settings, [300, 100], 0.4, task, *EASY_TASKS) == 400
    assert [(s["name"], s["at_step"]) for s in settings.curriculum] == [("easy 1", 0), ("easy 2", 300), ("logic chains", 400)]
    with pytest.raises(RecipeError, match=r"below --steps \(1000\) in all, got 900 \+ 100"):
        warmup.set_stages("logic-chains", settings, [900, 100], 0.4, task, *EASY_TASKS)
    with pytest.raises(RecipeError, match=r"takes one number .* or 2, one per task; got 3"):
        warmup.set_stages("logic-chains", settings, [1, 2, 3], 0.4, task, *EASY_TASKS)
    # Rehearsal: only the stage after the warm-up keeps a share of batches on the last warm-up task.
    warmup.set_stages("logic-chains", settings, [300, 100], 0.4, task, *EASY_TASKS, rehearse=0.25)
    assert [s.get("rehearse") for s in settings.curriculum] == [None, None, 0.25]
    with pytest.raises(RecipeError, match=r"--rehearse must be at least 0 and below 1, got 1\.0"):
        warmup.set_stages("logic-chains", settings, [300, 100], 0.4, task, *EASY_TASKS, rehearse=1.0)
    # The stages are cumulative, and each is checked as it will be in force: 8 hops need chains of 16 nodes.
    with pytest.raises(RecipeError, match=r"warm-up task \{'max_hops': 8, 'chain_len': 4\} is not valid.*chain_len"):
        warmup.set_stages("logic-chains", settings, 10, 0.4, task, {"max_hops": 8}, {"chain_len": 4})


def test_table_titles_count_seeds_per_model_when_models_differ() -> None:
    from hydra_kit.experiments.report import seeds_phrase

    records = [{"model": "hydra", "seed": s, "hops": h} for s in (0, 1) for h in (1, 2)] + [{"model": "transformer", "seed": s} for s in (0, 1, 2)]
    assert seeds_phrase(records) == "seeds per model: hydra 2, transformer 3"
    assert seeds_phrase([r for r in records if r["model"] == "transformer"]) == "3 seeds"
    assert seeds_phrase([records[0]]) == "1 seed"


def test_experiments_train_with_the_trainer_defaults_of_every_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra_kit.config import trainer as trainer_config
    from hydra_kit.data import MQAR
    from hydra_kit.experiments import runner
    from hydra_kit.experiments.models import ModelSpec

    built = []

    def spy(**overrides):  # type: ignore[no-untyped-def]
        built.append(trainer_config.build_trainer(**overrides))
        return built[-1]

    monkeypatch.setattr(runner, "build_trainer", spy)
    task = MQAR(num_pairs=2, num_queries=2, num_keys=8, num_values=8)
    spec = ModelSpec("tiny", {"vocab_size": task.vocab_size, "d_model": 16, "n_blocks": 1, "components": {"mlp": {"component": "mlp"}}})
    trained = runner.train(spec, task, 0, runner.TrainSettings(steps=2, batch_size=2))
    (trainer,) = built
    assert trainer.gradient_clip_val == trainer_config.TRAINER_DEFAULTS["gradient_clip_val"] and trainer.max_steps == 2
    assert trainer.logger is None and not trainer.checkpoint_callbacks and trainer.global_step == 2
    assert trained.final_loss is not None and math.isfinite(trained.final_loss)


@pytest.mark.slow
def test_killed_experiment_continues_from_its_checkpoints_as_if_never_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL mid-training, the same command again: the runs continue and end where an uninterrupted experiment ends."""
    import os
    import subprocess

    import torch
    from support import HYDRA_KIT, kill_once_written

    from hydra_kit.experiments.runner import checkpoint_folder

    # 40 steps with a warm-up stage: a checkpoint every 2 steps, and the curriculum's state is part of what resumes.
    options = [*TINY, *CASES["logic-chains"][0], "--steps", "40", "--easy-steps", "10", "--models", "hydra"]
    straight = _run("logic-chains", tmp_path / "straight", *options[len(TINY):])
    killed = tmp_path / "killed"
    last = checkpoint_folder(killed, "hydra", 0) / "last.ckpt"
    proc = subprocess.Popen(
        [*HYDRA_KIT, "experiment", "logic-chains", *options, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    kill_once_written(proc, last)
    interrupted_at = torch.load(last, weights_only=True)["global_step"]
    assert interrupted_at < 40, "the run finished before it could be killed; the test proves nothing"
    assert not (killed / "logic_chains.json").exists()
    capsys.readouterr()
    resumed = _run("logic-chains", killed, *options[len(TINY):])
    printed = " ".join(capsys.readouterr().out.split())
    assert "hydra continues from" in printed
    assert "hydra step 36 of 40, train loss" in printed  # a line of progress every tenth of the run
    assert resumed["records"] == straight["records"]
    assert [r["final_train_loss"] for r in resumed["runs"]] == [r["final_train_loss"] for r in straight["runs"]]
    a = torch.load(checkpoint_folder(tmp_path / "straight", "hydra", 0) / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=f"{key} differs after the resumed run")
    # A finished run is evaluated again, not retrained; another setting in the same folder is refused by name.
    again = _run("logic-chains", killed, *options[len(TINY):])
    assert again["records"] == straight["records"] and again["runs"][0]["final_train_loss"] == straight["runs"][0]["final_train_loss"]
    capsys.readouterr()
    assert main(["experiment", "logic-chains", *options, "--steps", "30", "--out", str(killed)]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint_folder(killed, 'hydra', 0)} holds the checkpoint of a run with another steps" in " ".join(err.split()) and "Traceback" not in err
