"""Distant premise (experiment E4): answer a question from a premise stated at least D tokens earlier.

A sequence is filler text with premises ``PREMISE k v`` (three tokens: "k is v") and ends with
``num_questions`` questions ``QUESTION k`` whose target, at the ``k`` position, is the value ``v`` of the one
premise about key ``k``. The premises sit in a *premise region* of ``region_len`` tokens, at random places
among filler tokens, and ``D - 3`` filler tokens trail the region before the first question: every premise
starts between D and ``D + region_len - 3`` tokens before it. The level D is how far back the model must look
(with D beyond an attention window, every premise is outside it); the premises asked about are any of the
region's, at random, each asked at most once, in random order.

Several questions per example give a model several answers to learn from per sequence (MQAR asks every key;
with one question per 127 tokens no model on the E4 CPU budget left chance, see
``docs/calibration/2026-12-05-distant-premise``). The answers are never in the input, so an earlier question
tells nothing about a later one's answer.

Why this layout (a first version put the premise at a fixed offset per distance, so "the value D tokens back"
answered every question; :meth:`DistantPremise.heuristics` measures the shortcuts and
``tests/data/test_distant_premise.py`` checks each stays near chance):

* the asked premise is exchangeable with the others: nothing about its place (its offset, being nearest or
  farthest, the filler around it) differs from a distractor's, so any rule that picks a premise by position
  finds it once in ``num_distractors + 1`` tries;
* keys and values are distinct within an example (so the answer is unique, and no value is stated more often
  than another), and by default there are ``num_values - 1`` distractors, so every value is stated exactly
  once: guessing a stated value is then chance, 1 / num_values. With fewer distractors that guess scores
  1 / (num_distractors + 1), the ceiling a model must beat without reading keys;
* filler tokens come from their own vocabulary, so they never look like a key, a value or a marker.

Examples at different levels are different sequences (the region moves), and the held-out split is disjoint
from any training split of an instance with the same vocabulary and ``seq_len`` by the base class's hash.
``Example.meta`` holds the level (``distance``) and, per question in order, the asked premise's exact
``offsets`` from that question and ``between``, the number of premises between it and the question block.

Token ids (``num_filler = F``, ``num_keys = K``, ``num_values = V``): filler 1..F, keys F+1..F+K, values
F+K+1..F+K+V, ``PREMISE`` F+K+V+1, ``QUESTION`` F+K+V+2. (0 is unused, kept free as PAD.)

Worked example (``DistantPremise(distance=4, num_distractors=2, num_filler=3, num_keys=4, num_values=4,
region_len=10)``, seed 0, train index 3)::

    ids:     filler 1..3, keys 4..7, values 8..11, PREMISE 12, QUESTION 13
    input:   [f3  P k6 v10  P k7 v9  P k4 v8  f2  Q k6]
             -> token ids  [3, 12, 6, 10, 12, 7, 9, 12, 4, 8, 2, 13, 6]
    targets: -> [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 10]

The region is positions 0..9 (three premises, one filler token); one filler token trails it. The question asks
about key 6, whose premise is the farthest of the three: it starts at position 1, 10 tokens before the question
(``offsets`` [10], ``between`` [2]); the premise nearest the question starts at position 7, D = 4 tokens before it.
(``tests/data/test_distant_premise.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, Heuristic, SyntheticTask

PREMISE_LEN, QUESTION_LEN = 3, 2


class DistantPremise(SyntheticTask):
    """A premise at least ``distance`` tokens before its question, at a random place among premises of the same form.

    Args:
        distance: the level D: every premise of an example starts D to D + region_len - 3 tokens before the
            question (D - 3 filler tokens trail the last one); an int, or a list of ints drawn uniformly per
            example. Each must be at least 3 (the premise's length).
        num_distractors: premises about other keys, of the same form (needs num_keys and num_values above it:
            keys and values are distinct within an example); None: num_values - 1, so that every value is
            stated exactly once and guessing a stated value is no better than chance.
        seq_len: length of every example; None: the shortest that fits the largest distance and the region.
        num_filler: size of the filler vocabulary.
        num_keys: size of the key vocabulary.
        num_values: size of the value vocabulary (chance accuracy is 1 / num_values).
        num_questions: questions at the end of every example, each about a different premise (at most
            num_distractors + 1).
        region_len: tokens of the premise region: the premises plus region_len - 3 * premises filler tokens
            between them, at random; None: 4 tokens per premise.
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(
        self,
        distance: int | list[int] = 64,
        num_distractors: int | None = None,
        seq_len: int | None = None,
        num_filler: int = 32,
        num_keys: int = 32,
        num_values: int = 16,
        region_len: int | None = None,
        num_questions: int = 1,
        heldout_buckets: int = 10,
    ) -> None:
        super().__init__(heldout_buckets)
        distances = [distance] if isinstance(distance, int) else list(distance)
        if not distances or any(not isinstance(d, int) or d < PREMISE_LEN for d in distances):
            raise ValueError(f"DistantPremise: distance must be an int >= {PREMISE_LEN} or a non-empty list of them, got {distance!r}")
        if num_filler < 1 or num_values < 2:
            raise ValueError(f"DistantPremise: need num_filler >= 1 and num_values >= 2, got {num_filler} and {num_values}")
        num_distractors_given, region_len_given = num_distractors, region_len
        num_distractors = num_values - 1 if num_distractors is None else num_distractors
        if num_distractors < 0 or num_keys <= num_distractors or num_values <= num_distractors:
            raise ValueError(
                f"DistantPremise: need 0 <= num_distractors < min(num_keys, num_values) = {min(num_keys, num_values)} "
                f"(keys and values are distinct within an example), got num_distractors={num_distractors}"
            )
        premises = num_distractors + 1
        if not 1 <= num_questions <= premises:
            raise ValueError(f"DistantPremise: num_questions must be between 1 and the {premises} premises (each is asked at most once), got {num_questions}")
        region_len = 4 * premises if region_len is None else region_len
        if region_len < PREMISE_LEN * premises:
            raise ValueError(f"DistantPremise: region_len={region_len} cannot hold {premises} premises of {PREMISE_LEN} tokens; it needs at least {PREMISE_LEN * premises}")
        # The farthest premise starts at position 0, the question block takes the last 2 * num_questions tokens.
        needed = max(distances) + region_len - PREMISE_LEN + QUESTION_LEN * num_questions
        if seq_len is not None and seq_len < needed:
            raise ValueError(
                f"DistantPremise: seq_len={seq_len} is too short for distance {max(distances)} and a region of "
                f"{region_len} tokens; it needs at least {needed}"
            )
        self.distances = sorted(set(distances))
        self.num_distractors, self.region_len, self.num_questions = num_distractors, region_len, num_questions
        self._seq_len = needed if seq_len is None else seq_len
        self.num_filler, self.num_keys, self.num_values = num_filler, num_keys, num_values
        self.key0, self.value0 = 1 + num_filler, 1 + num_filler + num_keys
        self.premise, self.question = 1 + num_filler + num_keys + num_values, 2 + num_filler + num_keys + num_values
        # The adjustable arguments as given (None stays None: "the default for the other values"), so that a
        # curriculum stage that restores them rebuilds exactly this task.
        self._given = {"distance": distance, "num_distractors": num_distractors_given, "seq_len": seq_len, "region_len": region_len_given, "num_questions": num_questions}
        self._fitted: tuple[list[int], dict[int, int]] | None = None

    #: constructor arguments :meth:`with_params` may change (length and difficulty, not the vocabulary)
    adjustable = ("distance", "num_distractors", "seq_len", "region_len", "num_questions")

    def params(self) -> dict[str, Any]:
        """The :attr:`adjustable` arguments as given to the constructor (None where the default was taken)."""
        return dict(self._given)

    def with_params(self, changes: Mapping[str, Any]) -> DistantPremise:
        """A copy of this task with some :attr:`adjustable` arguments changed (the curriculum hook).

        A curriculum can start on a short task with few premises, where a small model finds the key lookup
        within a few hundred steps, and move to the long one (``docs/calibration/2026-12-05-distant-premise``).

        Raises:
            ValueError: an argument is not adjustable, or the combination is invalid (as in the constructor).
        """
        unknown = sorted(set(changes) - set(self.adjustable))
        if unknown:
            raise ValueError(f"DistantPremise: cannot change {', '.join(map(repr, unknown))} during training; adjustable: {', '.join(self.adjustable)}")
        merged = {**self._given, **changes}
        if isinstance(merged["distance"], tuple):  # YAML and JSON give lists; a tuple is the same levels
            merged["distance"] = list(merged["distance"])
        return DistantPremise(
            **merged, num_filler=self.num_filler, num_keys=self.num_keys, num_values=self.num_values, heldout_buckets=self.heldout_buckets
        )

    @property
    def chance(self) -> float:
        """A uniform guess over the value vocabulary."""
        return 1 / self.num_values

    @property
    def vocab_size(self) -> int:
        return self.question + 1

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def _place(self, rng: np.random.Generator, length: int, count: int) -> list[int]:
        """Offsets of ``count`` non-overlapping premises in a free span of ``length`` tokens, uniformly."""
        # Stars and bars: the span is (length - 3 count) filler tokens and count premises in some order.
        items = length - (PREMISE_LEN - 1) * count
        chosen = np.sort(rng.choice(items, size=count, replace=False))
        return [int(c) + (PREMISE_LEN - 1) * i for i, c in enumerate(chosen)]

    def generate(self, rng: np.random.Generator) -> Example:
        distance = self.distances[int(rng.integers(0, len(self.distances)))]
        premises = self.num_distractors + 1
        q_at = self._seq_len - QUESTION_LEN * self.num_questions  # the first question
        region_at = q_at - distance - self.region_len + PREMISE_LEN  # the nearest premise may start at q_at - distance
        starts = [region_at + s for s in self._place(rng, self.region_len, premises)]
        keys = self.key0 + rng.choice(self.num_keys, size=premises, replace=False)
        values = self.value0 + rng.choice(self.num_values, size=premises, replace=False)
        input_ids = (1 + rng.integers(0, self.num_filler, size=self._seq_len)).astype(np.int64)
        for start, key, value in zip(starts, keys, values, strict=True):
            input_ids[start : start + PREMISE_LEN] = [self.premise, key, value]
        # The premises asked about: any of them, near or far, each at most once, in random order.
        asked = [int(a) for a in rng.choice(premises, size=self.num_questions, replace=False)]
        targets = np.full(self._seq_len, IGNORE_INDEX, dtype=np.int64)
        offsets = []
        for i, a in enumerate(asked):
            at = q_at + QUESTION_LEN * i
            input_ids[at : at + QUESTION_LEN] = [self.question, keys[a]]
            targets[at + 1] = values[a]
            offsets.append(at - starts[a])
        meta = {"distance": distance, "offsets": offsets, "distractors": self.num_distractors, "between": [premises - 1 - a for a in asked]}
        return Example(input_ids, targets, meta)

    def evidence(self, example: Example) -> dict[int, list[int]]:
        """Each answer position (a question's key) -> the positions of the premise about that key (marker, key, value)."""
        input_ids = example.input_ids
        found = {}
        for t in np.flatnonzero(example.targets != IGNORE_INDEX):
            _, starts = self._premises(input_ids[: t + 1])
            start = int(next(s for s in starts if input_ids[s + 1] == input_ids[t]))
            found[int(t)] = [start, start + 1, start + 2]
        return found

    # --- no-skill baselines ---

    def _premises(self, input_ids: np.ndarray) -> tuple[int, np.ndarray]:
        """(position of the question, start positions of the premises before it)."""
        q_at = int(np.flatnonzero(input_ids == self.question)[-1])
        return q_at, np.flatnonzero(input_ids[: q_at - PREMISE_LEN + 1] == self.premise)

    def heuristics(self) -> dict[str, Heuristic]:
        """Shortcuts that answer without matching the question's key to a premise's.

        * ``value at offset D`` for each distance D: the value of the premise starting D tokens before the
          question (or of the one starting nearest to that); with the premise at a fixed offset per level
          (as in that first version) it is right every time;
        * ``value at the commonest offset``: the same at the offset of the asked premise most common in 2000
          training examples;
        * ``nearest premise``, ``farthest premise``: the value of the last / first premise;
        * ``most frequent value``: the value stated most often (the smallest on a tie);
        * ``key's commonest value``: the value most often asked with this key in 2000 training examples (keys
          and values are drawn afresh per example, so it knows nothing);
        * ``nearest premise not asked before`` (with several questions): the value of the last premise whose key
          no earlier question asked; each premise is asked at most once, so this rules out the earlier questions'
          premises without reading the current key (1 / (premises - i) at the question i, counted from 0).
        """

        def at_offset(offset: int) -> Heuristic:
            def value(input_ids: np.ndarray, t: int) -> int:
                q_at, starts = self._premises(input_ids[: t + 1])
                if not len(starts):
                    return self.value0
                return int(input_ids[starts[np.argmin(np.abs(q_at - starts - offset))] + 2])

            return value

        def nearest(input_ids: np.ndarray, t: int) -> int:
            _, starts = self._premises(input_ids[: t + 1])
            return int(input_ids[starts[-1] + 2]) if len(starts) else self.value0

        def farthest(input_ids: np.ndarray, t: int) -> int:
            _, starts = self._premises(input_ids[: t + 1])
            return int(input_ids[starts[0] + 2]) if len(starts) else self.value0

        def most_frequent(input_ids: np.ndarray, t: int) -> int:
            _, starts = self._premises(input_ids[: t + 1])
            return int(np.bincount(input_ids[starts + 2]).argmax()) if len(starts) else self.value0

        if self._fitted is None:
            offsets: Counter[int] = Counter()
            by_key: dict[int, Counter[int]] = defaultdict(Counter)
            for i in range(2000):
                example = self.sample(0, "train", i)
                for t in np.flatnonzero(example.targets != IGNORE_INDEX):
                    q_at, starts = self._premises(example.input_ids[: t + 1])
                    key, answer = int(example.input_ids[t]), int(example.targets[t])
                    offsets.update(int(q_at - s) for s in starts if example.input_ids[s + 1] == key)
                    by_key[key][answer] += 1
            self._fitted = [offsets.most_common(1)[0][0]], {k: c.most_common(1)[0][0] for k, c in by_key.items()}
        (commonest,), key_value = self._fitted

        def key_commonest(input_ids: np.ndarray, t: int) -> int:
            return key_value.get(int(input_ids[t]), self.value0)

        def nearest_not_asked(input_ids: np.ndarray, t: int) -> int:
            q_at, starts = self._premises(input_ids[: t + 1])
            first = int(np.flatnonzero(input_ids[: t + 1] == self.question)[0])
            asked = set(input_ids[first + 1 : q_at : QUESTION_LEN].tolist())  # the keys of the earlier questions
            left = [s for s in starts if int(input_ids[s + 1]) not in asked]
            return int(input_ids[left[-1] + 2]) if left else self.value0

        heuristics = {f"value at offset {d}": at_offset(d) for d in self.distances}
        heuristics.update(
            {
                "value at the commonest offset": at_offset(commonest),
                "nearest premise": nearest,
                "farthest premise": farthest,
                "most frequent value": most_frequent,
                "key's commonest value": key_commonest,
            }
        )
        if self.num_questions > 1:
            heuristics["nearest premise not asked before"] = nearest_not_asked
        return heuristics
