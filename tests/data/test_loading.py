"""A training run killed and resumed from its checkpoint reads the batches, and draws the random numbers, of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hydra_kit.data import MQAR, SyntheticDataModule
from hydra_kit.data.loading import EpochSampler
from hydra_kit.model import HydraLM

STEPS, EPOCH_BATCHES, BATCH = 13, 5, 4


class Recorder(L.Callback):
    """Records every training batch, and draws one global random number per step as a model's dropout or exploration would."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.seen.append((trainer.global_step, int(batch["input_ids"].sum()), float(torch.rand(()))))


def tiny_model() -> HydraLM:
    return HydraLM(vocab_size=72, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp", "blocks": "all"}}, warmup_steps=2)


class Interrupt(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("killed")


def _fit(folder: Path, recorder: Recorder, *callbacks: L.Callback, ckpt_path: str | None = None) -> HydraLM:
    model = tiny_model()
    data = SyntheticDataModule(MQAR(num_pairs=2, num_queries=2), batch_size=BATCH, train_size=EPOCH_BATCHES * BATCH, val_size=4)
    checkpoints = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, reload_dataloaders_every_n_epochs=1, callbacks=[recorder, *callbacks, checkpoints], default_root_dir=folder,
    )  # fmt: skip
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("killed_at", [3, EPOCH_BATCHES + 2])
def test_resumed_run_reads_and_draws_what_the_uninterrupted_run_does(tmp_path: Path, killed_at: int) -> None:
    """Across epoch ends (an epoch is 5 batches, the run 13 steps), whether killed in the first epoch or a later one."""
    L.seed_everything(0, verbose=False)
    straight = Recorder()
    model = _fit(tmp_path / "straight", straight)
    L.seed_everything(0, verbose=False)
    first = Recorder()
    with pytest.raises(RuntimeError, match="killed"):
        _fit(tmp_path / "killed", first, Interrupt(killed_at))
    # The interrupting callback runs before the checkpoint of its step is written: the run resumes from the step before.
    resumed = Recorder()
    model_resumed = _fit(tmp_path / "killed", resumed, ckpt_path=str(tmp_path / "killed" / "last.ckpt"))
    assert [row[0] for row in resumed.seen] == list(range(killed_at - 1, STEPS))
    assert first.seen[: killed_at - 1] + resumed.seen == straight.seen
    for (name, a), b in zip(model.state_dict().items(), model_resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} differs after the resumed run")


def test_epoch_sampler_reports_the_whole_epoch_and_reads_its_rest() -> None:
    """Rank 1 of 2 over 10 examples reads 1, 3, 5, 7, 9; after skipping its first 2 it reads 5, 7, 9 and still has length 5."""
    examples = list(range(10))
    assert list(EpochSampler(examples, num_replicas=2, rank=1)) == [1, 3, 5, 7, 9]
    rest = EpochSampler(examples, num_replicas=2, rank=1, skip=2)
    assert list(rest) == [5, 7, 9] and len(rest) == 5
    assert list(EpochSampler(examples, num_replicas=1, rank=0, skip=20)) == []
    with pytest.raises(ValueError, match="skip must be 0 or more"):
        EpochSampler(examples, num_replicas=1, rank=0, skip=-1)
