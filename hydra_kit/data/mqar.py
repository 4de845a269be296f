"""Multi-query associative recall (MQAR), the Zoology benchmark task (Arora et al. 2023, arXiv 2312.04927).

A sequence lists key-value pairs, then asks for the values of some of the keys. Unlike Zoology's original
format, the query region holds keys only: the value is the target at the query position and never appears as an
input after it.

Worked example (``MQAR(num_pairs=2, num_queries=2, num_keys=4, num_values=4)``, seed 0, train index 0)::

    ids:     k=1..4, v=5..8, SEP=9
    input:   [k1 v7 k4 v8 SEP k1 k4]   -> token ids  [1, 7, 4, 8, 9, 1, 4]
    targets: [ -   -  -  -  -  v7 v8]  -> [-100, -100, -100, -100, -100, 7, 8]

(``tests/data/test_mqar.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask


class MQAR(SyntheticTask):
    """Multi-query associative recall.

    ``num_pairs`` and ``num_queries`` set the sequence length (``2 * num_pairs + 1 + num_queries``) and the
    difficulty; a curriculum changes them during training through :meth:`with_params`. The key and value
    vocabularies are fixed, since the model's embedding was sized for them.

    Args:
        num_pairs: key-value pairs listed per sequence.
        num_queries: keys asked about (distinct, drawn from the listed keys); each is an answer position.
        num_keys: size of the key vocabulary.
        num_values: size of the value vocabulary (chance accuracy is 1 / num_values).
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(self, num_pairs: int = 8, num_queries: int = 8, num_keys: int = 32, num_values: int = 32, heldout_buckets: int = 10) -> None:
        super().__init__(heldout_buckets)
        if num_pairs < 1 or num_pairs > num_keys:
            raise ValueError(f"MQAR: num_pairs must lie in 1..num_keys ({num_keys}), got {num_pairs}")
        if not 1 <= num_queries <= num_pairs:
            raise ValueError(f"MQAR: num_queries must lie in 1..num_pairs ({num_pairs}), got {num_queries}")
        if num_values < 2:
            raise ValueError(f"MQAR: num_values must be at least 2, got {num_values}")
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_keys, self.num_values = num_keys, num_values
        self.sep = 1 + num_keys + num_values

    #: constructor arguments :meth:`with_params` may change (length and difficulty, not the vocabulary)
    adjustable = ("num_pairs", "num_queries")

    def params(self) -> dict[str, int]:
        """The current values of the :attr:`adjustable` arguments."""
        return {"num_pairs": self.num_pairs, "num_queries": self.num_queries}

    def with_params(self, changes: Mapping[str, int]) -> MQAR:
        """A copy of this task with some :attr:`adjustable` arguments changed (the curriculum hook).

        Raises:
            ValueError: an argument is not adjustable, or the combination is invalid (as in the constructor).
        """
        unknown = sorted(set(changes) - set(self.adjustable))
        if unknown:
            raise ValueError(f"MQAR: cannot change {', '.join(map(repr, unknown))} during training; adjustable: {', '.join(self.adjustable)}")
        for key, value in changes.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"MQAR: {key} must be an integer, got {value!r}")
        merged = {**self.params(), **changes}
        return MQAR(merged["num_pairs"], merged["num_queries"], self.num_keys, self.num_values, self.heldout_buckets)

    @property
    def chance(self) -> float:
        """A uniform guess over the value vocabulary."""
        return 1 / self.num_values

    @property
    def vocab_size(self) -> int:
        return self.sep + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.num_pairs + 1 + self.num_queries

    def generate(self, rng: np.random.Generator) -> Example:
        keys = 1 + rng.choice(self.num_keys, size=self.num_pairs, replace=False)
        values = 1 + self.num_keys + rng.integers(0, self.num_values, size=self.num_pairs)
        asked = rng.choice(self.num_pairs, size=self.num_queries, replace=False)
        pairs = np.stack([keys, values], axis=1).reshape(-1)
        input_ids = np.concatenate([pairs, [self.sep], keys[asked]]).astype(np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[2 * self.num_pairs + 1 :] = values[asked]
        return Example(input_ids, targets, {"num_pairs": self.num_pairs, "pairs": self.num_pairs})
