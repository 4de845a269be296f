"""Tokens per second of training and validation batches (a Lightning callback)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values()), None))
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    return batch.numel() if isinstance(batch, torch.Tensor) else 0



class Throughput(Callback):
    """Tokens per second of training and validation batches, timed around each batch after the first few.

    A training batch is timed from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward and the
    optimizer step, without data loading, validation or checkpointing, so the figure compares models rather
    than input pipelines. The first ``warmup_batches`` of each kind are not timed (allocator and kernel warm-up);
    when a run has no more batches than that, every batch is timed. Sanity-check batches are never timed.

    Args:
        warmup_batches: batches of each kind (train, validation) skipped before timing.
    """

    def __init__(self, warmup_batches: int = 2) -> None:
        if warmup_batches < 0:
            raise ValueError(f"Throughput: warmup_batches must be >= 0, got {warmup_batches}")
        self.warmup_batches = warmup_batches
        # kind -> [batches seen, timed seconds, timed tokens, seconds of all batches, tokens of all batches]
        self._acc: dict[str, list[float]] = {"train": [0, 0.0, 0, 0.0, 0], "val": [0, 0.0, 0, 0.0, 0]}
        self._start = 0.0
        self.seq_len: int | None = None  # length of the last training batch

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":  # kernels are asynchronous: wait for them before reading the clock
            torch.cuda.synchronize(pl_module.device)

    def _begin(self, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def _end(self, kind: str, pl_module: L.LightningModule, batch: Any) -> None:
        self._sync(pl_module)
        elapsed, tokens = time.perf_counter() - self._start, _count_tokens(batch)
        acc = self._acc[kind]
        if acc[0] >= self.warmup_batches:
            acc[1] += elapsed
            acc[2] += tokens
        acc[0] += 1
        acc[3] += elapsed
        acc[4] += tokens

    def tokens_per_s(self, kind: str = "train") -> float | None:
        """Measured tokens per second of ``train`` or ``val`` batches; None when no batch ran."""
        seen, seconds, tokens, all_seconds, all_tokens = self._acc[kind]
        if seconds <= 0:  # too few batches to skip the warm-up: use all of them
            seconds, tokens = all_seconds, all_tokens
        return tokens / seconds if seconds > 0 and seen else None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._begin(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._end("train", pl_module, batch)
        if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
            self.seq_len = int(batch["input_ids"].shape[-1])

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._begin(pl_module)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self._end("val", pl_module, batch)
