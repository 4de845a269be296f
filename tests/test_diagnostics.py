"""Per-block diagnostics (issue 32): the model's diagnostics forward, the Diagnostics callback, the CLI's defaults."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from support import quick_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hydra_kit.callbacks import Diagnostics
from hydra_kit.data import MQAR, SyntheticDataModule
from hydra_kit.model import HydraLM
from hydra_kit.protocol import ComponentContext, RouterComponent
from hydra_kit.registry import default_registry

# Every first-party mechanism that reports diagnostics, small enough for a CPU test.
COMPONENTS = {
    "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 8, "headdim": 16, "chunk_size": 8}},
    "sga": {"component": "sga", "blocks": [1], "args": {"n_heads": 2, "window": 4, "max_global": 4}},
    "moe": {"component": "moe", "blocks": [0], "args": {"n_experts": 4, "top_k": 2, "expert_hidden": 32}},
    "workspace": {"component": "workspace", "blocks": [1], "args": {"n_slots": 4, "chunk_size": 4}},
    "pkm": {"component": "pkm", "blocks": [0], "args": {"heads": 2, "n_keys": 8, "top_k": 4, "d_key": 16}},
    "router": {"component": "router", "blocks": "all"},
}


def tiny_model() -> HydraLM:
    return HydraLM(vocab_size=72, d_model=32, n_blocks=2, components=COMPONENTS, warmup_steps=2)


@pytest.mark.slow
def test_diagnostics_forward_is_per_block_and_changes_nothing_else():
    torch.manual_seed(0)
    model = tiny_model()
    ids = torch.randint(0, 72, (3, 17))
    plain, diagnosed = model(ids), model(ids, diagnostics=True)
    assert plain.diagnostics == []
    torch.testing.assert_close(diagnosed.logits, plain.logits, rtol=0, atol=0)
    assert set(plain.stats) <= set(diagnosed.stats)  # the averaged stats keep their keys
    block0, block1 = diagnosed.diagnostics
    assert set(block0) == {"router", "ssm", "moe", "pkm"} and set(block1) == {"router", "ssm", "sga", "workspace"}
    for block in (block0, block1):
        assert {"layerscale", "update_rel_norm"} <= set(block["ssm"]) and "gate_mean" not in block["ssm"]  # the SSM is not gated
    assert {"gate_mean", "gate", "load_e0", "load_e3", "router_entropy"} <= set(block0["moe"])
    assert {"usage_frac", "usage_kl", "usage_entropy"} <= set(block0["pkm"])
    assert {"global_attn_share", "global_salience"} <= set(block1["sga"])
    assert {"write_gate", "read_entropy", "slot_usage"} <= set(block1["workspace"])
    assert block1["router"].keys() == {"gate_sga", "gate_workspace"}
    assert block1["sga"]["gate"].shape == (3 * 17,)  # every gate r of the batch, for the histogram
    torch.testing.assert_close(block1["sga"]["gate_mean"], block1["sga"]["gate"].mean())
    torch.testing.assert_close(block1["sga"]["gate_mean"], block1["router"]["gate_sga"])
    torch.testing.assert_close(block0["pkm"]["usage_entropy"], math.log(64) - block0["pkm"]["usage_kl"])
    # Not averaged: each block's own SSM LayerScale, which training moves apart.
    with torch.no_grad():
        model.blocks[1].layerscale["ssm"].fill_(0.25)
    again = model(ids, diagnostics=True).diagnostics
    assert float(again[1]["ssm"]["layerscale"]) == 0.25 and float(again[0]["ssm"]["layerscale"]) != 0.25


def test_relative_update_norm_is_the_share_of_the_residual_stream_written():
    torch.manual_seed(0)
    model = tiny_model()
    ids = torch.randint(0, 72, (2, 12))
    block = model.tri_path_blocks[0]
    seen = {}
    block.mixers["ssm"].register_forward_hook(lambda m, args, out: seen.update(u=out.update))
    block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    diag = model(ids, diagnostics=True).diagnostics[0]["ssm"]
    expected = (block.layerscale["ssm"] * seen["u"]).norm() / seen["x"].norm()  # ungated: g * update
    torch.testing.assert_close(diag["update_rel_norm"], expected.detach())


@pytest.mark.parametrize("name", sorted(n for n in default_registry(third_party=False).names()))
def test_asking_for_diagnostics_never_changes_update_or_state(name):
    entry = default_registry(third_party=False).entries[name]
    if issubclass(entry.cls, RouterComponent):
        pytest.skip("routers are called through route(), which diagnostics do not reach")
    torch.manual_seed(0)
    module = entry.cls(16, 0, **entry.cls.example_init_args)
    x, score = torch.randn(2, 37, 16), torch.randn(2, 37)
    plain = module(x, ComponentContext(global_score=score))
    diagnosed = module(x, ComponentContext(global_score=score, diagnostics=True))
    torch.testing.assert_close(diagnosed.update, plain.update, rtol=0, atol=0)
    assert set(plain.stats) <= set(diagnosed.stats)
    assert all(v.dim() == 0 and not v.requires_grad for v in diagnosed.stats.values())


def _events(log_dir: str) -> EventAccumulator:
    files = list(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    events = EventAccumulator(str(Path(log_dir)), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_callback_logs_per_block_keys_only_on_logging_steps(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path), name="diag", default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=7, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Diagnostics(every_n_steps=3)],
    )  # fmt: skip
    model = tiny_model()
    trainer.fit(model, datamodule=SyntheticDataModule(MQAR(num_pairs=4, num_queries=4), batch_size=4, train_size=4096, val_size=8))
    events = _events(logger.log_dir)
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    expected = {
        "diag/block0.moe/gate_mean", "diag/block0.moe/layerscale", "diag/block0.moe/update_rel_norm", "diag/block0.moe/grad_norm",
        "diag/block0.moe/load_e0", "diag/block0.moe/router_entropy", "diag/block0.pkm/usage_entropy", "diag/block0.ssm/grad_norm",
        "diag/block1.sga/global_attn_share", "diag/block1.sga/grad_norm", "diag/block1.workspace/read_entropy",
        "diag/block1.workspace/slot_usage", "diag/block1.workspace/write_gate", "diag/block1.router/gate_sga", "diag/block1.router/grad_norm",
    }  # fmt: skip
    assert expected <= scalars, sorted(expected - scalars)
    assert {"diag/block1.sga/gate", "diag/block0.moe/gate"} <= histograms
    for tag in [t for t in scalars if t.startswith("diag/")]:
        assert [e.step for e in events.Scalars(tag)] == [0, 3, 6], tag  # the logging steps, and no others
    assert [e.step for e in events.Histograms("diag/block1.sga/gate")] == [0, 3, 6]
    # The averaged per-instance stats are still logged on every step.
    assert {"stats/router.gate_sga", "stats/moe.load_e0", "stats/pkm.usage_kl"} <= scalars
    assert len(events.Scalars("stats/router.gate_sga")) == 7
    assert model.last_diagnostics == []  # handed over and cleared after logging
    assert "hp_metric" not in scalars


@pytest.mark.slow
def test_no_logging_step_no_diagnostics_forward(monkeypatch):
    calls = []
    original = HydraLM.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("diagnostics", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HydraLM, "forward", spy)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Diagnostics(every_n_steps=2)],
    )  # fmt: skip
    trainer.fit(tiny_model(), datamodule=SyntheticDataModule(MQAR(num_pairs=4, num_queries=4), batch_size=4, train_size=4096, val_size=8))
    assert calls == [True, False, True, False]
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        Diagnostics(every_n_steps=-1)


def test_fit_has_diagnostics_by_default_and_no_hp_metric(tmp_path, monkeypatch):
    from hydra_kit.cli import main

    monkeypatch.chdir(tmp_path)
    path = quick_recipe(tmp_path)
    recipe = yaml.safe_load(path.read_text())
    assert "default_hp_metric" not in recipe["trainer"]["logger"]["init_args"]  # the CLI's default decides
    steps = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--diagnostics.every_n_steps", "2"]
    assert main(["fit", "--config", str(path), *steps]) == 0
    run_dir = tmp_path / "runs" / "quick" / "version_0"
    scalars = set(_events(str(run_dir)).Tags()["scalars"])
    assert "hp_metric" not in scalars
    assert {"diag/block1.sga/global_attn_share", "diag/block1.sga/update_rel_norm", "diag/block0.mlp/gate_mean"} <= scalars
    assert [e.step for e in _events(str(run_dir)).Scalars("diag/block1.sga/layerscale")] == [0, 2]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["diagnostics"] == {"every_n_steps": 2, "histograms": True}
    assert saved["trainer"]["logger"]["init_args"]["default_hp_metric"] is False
