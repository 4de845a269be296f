"""The base of every synthetic task: a pure function of a seed, with a held-out split that never overlaps training.

A task generates one example from a ``numpy.random.Generator``. :meth:`SyntheticTask.sample` derives that
generator from (seed, split, index), so example ``i`` of a split is the same in every process, epoch and
resumed run, and assigns every possible example to exactly one split by a stable hash of its input tokens:
a held-out example can never appear in training, even by chance.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE_INDEX = -100
SPLITS = {"train": 0, "val": 1}


@dataclass
class Example:
    """One sequence of a task.

    Attributes:
        input_ids: (L,) int64 token ids; answers never appear at or after the position that predicts them.
        targets: (L,) int64, the answer token at answer positions, IGNORE_INDEX (-100) elsewhere.
        meta: difficulty knobs of this example (e.g. ``{"hops": 3}``) for per-level metrics.
    """

    input_ids: np.ndarray
    targets: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class SyntheticTask(abc.ABC):
    """A seeded synthetic task.

    Args:
        heldout_buckets: one in this many hash buckets of the example space is reserved for validation.
    """

    def __init__(self, heldout_buckets: int = 10) -> None:
        if heldout_buckets < 2:
            raise ValueError(f"heldout_buckets must be at least 2, got {heldout_buckets}")
        self.heldout_buckets = heldout_buckets

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the task uses."""

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """Length of every example."""

    @abc.abstractmethod
    def generate(self, rng: np.random.Generator) -> Example:
        """Draw one example (either split) from ``rng``."""

    def is_heldout(self, example: Example) -> bool:
        """Whether the example belongs to the held-out split (a stable hash of its input tokens)."""
        digest = hashlib.blake2b(np.ascontiguousarray(example.input_ids, dtype=np.int64).tobytes(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.heldout_buckets == 0

    def sample(self, seed: int, split: str, index: int) -> Example:
        """Example ``index`` of ``split`` ('train' or 'val') for ``seed``; deterministic."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        rng = np.random.default_rng([seed, SPLITS[split], index])
        want_heldout = split == "val"
        for _ in range(10_000):
            example = self.generate(rng)
            if self.is_heldout(example) == want_heldout:
                return example
        raise RuntimeError(f"{type(self).__name__}: could not draw a {split} example; is the example space too small?")
