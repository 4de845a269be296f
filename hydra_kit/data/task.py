"""The base of every synthetic task: a pure function of a seed, with a held-out split that never overlaps training.

A task generates one example from a ``numpy.random.Generator``. :meth:`SyntheticTask.sample` derives that
generator from (seed, split, index), so example ``i`` of a split is the same in every process, epoch and
resumed run, and assigns every possible example to exactly one split by a stable hash of its input tokens (or of its prompt):
a held-out example can never appear in training, even by chance.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE_INDEX = -100
SPLITS = {"train": 0, "val": 1}

#: A no-skill heuristic: (input_ids (L,), answer position t) -> the predicted answer token. It may read only
#: input_ids[: t + 1], the tokens a causal model has seen when it predicts the target at t.
Heuristic = Callable[[np.ndarray, int], int]


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

    def split_tokens(self, example: Example) -> np.ndarray:
        """The tokens that decide an example's split: all its input tokens unless a task says otherwise.

        A task whose examples share a prompt under different questions hashes the prompt alone, so that a
        held-out prompt is never trained on under another question (see :class:`~hydra_kit.data.LogicChains`).
        """
        return example.input_ids

    def is_heldout(self, example: Example) -> bool:
        """Whether the example belongs to the held-out split (a stable hash of :meth:`split_tokens`)."""
        digest = hashlib.blake2b(np.ascontiguousarray(self.split_tokens(example), dtype=np.int64).tobytes(), digest_size=8).digest()
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

    def evidence(self, example: Example) -> dict[int, list[int]] | None:
        """Where the fact each answer needs is stated: answer position -> the input positions stating it.

        For tasks whose question looks up one stated fact (an MQAR key-value pair, a DistantPremise premise),
        so that ``hydra-kit inspect`` can ask whether attention found it. None (the default): the task does
        not say.
        """
        return None

    # --- no-skill baselines: what an accuracy must beat before it shows a mechanism working ---

    @property
    @abc.abstractmethod
    def chance(self) -> float:
        """Accuracy of a uniform guess over the answer vocabulary at one answer position."""

    def heuristics(self) -> dict[str, Heuristic]:
        """Named no-skill predictors that exploit surface statistics of the format, not the task's rule.

        Each is a plain function of the visible prefix (see :data:`Heuristic`). A task lists the shortcuts a
        model could learn instead of the mechanism under study (e.g. "the most frequent value in the
        context"); :meth:`no_skill_baselines` scores them, and a reported accuracy means something only above
        the best of them.
        """
        return {}

    def no_skill_baselines(self, examples: Sequence[Example]) -> dict[str, float]:
        """Accuracy over every answer position of ``examples`` of chance and of each :meth:`heuristics` entry.

        Returns:
            ``{"chance": ..., <heuristic name>: accuracy, ...}``; :func:`best_no_skill` picks the strongest.
        """
        scores = {"chance": float(self.chance)}
        for name, predict in self.heuristics().items():
            hits = total = 0
            for example in examples:
                for t in np.flatnonzero(example.targets != IGNORE_INDEX):
                    hits += int(predict(example.input_ids[: t + 1], int(t)) == example.targets[t])
                    total += 1
            scores[name] = hits / max(total, 1)
        return scores


def best_no_skill(baselines: dict[str, float]) -> tuple[str, float]:
    """The strongest entry of :meth:`SyntheticTask.no_skill_baselines` as (name, accuracy)."""
    name = max(baselines, key=lambda k: baselines[k])
    return name, baselines[name]
