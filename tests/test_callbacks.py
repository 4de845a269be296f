"""Curriculum, KnockOut and Throughput callbacks: stage validation, exact stage effects per step, kill-and-resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from support import HYDRA_KIT, quick_recipe, run_cli

from hydra_kit.callbacks import Curriculum, KnockOut, Throughput, instance_parameters
from hydra_kit.data import MQAR, SyntheticDataModule
from hydra_kit.model import HydraLM
from hydra_kit.recipe import RecipeError

COMPONENTS = {
    "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 8, "headdim": 16, "chunk_size": 8}},
    "sga": {"component": "sga", "blocks": [1], "args": {"n_heads": 2, "window": 4, "max_global": 4}},
    "router": {"component": "router", "blocks": "all"},
    "mlp": {"component": "mlp", "blocks": "all"},
}


def tiny_model() -> HydraLM:
    return HydraLM(vocab_size=72, d_model=32, n_blocks=2, components=COMPONENTS, warmup_steps=2)


def datamodule(pairs: int = 4) -> SyntheticDataModule:
    return SyntheticDataModule(MQAR(num_pairs=pairs, num_queries=pairs), batch_size=4, train_size=4096, val_size=8)


def trainer(tmp_path: Path, callbacks: list[L.Callback], steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path,
    )  # fmt: skip


class Probe(L.Callback):
    """Records, at the start of every training batch (after the curriculum ran), what the stages control."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        group = trainer.optimizers[0].param_groups[0]
        self.rows.append(
            {
                "step": trainer.global_step,
                "off": set().union(*(b.knocked_out for b in pl_module.blocks)),
                "mlp_trainable": all(p.requires_grad for p in instance_parameters(pl_module, "mlp")),
                "seq_len": batch["input_ids"].shape[1],
                "lr_ratio": group["lr"] / (pl_module.hparams["lr"] * scheduler.lr_lambdas[0](trainer.global_step)),
                "sga": [p.detach().clone() for p in instance_parameters(pl_module, "sga")],
                "mlp": [p.detach().clone() for p in instance_parameters(pl_module, "mlp")],
            }
        )


STAGES = [
    {"name": "backbone", "at_step": 0, "disable": ["sga"], "data": {"num_pairs": 2, "num_queries": 2}},
    {"name": "attention", "at_step": 4, "enable": ["sga"], "freeze": ["mlp"], "data": {"num_pairs": 3, "num_queries": 3}, "lr_scale": 0.5},
    {"name": "thaw", "at_step": 8, "unfreeze": ["mlp"], "data": {"num_pairs": 4}},
]


@pytest.mark.slow
def test_curriculum_changes_exactly_what_its_stages_say_at_their_steps(tmp_path):
    probe = Probe()
    curriculum = Curriculum(STAGES)
    trainer(tmp_path, [curriculum, probe], 12).fit(tiny_model(), datamodule=datamodule(pairs=4))
    rows = probe.rows
    assert [r["step"] for r in rows] == list(range(12))
    assert [r["off"] for r in rows] == [{"sga"}] * 4 + [set()] * 8
    assert [r["mlp_trainable"] for r in rows] == [True] * 4 + [False] * 4 + [True] * 4
    # The batch of step N was loaded before the stage was reached at step N: the change reaches step N+1.
    assert [r["seq_len"] for r in rows] == [7] * 5 + [10] * 4 + [12] * 3
    for row in rows:
        assert row["lr_ratio"] == pytest.approx(1.0 if row["step"] < 4 else 0.5, rel=1e-9), row["step"]
    # Knocked-out sga is not trained while off; frozen mlp does not move while frozen; both move otherwise.
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    assert same(rows[0]["sga"], rows[4]["sga"]) and not same(rows[4]["sga"], rows[6]["sga"])
    assert same(rows[4]["mlp"], rows[8]["mlp"]) and not same(rows[8]["mlp"], rows[10]["mlp"])
    assert not same(rows[0]["mlp"], rows[4]["mlp"])
    assert curriculum.stage_index == 2 and curriculum.state_dict()["position"] == 3


@pytest.mark.slow
def test_rehearsal_draws_a_share_of_batches_from_the_previous_task_and_resumes_exactly(tmp_path):
    stages = [{"at_step": 0, "data": {"num_pairs": 2, "num_queries": 2}}, {"at_step": 4, "data": {"num_pairs": 4, "num_queries": 4}, "rehearse": 0.5}]
    probe = Probe()
    data = datamodule(pairs=4)
    trainer(tmp_path, [Curriculum(stages), probe], 12).fit(tiny_model(), datamodule=data)
    # The change reaches step 5 (example 20); from there every second batch (1, 3, 5 of the segment) is rehearsed.
    assert [r["seq_len"] for r in probe.rows] == [7] * 5 + [13, 7, 13, 7, 13, 7, 13]
    state = data.state_dict()
    assert state["rehearsals"] == [(20, {"num_pairs": 2, "num_queries": 2}, 0.5, 4)]
    assert data.task.params() == {"num_pairs": 4, "num_queries": 4}  # validation follows the stage's own task
    resumed = datamodule(pairs=4)
    resumed.load_state_dict(state)
    tasks = lambda d: [d.schedule.task_for(n).params() for n in range(0, 80, 4)]  # noqa: E731
    assert tasks(resumed) == tasks(data)
    # Reached again (as on resume, at fit start), the same stage changes nothing: no new segment.
    data.set_task_params({"num_pairs": 4, "num_queries": 4}, rehearse=({"num_pairs": 2, "num_queries": 2}, 0.5))
    assert len(data.schedule.segments) == 3
    with pytest.raises(ValueError, match=r"rehearsed share of batches must be in \(0, 1\), got 0"):
        data.set_task_params({"num_pairs": 3}, rehearse=({"num_pairs": 2}, 0))


@pytest.mark.slow
def test_metric_trigger_ignores_values_logged_before_the_previous_stage(tmp_path):
    class Log(L.Callback):  # a metric that is high from the start: only values logged after stage 0 may count
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.callback_metrics["train/fake"] = torch.tensor(1.0)

    probe = Probe()
    stages = [{"at_step": 3, "disable": ["sga"]}, {"when": {"metric": "train/fake", "above": 0.5}, "enable": ["sga"]}]
    trainer(tmp_path, [Log(), Curriculum(stages), probe], 6).fit(tiny_model(), datamodule=datamodule())
    # stage 0 at step 3; the value read after batch 3 (logged under stage 0) reaches stage 1 at step 4
    assert [r["off"] for r in probe.rows] == [set()] * 3 + [{"sga"}] + [set()] * 2


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "stages must be a non-empty list"),
        ([{"enable": ["sga"]}], r"stage 0: needs a trigger: at_step"),
        ([{"at_step": 0, "enabel": ["sga"]}], r"stage 0: unknown key\(s\) 'enabel'; valid: name, at_step, when, enable"),
        ([{"at_step": -1}], "at_step must be an integer >= 0, got -1"),
        ([{"when": {"metric": "val/acc"}}], "when needs exactly one of above/below"),
        ([{"when": {"metric": "val/acc", "over": 1}}], r"when must be \{metric: NAME, above: VALUE\}"),
        ([{"at_step": 0, "enable": ["sga"], "disable": ["sga"]}], r"\['sga'\] both in enable and disable"),
        ([{"at_step": 0, "lr_scale": 0}], "lr_scale must be a positive number, got 0"),
        ([{"at_step": 5}, {"at_step": 2}], "stages out of order: stage 1 at_step 2 comes after stage 0 at_step 5"),
        ([{"at_step": 0, "freeze": "mlp"}], "freeze must be a list of component instance names"),
        ([{"at_step": 0, "rehearse": 0.25}], "rehearse keeps a share of batches on the task before this stage's data change, but the stage has no data"),
        ([{"at_step": 0, "data": {"num_pairs": 2}, "rehearse": 1}], r"rehearse must be a fraction of batches in \(0, 1\), got 1"),
    ],
)
def test_bad_stage_specs_are_explained(stages, message):
    with pytest.raises(RecipeError, match=message):
        Curriculum(stages)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"at_step": 0, "disable": ["pkm"]}, r"stage 0: disable: unknown component instance\(s\) \['pkm'\]; instances: mlp, sga, ssm"),
        ({"at_step": 0, "disable": ["router"]}, "the router cannot be disabled; freeze it instead"),
        ({"at_step": 0, "data": {"num_keys": 8}}, r"stage 0: data: MQAR cannot change 'num_keys'; adjustable: num_pairs, num_queries"),
        ({"at_step": 0, "data": {"num_queries": 9}}, r"stage 0: data \{'num_queries': 9\} is not a valid MQAR: MQAR: num_queries must lie in 1..num_pairs \(4\)"),
    ],
)
def test_stages_are_checked_against_model_and_data_before_training(tmp_path, stage, message):
    probe = Probe()
    with pytest.raises(RecipeError, match=message):
        trainer(tmp_path, [Curriculum([stage]), probe], 2).fit(tiny_model(), datamodule=datamodule())
    assert probe.rows == []  # nothing trained


def test_knockout_switches_off_for_validation_only_and_throughput_counts_tokens(tmp_path):
    model, data = tiny_model(), datamodule()
    throughput = Throughput(warmup_batches=0)
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[throughput], limit_val_batches=2)
    base = t.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    seen: list[set[str]] = []

    class Spy(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append(set(pl_module.blocks[1].knocked_out))

    t2 = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[KnockOut(["sga"]), Spy()], limit_val_batches=2)
    off = t2.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    assert seen == [{"sga"}, {"sga"}] and model.blocks[1].knocked_out == set()
    assert off != base
    assert throughput.tokens_per_s("val") > 0 and throughput._acc["val"][4] == 8 * 13  # 8 examples of 13 tokens


def _curriculum_recipe(tmp_path: Path, name: str) -> Path:
    path = quick_recipe(tmp_path, name, d_model=32)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["init_args"].update(batch_size=4, val_size=16)
    recipe["trainer"].update(val_check_interval=100, num_sanity_val_steps=0)
    recipe["trainer"]["callbacks"] = [
        {
            "class_path": "hydra_kit.callbacks.Curriculum",
            "init_args": {
                "stages": [
                    {"name": "backbone", "at_step": 0, "disable": ["sga"], "data": {"num_pairs": 2, "num_queries": 2}},
                    {"name": "attention", "at_step": 4, "enable": ["sga"], "data": {"num_pairs": 3, "num_queries": 3}, "lr_scale": 0.5},
                    {"name": "full", "at_step": 30, "data": {"num_pairs": 4, "num_queries": 4}, "freeze": ["ssm"]},
                ]
            },
        }
    ]
    path.write_text(yaml.safe_dump(recipe))
    return path


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["global_step"])
    except Exception:  # not written yet
        return -1


@pytest.mark.slow
def test_curriculum_survives_sigkill_and_resume(tmp_path):
    # Stage 2 comes 24 steps after the kill point: a window no scheduler hiccup or fast machine can jump over.
    steps = ["--trainer.max_steps", "36", "--last_checkpoint.every_n_train_steps", "2"]
    straight = _curriculum_recipe(tmp_path, "straight")
    done = run_cli("fit", "--config", str(straight), *steps, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _curriculum_recipe(tmp_path, "killed")
    proc = subprocess.Popen([*HYDRA_KIT, "fit", "--config", str(killed), *steps], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while _step(last) < 6 and time.time() < deadline and proc.poll() is None:  # past stage 1, before stage 2
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = torch.load(last, weights_only=True)
    interrupted_at = checkpoint["global_step"]
    assert 6 <= interrupted_at < 30, f"killed at step {interrupted_at}: outside the window the test needs"
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("Curriculum"))
    assert state["position"] == 2  # stages 0 and 1 reached
    resumed = run_cli("fit", "--config", str(killed), *steps, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "Restored all states" in output
    assert re.findall(r"curriculum: stage (\d)", output) == ["2"], output[-3000:]  # only the stage still ahead
    assert "stage 2 ('full') reached at step 30" in " ".join(output.split())
    a = torch.load(tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 36
    # The same stages, the same recorded data schedule, the same learning rates as the uninterrupted run ...
    assert a["callbacks"]["Curriculum"] == b["callbacks"]["Curriculum"]
    assert a["SyntheticDataModule"] == b["SyntheticDataModule"]
    assert a["SyntheticDataModule"]["task_schedule"] == [(0, {"num_pairs": 2, "num_queries": 2}), (20, {"num_pairs": 3, "num_queries": 3}), (124, {"num_pairs": 4, "num_queries": 4})]
    assert [g["lr"] for g in a["optimizer_states"][0]["param_groups"]] == [g["lr"] for g in b["optimizer_states"][0]["param_groups"]]
    # ... and the same weights. Usually bit for bit; CPU kernels in two processes have been seen to round one ulp
    # apart (7e-8), so allow 1e-6: one step on another batch, stage or learning rate moves weights by ~1e-3.
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def test_bad_stage_in_a_recipe_is_reported_with_the_file_and_no_traceback(tmp_path, capsys):
    from hydra_kit.cli import main

    path = quick_recipe(tmp_path, "badstage")
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"]["callbacks"] = [{"class_path": "hydra_kit.callbacks.Curriculum", "init_args": {"stages": [{"at_step": 0, "disabel": ["sga"]}]}}]
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--config", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "badstage.yaml: trainer.callbacks[0]: Curriculum: stage 0: unknown key(s) 'disabel'; valid: name, at_step" in err


@pytest.mark.slow
def test_best_checkpoint_is_the_best_of_the_current_stage(tmp_path):
    """A harder stage has a higher validation loss: "best" must start over there, not stay in the easy stage."""
    stages = [{"at_step": 0, "data": {"num_pairs": 1, "num_queries": 1}}, {"at_step": 20, "data": {"num_pairs": 6, "num_queries": 6}}]
    from hydra_kit.checkpoint import StageCheckpoint

    best = StageCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1, filename="best-{step}")
    torch.manual_seed(0)
    trainer_ = L.Trainer(
        max_steps=40, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, val_check_interval=10, limit_val_batches=2, callbacks=[Curriculum(stages), best],
    )  # fmt: skip
    trainer_.fit(tiny_model(), datamodule())
    files = sorted(p.name for p in tmp_path.glob("best-step=*.ckpt"))
    # Validations at steps 10 and 20 ran on the 1-pair task, 30 and 40 on the 6-pair one; the easy stage's best
    # file stays on disk, the tracked best is from the last stage.
    assert re.search(r"best-step=(30|40)\.ckpt$", best.best_model_path), (best.best_model_path, files)
    assert any(re.fullmatch(r"best-step=(10|20)\.ckpt", f) for f in files), files


def test_schedule_follows_the_param_groups_scale_and_reads_old_scaled_base_rates_once():
    """HydraLM's schedule multiplies each group's rate by its ``curriculum_lr_scale``; a scheduler state saved when
    the curriculum scaled the base rates themselves (a plain LambdaLR) loads without scaling twice."""
    from hydra_kit.optim import LR_SCALE_KEY, ScaledLambdaLR

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)

    shape = lambda step: 1.0 / (step + 1)  # noqa: E731
    opt = optimizer()
    scheduler = ScaledLambdaLR(opt, shape)
    opt.param_groups[0][LR_SCALE_KEY] = 0.5
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * shape(1))
    assert scheduler.lr_lambdas[0](1) == shape(1)  # the shape alone: the scale lives in the param group
    # As saved before: base rates already scaled by 0.5, and the group holding the scale 0.5 as well.
    old_opt = optimizer()
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, shape)
    old.base_lrs = [0.5]
    old_opt.param_groups[0][LR_SCALE_KEY] = 0.5
    restored_opt = optimizer()
    restored_opt.load_state_dict(old_opt.state_dict())
    restored = ScaledLambdaLR(restored_opt, shape)
    restored.load_state_dict(old.state_dict())
    restored_opt.step()
    restored.step()
    assert restored_opt.param_groups[0]["lr"] == pytest.approx(0.5 * shape(1))


def test_a_checkpoint_that_cannot_follow_the_stages_is_named_at_setup(tmp_path):
    from hydra_kit.callbacks import StageAware
    from hydra_kit.checkpoint import StageCheckpoint

    plain = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/loss")
    staged = StageCheckpoint(dirpath=tmp_path / "staged", monitor="val/loss")
    assert isinstance(staged, StageAware) and not isinstance(plain, StageAware)
    curriculum = Curriculum([{"at_step": 2, "disable": ["sga"]}])
    t = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[curriculum, plain, staged], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"Curriculum: ModelCheckpoint\(monitor='val/loss'\) keeps one best checkpoint across stages") as caught:
        curriculum.setup(t, tiny_model(), "fit")
    assert not any("StageCheckpoint(" in str(w.message) for w in caught)
