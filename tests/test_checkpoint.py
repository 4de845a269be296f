"""Atomic writes, weights-only loads, clear errors for truncated or tampered checkpoints, non-finite loss reports."""

from __future__ import annotations

import pytest
import torch

from hydra_kit.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from hydra_kit.model import HydraLM, NonFiniteLossError


def test_atomic_save_round_trip_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "last.ckpt"
    atomic_torch_save({"w": torch.arange(3)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"last\.ckpt' is truncated or corrupt"):
        safe_torch_load(path)


class Payload:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_tampered_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt' holds objects that weights-only loading refuses"):
        safe_torch_load(path)
    assert "would run" not in capsys.readouterr().out


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.ckpt")


def test_non_finite_loss_names_step_and_component():
    model = HydraLM(vocab_size=40, d_model=16, n_blocks=2, components={"mlp": {"component": "mlp"}, "attn": {"component": "attention", "args": {"n_heads": 2}, "blocks": [1]}})
    with torch.no_grad():
        model.blocks[1].mixers["attn"].out.weight.fill_(float("nan"))
    ids = torch.randint(0, 40, (2, 8))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 0: first non-finite output from component 'attn' in block 1; last good checkpoint: none yet"):
        model._shared_step({"input_ids": ids, "targets": ids}, "train")


def test_sequence_longer_than_supported_is_explained(monkeypatch):
    model = HydraLM(vocab_size=40, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp"}})
    monkeypatch.setattr(type(model.blocks[0].mixers["mlp"]), "max_seq_len", 8)
    with pytest.raises(ValueError, match="sequence of length 9 exceeds the 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))
