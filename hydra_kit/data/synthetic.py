"""A LightningDataModule that generates a synthetic task on the fly from a seed (no download)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from hydra_kit.compat import batches_processed
from hydra_kit.data.loading import training_loader
from hydra_kit.data.mqar import MQAR
from hydra_kit.data.task import SyntheticTask


@dataclass(frozen=True)
class Rehearsal:
    """Some batches of a schedule segment drawn from an earlier task, so what was learned on it is kept.

    Args:
        task: the earlier task.
        fraction: share of the segment's batches drawn from it, in (0, 1).
        batch: examples per (global) batch; a batch is drawn whole from one task, so its examples stack.
    """

    task: SyntheticTask
    fraction: float
    batch: int

    def covers(self, index: int) -> bool:
        """Whether batch ``index`` of the segment (counted from its start) is a rehearsal batch.

        Spread evenly: batch b rehearses when floor((b + 1) f) > floor(b f), so of any n consecutive batches
        floor(n f) or ceil(n f) rehearse (f = 0.25: batches 3, 7, 11, ...).
        """
        return math.floor((index + 1) * self.fraction) > math.floor(index * self.fraction)


def _rehearsal_key(rehearsal: Rehearsal | None) -> tuple[float, dict[str, Any]] | None:
    """What makes two rehearsals the same (tasks compare by their curriculum arguments)."""
    return None if rehearsal is None else (rehearsal.fraction, dict(rehearsal.task.params()))  # type: ignore[attr-defined]


class TaskSchedule:
    """Which task (length, difficulty) each training example is drawn from: the curriculum hook's record.

    Training examples are numbered across epochs (example i of epoch e is number ``e * train_size + i``).
    ``segments`` lists ``(first example number, task)`` in order; a change made while training takes effect at
    the first example not yet drawn, so the examples already loaded ahead of the step stay as they were, and
    the record (saved in checkpoints) makes a resumed run draw exactly the examples of an uninterrupted one.
    ``rehearsals`` maps a segment's first example number to its :class:`Rehearsal`, if it has one.
    """

    def __init__(self, task: SyntheticTask) -> None:
        self.segments: list[tuple[int, SyntheticTask]] = [(0, task)]
        self.rehearsals: dict[int, Rehearsal] = {}
        self.drawn = 0  # training examples drawn so far (by number), in this process

    @property
    def current(self) -> SyntheticTask:
        """The task of the newest change (validation uses it)."""
        return self.segments[-1][1]

    @property
    def current_rehearsal(self) -> Rehearsal | None:
        """The newest segment's rehearsal, if any."""
        return self.rehearsals.get(self.segments[-1][0]) if len(self.segments) > 1 else None

    def task_for(self, number: int) -> SyntheticTask:
        """The task training example ``number`` is drawn from."""
        starts = [start for start, _ in self.segments]
        i = bisect.bisect_right(starts, number) - 1
        start, task = self.segments[i]
        rehearsal = self.rehearsals.get(start) if i > 0 else None
        if rehearsal is not None and rehearsal.covers((number - start) // rehearsal.batch):
            return rehearsal.task
        return task

    def change(self, task: SyntheticTask, start: int, rehearsal: Rehearsal | None = None) -> None:
        """Draw examples numbered ``start`` onwards from ``task`` (``start`` >= every earlier change), some
        batches from ``rehearsal``'s task if given."""
        if start < self.segments[-1][0]:
            raise ValueError(f"task change at example {start} precedes the previous change at {self.segments[-1][0]}")
        if start == self.segments[-1][0] and len(self.segments) > 1:
            self.segments[-1] = (start, task)  # nothing was drawn from the previous change: replace it
        elif start == 0:
            self.segments = [(0, self.segments[0][1]), (0, task)]
        else:
            self.segments.append((start, task))
        self.rehearsals.pop(start, None)
        if rehearsal is not None:
            self.rehearsals[start] = rehearsal


class SyntheticDataset(Dataset[dict[str, torch.Tensor]]):
    """``size`` examples of one split of a task; example i is generated when asked for, from (seed, split, i).

    With a ``schedule``, training example i is drawn from the task the schedule assigns to number
    ``offset + i`` (and recorded as drawn); validation examples from the schedule's current task.
    """

    def __init__(self, task: SyntheticTask, split: str, size: int, seed: int, schedule: TaskSchedule | None = None, offset: int = 0) -> None:
        self.task, self.split, self.size, self.seed = task, split, size, seed
        self.schedule, self.offset = schedule, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        task = self.task
        if self.schedule is not None:
            if self.split == "train":
                number = self.offset + index
                task = self.schedule.task_for(number)
                self.schedule.drawn = max(self.schedule.drawn, number + 1)
            else:
                task = self.schedule.current
        example = task.sample(self.seed, self.split, index)
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
        self.task = task if task is not None else MQAR()  # the current task (a curriculum may change it)
        self.schedule = TaskSchedule(self.task)
        self.batch_size, self.train_size, self.val_size = batch_size, train_size, val_size
        self.seed, self.num_workers = seed, num_workers
        self._resume_epoch, self._resume_batches = -1, 0  # set by load_state_dict when a run resumes

    @property
    def vocab_size(self) -> int:
        """Number of token ids the task uses (:class:`hydra_kit.data.TokenData`)."""
        return self.task.vocab_size

    @property
    def seq_len(self) -> int:
        """Length of the current task's sequences (:class:`hydra_kit.data.TokenData`)."""
        return self.task.seq_len

    def _loader(self, dataset: Dataset[dict[str, torch.Tensor]], drop_last: bool) -> DataLoader[dict[str, torch.Tensor]]:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        # Each epoch draws new examples: seed the stream with the epoch so no epoch repeats another. The examples
        # are already random, so they are read in order; a resumed run skips the batches it had consumed.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        offset = epoch * self.train_size
        self.schedule.drawn = max(self.schedule.drawn, offset)
        dataset: Dataset[dict[str, torch.Tensor]] = SyntheticDataset(
            self.task, "train", self.train_size, self.seed + 1_000_003 * epoch, self.schedule, offset
        )
        skip = self._resume_batches if epoch == self._resume_epoch else 0
        self._resume_epoch, self._resume_batches = -1, 0
        return training_loader(dataset, self.batch_size, self.trainer, skip, self.num_workers, seed=self.seed + epoch)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self._loader(SyntheticDataset(self.task, "val", self.val_size, self.seed, self.schedule), drop_last=False)

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def no_skill_baselines(self) -> dict[str, float]:
        """Chance and each no-skill heuristic's accuracy on this module's validation examples.

        The examples are the ones ``val/acc`` is measured on (the current task's held-out split for ``seed``),
        so a run's final accuracy can be read against what a shortcut of the task format scores on the same set.
        """
        examples = [self.task.sample(self.seed, "val", i) for i in range(self.val_size)]
        return self.task.no_skill_baselines(examples)

    # ------------------------------------------------------------ curriculum hook
    def task_params(self) -> dict[str, Any]:
        """The current values of the task arguments a curriculum may change (empty if the task has none)."""
        params = getattr(self.task, "params", None)
        return dict(params()) if callable(params) else {}

    def task_with(self, values: Mapping[str, Any]) -> SyntheticTask:
        """The task with ``values`` changed, validated but not applied (the task's ``with_params``).

        Raises:
            ValueError: the task has no curriculum hook, an argument is not adjustable, or the values are invalid.
        """
        with_params = getattr(self.task, "with_params", None)
        if not callable(with_params):
            raise ValueError(f"{type(self.task).__name__} has no curriculum hook (params / with_params); its length and difficulty are fixed")
        task = with_params(dict(values))
        if task.vocab_size != self.task.vocab_size:
            raise ValueError(f"the change {dict(values)} would change the vocabulary ({self.task.vocab_size} -> {task.vocab_size} ids)")
        return task

    def set_task_params(self, values: Mapping[str, Any], rehearse: tuple[Mapping[str, Any], float] | None = None) -> None:
        """Change the task's length or difficulty from the next training example not yet drawn on.

        Validation uses the new task at once. With ``num_workers > 0`` the workers hold copies of the dataset,
        so the change reaches training at the start of the next epoch (data loaders are rebuilt every epoch).

        Args:
            values: task arguments to change (``task_params`` lists them).
            rehearse: ``(values of an earlier task, fraction)``: that share of the training batches from here on
                is drawn from the earlier task (a :class:`Rehearsal`), whole batches, spread evenly.

        Raises:
            ValueError: a value or the rehearsed task is invalid, or the fraction is not in (0, 1).
        """
        global_batch = self.batch_size * self._world_size()
        rehearsal = None
        if rehearse is not None:
            params, fraction = rehearse
            if not 0 < fraction < 1:
                raise ValueError(f"the rehearsed share of batches must be in (0, 1), got {fraction}")
            rehearsal = Rehearsal(self.task_with(params), float(fraction), global_batch)
        if _rehearsal_key(self.schedule.current_rehearsal) == _rehearsal_key(rehearsal) and all(self.task_params().get(k) == v for k, v in values.items()):
            return
        task = self.task_with(values)
        start = self.schedule.drawn
        if self.num_workers > 0:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            start = max(start, (epoch + 1) * self.train_size)
        # Never inside a global batch: a batch's examples must stack, and under DDP every rank must switch at the
        # same step (in step k the ranks together read examples k * batch_size * world ... (k + 1) * ... - 1).
        start = -(-start // global_batch) * global_batch
        self.schedule.change(task, start, rehearsal)
        self.task = task

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where the training stream stands, so a resumed run sees the same batches."""
        state: dict[str, Any] = {"seed": self.seed}
        if len(self.schedule.segments) > 1:
            state["task_schedule"] = [(start, dict(t.params())) for start, t in self.schedule.segments[1:]]  # type: ignore[attr-defined]
        if self.schedule.rehearsals:
            state["rehearsals"] = [(start, dict(r.task.params()), r.fraction, r.batch) for start, r in self.schedule.rehearsals.items()]  # type: ignore[attr-defined]
        if self.trainer is not None:
            state.update(epoch=self.trainer.current_epoch, batches_done=batches_processed(self.trainer))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self._resume_epoch = int(state_dict.get("epoch", -1))
        self._resume_batches = int(state_dict.get("batches_done", 0))
        base = self.schedule.segments[0][1]
        self.schedule = TaskSchedule(base)
        for start, params in state_dict.get("task_schedule", []):
            self.schedule.change(base.with_params(params), int(start))  # type: ignore[attr-defined]
        for start, params, fraction, batch in state_dict.get("rehearsals", []):
            self.schedule.rehearsals[int(start)] = Rehearsal(base.with_params(params), float(fraction), int(batch))  # type: ignore[attr-defined]
        self.task = self.schedule.current
        if self._resume_epoch >= 0:  # every rank had read batches_done batches of its share
            self.schedule.drawn = self._resume_epoch * self.train_size + self._resume_batches * self.batch_size * self._world_size()

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

