"""A LightningDataModule that generates a synthetic task on the fly from a seed (no download)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

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

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def _loader(self, dataset: SyntheticDataset, shuffle: bool) -> DataLoader[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator, num_workers=self.num_workers, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        # Each epoch draws new examples: seed the stream with the epoch so no epoch repeats another.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self._loader(SyntheticDataset(self.task, "train", self.train_size, self.seed + 1_000_003 * epoch), shuffle=False)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self._loader(SyntheticDataset(self.task, "val", self.val_size, self.seed), shuffle=False)

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))

