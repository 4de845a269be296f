"""Multi-query associative recall (MQAR), the Zoology benchmark task (Arora et al. 2023, arXiv 2312.04927).

A sequence lists key-value pairs, then asks for the values of some of the keys. As in Zoology, keys and values
come from disjoint halves of the vocabulary and are drawn *without replacement*: every value in a sequence is
distinct, so no surface statistic of the context singles out an answer. Unlike Zoology's format, the query
region holds keys only: the value is the target at the query position and never appears as an input after it.

What a model that does not look the current key up can still do: each key is asked at most once,
and the *keys* of the earlier queries are in the input, so their pairs are ruled out. Guessing among the pairs
not yet asked scores ``1 / (num_pairs - i)`` at query ``i`` (counted from 0), and 1 at the last query when every
key is asked; the mean over the queries is ``H_n / n`` for ``n = num_pairs = num_queries`` (0.340 at 8 pairs,
against 1 / 8 for guessing any listed value). :meth:`MQAR.heuristics` lists this shortcut beside the others, and
``tests/data/test_mqar.py`` checks it lands at that level and that the rest stay at ``1 / num_pairs``.

Worked example (``MQAR(num_pairs=2, num_queries=2, num_keys=4, num_values=4)``, seed 0, train index 0)::

    ids:     k=1..4, v=5..8, SEP=9
    input:   [k3 v6 k4 v5 SEP k4 k3]   -> token ids  [3, 6, 4, 5, 9, 4, 3]
    targets: [ -   -  -  -  -  v5 v6]  -> [-100, -100, -100, -100, -100, 5, 6]

(``tests/data/test_mqar.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, Heuristic, SyntheticTask


class MQAR(SyntheticTask):
    """Multi-query associative recall.

    ``num_pairs`` and ``num_queries`` set the sequence length (``2 * num_pairs + 1 + num_queries``) and the
    difficulty; a curriculum changes them during training through :meth:`with_params`. The key and value
    vocabularies are fixed, since the model's embedding was sized for them.

    Args:
        num_pairs: key-value pairs listed per sequence.
        num_queries: keys asked about (distinct, drawn from the listed keys); each is an answer position.
        num_keys: size of the key vocabulary.
        num_values: size of the value vocabulary, at least ``num_pairs`` (values are distinct within a sequence;
            chance accuracy is 1 / num_values; guessing a listed value scores 1 / num_pairs, and guessing among
            the pairs not asked yet, the best no-skill rule, more: see :meth:`heuristics`).
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(self, num_pairs: int = 8, num_queries: int = 8, num_keys: int = 32, num_values: int = 32, heldout_buckets: int = 10) -> None:
        super().__init__(heldout_buckets)
        if num_pairs < 1 or num_pairs > num_keys:
            raise ValueError(f"MQAR: num_pairs must lie in 1..num_keys ({num_keys}), got {num_pairs}")
        if not 1 <= num_queries <= num_pairs:
            raise ValueError(f"MQAR: num_queries must lie in 1..num_pairs ({num_pairs}), got {num_queries}")
        if num_values < max(2, num_pairs):
            raise ValueError(f"MQAR: num_values must be at least max(2, num_pairs) = {max(2, num_pairs)} (values are distinct within a sequence), got {num_values}")
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

    def heuristics(self) -> dict[str, Heuristic]:
        """Shortcuts that answer without looking the current key up.

        * ``most frequent value``, ``last value``, ``value at the query's rank`` (the i-th listed value for the
          i-th query): each picks one of the listed values without reading any query, about ``1 / num_pairs``;
        * ``first pair not asked before``: the value of the first listed pair whose key no earlier query asked.
          Each key is asked at most once and the earlier queries' keys are in the input, so this rules their
          pairs out without reading the current key: ``1 / (num_pairs - i)`` at query ``i`` (counted from 0),
          1 at the last query when every key is asked, ``H_8 / 8 = 0.340`` on average at 8 pairs. The asked
          order is uniformly random, so any fixed rule among the pairs left scores the same: the last of them
          scored 0.338 and the one at the query's rank among them 0.339, this one 0.341, on 2,000 held-out
          examples of ``MQAR(8, 8, 32, 32)``.

        Worked example (8 pairs ``k1 v1 .. k8 v8`` listed in that order, queries so far ``k3 k1``, now ``k5``):
        the pairs left are 2, 4, 5, 6, 7, 8, so the guess is ``v2``, right with probability 1/6.
        """
        first_value = 1 + self.num_keys

        def context_values(prefix: np.ndarray) -> np.ndarray:
            return prefix[(prefix >= first_value) & (prefix < self.sep)]

        def most_frequent_value(prefix: np.ndarray, t: int) -> int:
            values = context_values(prefix)
            return int(np.bincount(values).argmax()) if len(values) else first_value

        def last_value(prefix: np.ndarray, t: int) -> int:
            values = context_values(prefix)
            return int(values[-1]) if len(values) else first_value

        def value_of_query_rank(prefix: np.ndarray, t: int) -> int:
            # The i-th query answered by the i-th listed value: right if queries were asked in listing order.
            values = context_values(prefix)
            rank = t - int(np.flatnonzero(prefix == self.sep)[0]) - 1
            return int(values[rank % len(values)]) if len(values) else first_value

        def first_not_asked(prefix: np.ndarray, t: int) -> int:
            sep_at = int(np.flatnonzero(prefix == self.sep)[0])
            pairs = prefix[:sep_at].reshape(-1, 2)
            asked = np.isin(pairs[:, 0], prefix[sep_at + 1 : t])  # the keys of the earlier queries, not the current one
            left = pairs[~asked, 1]
            return int(left[0]) if len(left) else first_value

        return {
            "most frequent value": most_frequent_value,
            "last value": last_value,
            "value at the query's rank": value_of_query_rank,
            "first pair not asked before": first_not_asked,
        }

    def evidence(self, example: Example) -> dict[int, list[int]]:
        """Each query position -> the positions of its key-value pair in the listing (key, value)."""
        input_ids = example.input_ids
        listing = input_ids[: int(np.flatnonzero(input_ids == self.sep)[0])]
        found = {}
        for t in np.flatnonzero(example.targets != IGNORE_INDEX):
            at = int(np.flatnonzero(listing[0::2] == input_ids[t])[0]) * 2  # keys sit at even positions
            found[int(t)] = [at, at + 1]
        return found

    @property
    def vocab_size(self) -> int:
        return self.sep + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.num_pairs + 1 + self.num_queries

    def generate(self, rng: np.random.Generator) -> Example:
        keys = 1 + rng.choice(self.num_keys, size=self.num_pairs, replace=False)
        values = 1 + self.num_keys + rng.choice(self.num_values, size=self.num_pairs, replace=False)
        asked = rng.choice(self.num_pairs, size=self.num_queries, replace=False)
        pairs = np.stack([keys, values], axis=1).reshape(-1)
        input_ids = np.concatenate([pairs, [self.sep], keys[asked]]).astype(np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[2 * self.num_pairs + 1 :] = values[asked]
        return Example(input_ids, targets, {"num_pairs": self.num_pairs, "pairs": self.num_pairs})
