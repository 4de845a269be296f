"""`hydra-kit ablate`: dropped instances do not exist, ablated checkpoints reload, the table comes from real runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from support import quick_recipe, run_cli

from hydra_kit.cli import main
from hydra_kit.model import HydraLM

COMPONENTS = {
    "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 8, "headdim": 16, "chunk_size": 8}},
    "sga": {"component": "sga", "blocks": [1], "args": {"n_heads": 2, "window": 4, "max_global": 4}},
    "router": {"component": "router", "blocks": "all"},
    "mlp": {"component": "mlp", "blocks": "all"},
}


def test_dropped_instance_has_no_parameters_flops_or_optimizer_state():
    full = HydraLM(vocab_size=72, d_model=32, n_blocks=2, components=COMPONENTS)
    ablated = HydraLM(vocab_size=72, d_model=32, n_blocks=2, components=COMPONENTS, dropped=["sga"])
    assert any(".sga." in n for n, _ in full.named_parameters())
    assert not any("sga" in n for n, _ in ablated.named_parameters())
    full_report, report = full.parameter_report(64), ablated.parameter_report(64)
    assert "sga" not in report["components"]
    # sga's own parameters, its LayerScale g, and the router's gate column for it (weights d_model + bias)
    assert full_report["total_params"] - report["total_params"] == full_report["components"]["sga"]["total_params"] + 1 + 33
    assert report["flops_per_token"] < full_report["flops_per_token"]
    optimizer = ablated.configure_optimizers()["optimizer"]
    in_optimizer = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert in_optimizer == report["total_params"]
    # the router's gates are sized for what the block holds: one gate fewer in block 1
    assert ablated.blocks[1].gate_index.keys() == {"mlp"} and full.blocks[1].gate_index.keys() == {"sga", "mlp"}


def test_unknown_drop_lists_the_instances(tmp_path, capsys):
    recipe = quick_recipe(tmp_path)
    assert main(["ablate", "--drop", "pkm", "--config", str(recipe), "--out", str(tmp_path / "a")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown component instance(s) ['pkm']; instances of" in err and "mlp, router, sga, ssm" in err
    assert not (tmp_path / "a").exists()  # nothing ran


def test_knockout_mode_needs_a_checkpoint(tmp_path, capsys):
    assert main(["ablate", "--mode", "knockout", "--drop", "sga"]) == 2
    assert "--mode knockout needs --ckpt_path" in capsys.readouterr().err


@pytest.mark.slow
def test_ablate_table_from_real_runs_then_knockout_of_its_checkpoint(tmp_path, capsys):
    recipe = quick_recipe(tmp_path, d_model=32)
    out = tmp_path / "ablate"
    steps = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--data.init_args.val_size", "16"]
    result = run_cli("ablate", "--drop", "sga", "--config", str(recipe), "--out", str(out), *steps, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "drop-sga" in result.stdout and "Δ loss" in result.stdout
    rows = list(csv.DictReader(open(out / "ablate.csv")))
    assert [(r["label"], r["dropped"]) for r in rows] == [("full", ""), ("drop-sga", "sga")]
    report = json.loads((out / "ablate.json").read_text())
    full, drop = report["runs"]
    assert full["total_params"] > drop["total_params"] and full["active_params"] > drop["active_params"]
    assert rows[1]["delta_total_params"] == str(float(drop["total_params"] - full["total_params"]))
    assert float(rows[1]["delta_val_loss"]) == pytest.approx(drop["val_loss"] - full["val_loss"])
    for run in (full, drop):
        assert run["tokens_per_s"] > 0 and 0 <= run["val_acc"] <= 1 and run["val_loss"] > 0
    # The ablated run's checkpoint reloads as the smaller model, with its drop in the hyper-parameters.
    reloaded = HydraLM.load_from_checkpoint(drop["checkpoint"], map_location="cpu", weights_only=True)
    assert reloaded.hparams["dropped"] == ["sga"]
    assert sum(p.numel() for p in reloaded.parameters()) == drop["total_params"]
    assert not any("sga" in n for n in torch.load(drop["checkpoint"], weights_only=True)["state_dict"])

    # Knock-out mode on the full run's checkpoint: same weights, sga switched off at evaluation only.
    ko_out = tmp_path / "knockout"
    result = run_cli("ablate", "--mode", "knockout", "--ckpt_path", full["checkpoint"], "--drop", "sga", "--out", str(ko_out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((ko_out / "ablate.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["full", "knockout-sga"]
    as_is, knocked = runs
    assert as_is["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)  # the same weights on the same held-out data
    assert knocked["total_params"] == as_is["total_params"] and knocked["active_params"] < as_is["active_params"]
    assert knocked["val_loss"] != as_is["val_loss"]
    assert main(["ablate", "--mode", "knockout", "--ckpt_path", full["checkpoint"], "--drop", "router"]) == 2
    assert "routers ['router'] cannot be knocked out: drop them in --mode train" in " ".join(capsys.readouterr().err.split())


def test_ablation_callback_in_a_recipe_drops_before_the_model_is_built(tmp_path):
    import yaml

    from hydra_kit.callbacks import Ablation
    from hydra_kit.config.lightning import HydraCLI

    path = quick_recipe(tmp_path, "ablated")
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"]["callbacks"] = [{"class_path": "hydra_kit.callbacks.Ablation", "init_args": {"drop": ["sga"]}}]
    path.write_text(yaml.safe_dump(recipe))
    cli = HydraCLI(args=["--config", str(path)], run=False)
    assert cli.model.hparams["dropped"] == ["sga"]
    assert not any("sga" in n for n, _ in cli.model.named_parameters())
    assert any(isinstance(c, Ablation) for c in cli.trainer.callbacks)
    with pytest.raises(Exception, match=r"Ablation: instance\(s\) \['sga'\] still have parameters"):
        Ablation(["sga"]).setup(cli.trainer, HydraLM(vocab_size=72, d_model=32, n_blocks=2, components=COMPONENTS), "fit")


def test_knockout_recipe_from_a_saved_run_config_drops_subcommand_options(tmp_path, capsys):
    # A run's config.yaml is a `fit` configuration: it holds ckpt_path and weights_only, which the single-run CLI
    # of knockout mode refused ("Option 'weights_only' is not accepted").
    from hydra_kit.ablate import recipe_from_run
    from hydra_kit.checkpoint import AtomicCheckpointIO
    from hydra_kit.config.lightning import HydraCLI

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(quick_recipe(tmp_path)), "--print_config"])
    assert exit_info.value.code == 0
    saved = tmp_path / "runs" / "quick" / "version_0" / "config.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text(capsys.readouterr().out)
    assert "weights_only:" in saved.read_text() and "ckpt_path:" in saved.read_text()
    recipe = recipe_from_run(saved, tmp_path / "out")
    cli = HydraCLI(args=["--config", recipe], run=False)  # what knockout mode builds its data and trainer from
    assert cli.datamodule.task.num_pairs == 4 and isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_one_seed_has_no_spread_in_ablate_and_the_experiments_alike():
    import math

    from hydra_kit.ablate import RunResult, summarise
    from hydra_kit.experiments import report
    from hydra_kit.reporting import fmt, mean_spread

    assert mean_spread([0.5])[0] == 0.5 and math.isnan(mean_spread([0.5])[1])
    assert mean_spread([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    runs = [RunResult("full", [], 0, 1.0, 0.5, 100.0, 10, 10), RunResult("drop-sga", ["sga"], 0, 1.5, 0.25, 120.0, 8, 8)]
    ablation = summarise(runs)
    experiment = report.summarise([{"model": "m", "level": 1, "seed": 0, "accuracy": 0.5}], ("model", "level"), ("accuracy",))
    assert math.isnan(ablation[0]["val_acc_std"]) and math.isnan(ablation[1]["delta_val_loss_std"])
    assert math.isnan(experiment[0]["accuracy_std"])
    assert ablation[1]["delta_val_loss"] == 0.5 and fmt(ablation[1]["delta_val_loss"], ablation[1]["delta_val_loss_std"], ".4f", signed=True) == "+0.5000"
    assert math.isnan(ablation[1]["delta_val_loss_p"])  # one seed: no paired test
    # From two seeds on each delta carries the p of its paired t.
    two = [*runs, RunResult("full", [], 1, 1.1, 0.5, 100.0, 10, 10), RunResult("drop-sga", ["sga"], 1, 1.7, 0.25, 120.0, 8, 8)]
    paired = summarise(two)[1]
    assert paired["delta_val_loss"] == pytest.approx(0.55) and 0.0 < paired["delta_val_loss_p"] < 0.1
    assert report.above(0.9, experiment[0]["accuracy_std"], 0.5, 500) == "yes"  # nothing subtracted for one seed
