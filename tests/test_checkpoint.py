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


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped), so no process holds it for now."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import os

    from hydra_kit.checkpoint import remove_stale_temporaries

    dead = tmp_path / f".last.ckpt.tmp-{_dead_pid()}"  # what `kill -9` during atomic_torch_save leaves
    live = tmp_path / f".last.ckpt.tmp-{os.getpid()}"  # a writer that is still running
    other = tmp_path / "notes.tmp-1"  # not a name atomic_torch_save writes
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "absent") == []


def test_run_starting_in_a_checkpoint_folder_clears_dead_writers_temporaries(tmp_path):
    from lightning.pytorch import Trainer

    from hydra_kit.checkpoint import LastCheckpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = folder / f".last.ckpt.tmp-{_dead_pid()}"
    dead.write_bytes(b"partial")
    callback = LastCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False)
    callback.setup(trainer, HydraLM(vocab_size=8, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp", "blocks": "all"}}), "fit")
    assert not dead.exists()


def test_directory_given_as_checkpoint_is_named_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file; it holds no \.ckpt file"):
        safe_torch_load(tmp_path)
    run = tmp_path / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    atomic_torch_save({"w": torch.zeros(2)}, run / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file; checkpoints inside: version_0/checkpoints/last\.ckpt"):
        safe_torch_load(tmp_path)


def _tiny_checkpoint(path):
    """A real checkpoint of a small HydraLM written by the checkpoint IO of every run; returns the model."""
    from hydra_kit.checkpoint import AtomicCheckpointIO

    torch.manual_seed(0)
    model = HydraLM(vocab_size=32, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp", "blocks": "all"}})
    AtomicCheckpointIO().save_checkpoint({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return model


def test_checkpoint_with_a_flipped_weight_byte_is_refused_naming_the_file(tmp_path, capsys):
    from hydra_kit.checkpoint import DIGEST_KEY
    from hydra_kit.cli import main

    path = tmp_path / "model.ckpt"
    model = _tiny_checkpoint(path)
    assert DIGEST_KEY in safe_torch_load(path)  # intact: loads, digest present
    weight = model.embed.weight.detach().numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(weight)
    assert at > 0  # torch stores tensors uncompressed, and keeps no checksum of them
    data[at + len(weight) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.ckpt' is corrupt: its weights do not match the SHA-256 digest"):
        safe_torch_load(path)
    assert main(["generate", "--ckpt_path", str(path), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and f"checkpoint '{path}' is corrupt" in err, err


def test_checkpoint_without_a_digest_loads_with_one_warning(tmp_path, caplog):
    import logging

    path = tmp_path / "old.ckpt"
    model = _tiny_checkpoint(tmp_path / "new.ckpt")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)  # as before digests
    with caplog.at_level(logging.WARNING, logger="hydra_kit.checkpoint"):
        loaded = safe_torch_load(path)
    assert torch.equal(loaded["state_dict"]["network.embed.weight"], model.embed.weight)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"checkpoint '{path}' has no weight digest (written before hydra-kit stored one): its weights are not verified"]


def test_digest_depends_on_names_shapes_and_bytes():
    from hydra_kit.checkpoint import state_dict_digest

    base = {"a": torch.arange(6.0), "b": torch.ones(2, dtype=torch.bfloat16)}
    digest = state_dict_digest(base)
    assert digest == state_dict_digest(dict(reversed(base.items())))  # fixed order, whatever the dict's
    assert digest != state_dict_digest({**base, "a": torch.arange(6.0).reshape(2, 3)})
    assert digest != state_dict_digest({"c": base["a"], "b": base["b"]})
    changed = base["a"].clone()
    changed[3] = 3.0000002
    assert digest != state_dict_digest({**base, "a": changed})
