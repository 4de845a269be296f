"""A LightningDataModule that generates a synthetic task on the fly from a seed (no download)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from hydra_kit.data.mqar import MQAR
from hydra_kit.data.task import SyntheticTask


class SyntheticDataset(Dataset[dict[str, torch.Tensor]]):
    """``size`` examples of one split of a task; example i is generated when asked for, from (seed, split, i)."""

    def __init__(self, task: SyntheticTask, split: str, size: int, seed: int) -> None:
        self.task, self.split, self.size, self.seed = task, split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.task.sample(self.seed, self.split, index)
        return {"input_ids": torch.from_numpy(example.input_ids), "targets": torch.from_numpy(example.targets)}


class SyntheticDataModule(L.LightningDataModule):
    """Train and held-out validation splits of a synthetic task, generated lazily.

    Args:
        task: the task (default: MQAR with 8 pairs).
        batch_size: examples per batch.
        train_size: training examples per epoch (fresh examples: index i of epoch e is e * train_size + i).
        val_size: held-out validation examples.
        seed: seed of the task's example stream.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        task: SyntheticTask | None = None,
        batch_size: int = 32,
        train_size: int = 32768,
        val_size: int = 512,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0 or train_size <= 0 or val_size <= 0:
            raise ValueError(f"data: batch_size ({batch_size}), train_size ({train_size}) and val_size ({val_size}) must be positive")
        self.task = task if task is not None else MQAR()
        self.batch_size, self.train_size, self.val_size = batch_size, train_size, val_size
        self.seed, self.num_workers = seed, num_workers
        self._resume_epoch, self._resume_batches = -1, 0  # set by load_state_dict when a run resumes

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def _loader(self, dataset: Dataset[dict[str, torch.Tensor]], drop_last: bool) -> DataLoader[dict[str, torch.Tensor]]:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        # Each epoch draws new examples: seed the stream with the epoch so no epoch repeats another. The examples
        # are already random, so they are read in order; a resumed run skips the batches it had consumed.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        dataset: Dataset[dict[str, torch.Tensor]] = SyntheticDataset(self.task, "train", self.train_size, self.seed + 1_000_003 * epoch)
        skip = self._resume_batches if epoch == self._resume_epoch else 0
        self._resume_epoch, self._resume_batches = -1, 0
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if skip:  # under DDP each of the `world` ranks consumed batch_size examples per step
            dataset = Subset(dataset, range(skip * self.batch_size * world, self.train_size))
        if trainer is None or world == 1:
            return self._loader(dataset, drop_last=True)
        # Under DDP Lightning would inject a *shuffling* DistributedSampler into a training loader. Shard in order
        # instead: in step k rank r reads examples (k * batch_size + j) * world + r, j < batch_size, so the ranks
        # together read exactly batch k of one process with batch size batch_size * world.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False, drop_last=True)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self._loader(SyntheticDataset(self.task, "val", self.val_size, self.seed), drop_last=False)

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where the training stream stands, so a resumed run sees the same batches."""
        state: dict[str, Any] = {"seed": self.seed}
        if self.trainer is not None:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            state.update(epoch=self.trainer.current_epoch, batches_done=progress.processed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self._resume_epoch = int(state_dict.get("epoch", -1))
        self._resume_batches = int(state_dict.get("batches_done", 0))

