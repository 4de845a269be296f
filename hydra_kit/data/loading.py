"""The training DataLoader of every hydra-kit data module: one epoch read in order, sharded across ranks, resumable.

A resumed run must read exactly the examples an uninterrupted run would have read. Lightning restores how many
batches of the current epoch were done and ends the epoch when that count reaches the loader's length, and it
cannot skip batches in a plain DataLoader. So the sampler skips them itself while reporting the length of the
whole epoch: a loader that reported only the rest would end the resumed epoch early, by the batches done before
the interruption, and the examples at the end of that epoch would never be read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EpochSampler", "training_loader"]


class EpochSampler(DistributedSampler[int]):
    """Rank r of w reads examples r, r + w, r + 2w, ... of the epoch in order, after its first ``skip``.

    ``len()`` is the rank's share of the whole epoch, whatever ``skip`` is (see the module docstring). The
    indices are a strided range, never a list, because an epoch of token windows can hold millions of them.
    As a DistributedSampler it is left in place by Lightning under DDP (Lightning would otherwise inject a
    shuffling sampler).

    Args:
        dataset: the epoch's examples (only its length is used).
        num_replicas: number of ranks w.
        rank: this rank r.
        skip: examples of this rank's share already read (a resumed run's batches done times the batch size).
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, skip: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)  # type: ignore[arg-type]
        if skip < 0:
            raise ValueError(f"EpochSampler: skip must be 0 or more, got {skip}")
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(range(min(self.rank + self.skip * self.num_replicas, self.total_size), self.total_size, self.num_replicas))


def training_loader(
    dataset: Dataset[dict[str, torch.Tensor]], batch_size: int, trainer: Trainer | None, batches_done: int = 0, num_workers: int = 0, seed: int = 0
) -> DataLoader[dict[str, torch.Tensor]]:
    """The training DataLoader of one epoch of ``dataset`` for this rank, without the ``batches_done`` batches a resumed run had read.

    The loader's own generator is seeded, so starting an epoch's iteration never draws from the global random
    state: a run resumed from a checkpoint (which restores that state) then draws the same random numbers in
    training as the uninterrupted run.
    """
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, skip=batches_done * batch_size)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True, generator=generator)
    return loader
