"""Distant premise (experiment E4): answer a question from a premise stated D tokens earlier.

A sequence is filler text with premises ``PREMISE k v`` (three tokens: "k is v") scattered through it, and
ends with a question ``QUESTION k`` whose target, at the ``k`` position, is the value ``v`` of the one premise
about key ``k``. That premise starts exactly ``distance`` tokens before the question:
``position(QUESTION) - position(PREMISE) == distance``. The other premises are distractors of the same form
about other keys (keys are distinct within an example, so the answer is unique); at least one of them lies
between the premise and the question whenever there is room, the rest anywhere in the free space. Filler
tokens come from their own vocabulary, so they never look like a key, a value or a marker.

A distance is a property of the input (the premise is the only one with the question's key), so examples at
different distances are different sequences: a test instance with longer distances, built with the same
``seq_len`` and vocabulary, is disjoint from a training instance with shorter ones by construction, and its
held-out split is disjoint from any training split by the base class's hash.

Token ids (``num_filler = F``, ``num_keys = K``, ``num_values = V``): filler 1..F, keys F+1..F+K, values
F+K+1..F+K+V, ``PREMISE`` F+K+V+1, ``QUESTION`` F+K+V+2. (0 is unused, kept free as PAD.)

Worked example (``DistantPremise(distance=8, num_distractors=2, seq_len=16, num_filler=3, num_keys=4,
num_values=4)``, seed 0, train index 3)::

    ids:     filler 1..3, keys 4..7, values 8..11, PREMISE 12, QUESTION 13
    input:   [P k5 v11  f3 f1 f3  P k7 v9  f1 f3  P k6 v11  Q k7]
             -> token ids  [12, 5, 11, 3, 1, 3, 12, 7, 9, 1, 3, 12, 6, 11, 13, 7]
    targets: -> [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 9]

The premise about key 7 (value 9) starts at position 6, the question at position 14: distance 8. ``P k6 v11``
is a distractor between them, ``P k5 v11`` one before the premise.
(``tests/data/test_distant_premise.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask

PREMISE_LEN, QUESTION_LEN = 3, 2


class DistantPremise(SyntheticTask):
    """A premise ``distance`` tokens before its question, among filler and distractor premises.

    Args:
        distance: tokens from the start of the premise to the start of the question; an int, or a list of ints
            drawn uniformly per example. Each must be at least 3 (the premise's length).
        num_distractors: premises about other keys, of the same form (needs num_keys > num_distractors).
        seq_len: length of every example; None: the shortest that fits the largest distance and the distractors.
        num_filler: size of the filler vocabulary.
        num_keys: size of the key vocabulary.
        num_values: size of the value vocabulary (chance accuracy is 1 / num_values).
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(
        self,
        distance: int | list[int] = 64,
        num_distractors: int = 8,
        seq_len: int | None = None,
        num_filler: int = 32,
        num_keys: int = 32,
        num_values: int = 32,
        heldout_buckets: int = 10,
    ) -> None:
        super().__init__(heldout_buckets)
        distances = [distance] if isinstance(distance, int) else list(distance)
        if not distances or any(not isinstance(d, int) or d < PREMISE_LEN for d in distances):
            raise ValueError(f"DistantPremise: distance must be an int >= {PREMISE_LEN} or a non-empty list of them, got {distance!r}")
        if num_distractors < 0 or num_keys <= num_distractors:
            raise ValueError(f"DistantPremise: need 0 <= num_distractors < num_keys ({num_keys}), got num_distractors={num_distractors}")
        if num_filler < 1 or num_values < 2:
            raise ValueError(f"DistantPremise: need num_filler >= 1 and num_values >= 2, got {num_filler} and {num_values}")
        # One premise more than the distractors need as slack: the two free spans (before the premise, between
        # it and the question) each waste up to two tokens that cannot hold a premise.
        needed = max(max(distances) + QUESTION_LEN, PREMISE_LEN * (num_distractors + 2) + QUESTION_LEN)
        if seq_len is not None and seq_len < needed:
            raise ValueError(
                f"DistantPremise: seq_len={seq_len} is too short for distance {max(distances)} and "
                f"{num_distractors} distractors; it needs at least {needed}"
            )
        self.distances = sorted(set(distances))
        self.num_distractors, self._seq_len = num_distractors, needed if seq_len is None else seq_len
        self.num_filler, self.num_keys, self.num_values = num_filler, num_keys, num_values
        self.key0, self.value0 = 1 + num_filler, 1 + num_filler + num_keys
        self.premise, self.question = 1 + num_filler + num_keys + num_values, 2 + num_filler + num_keys + num_values

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
        q_at = self._seq_len - QUESTION_LEN
        p_at = q_at - distance
        keys = self.key0 + rng.choice(self.num_keys, size=self.num_distractors + 1, replace=False)
        values = self.value0 + rng.integers(0, self.num_values, size=self.num_distractors + 1)
        # Free spans: before the premise, and between the premise and the question.
        before, between = p_at, distance - PREMISE_LEN
        cap_before, cap_between = before // PREMISE_LEN, between // PREMISE_LEN
        n_between = 0
        if self.num_distractors:
            n_between = int(rng.binomial(self.num_distractors, between / max(1, before + between)))
            n_between = min(max(n_between, 1 if cap_between else 0), cap_between)
            n_between = max(n_between, self.num_distractors - cap_before)  # what does not fit before goes between
        starts = [*self._place(rng, before, self.num_distractors - n_between)]
        starts += [p_at + PREMISE_LEN + s for s in self._place(rng, between, n_between)]
        input_ids = (1 + rng.integers(0, self.num_filler, size=self._seq_len)).astype(np.int64)
        input_ids[p_at : p_at + PREMISE_LEN] = [self.premise, keys[0], values[0]]
        for start, key, value in zip(starts, keys[1:], values[1:], strict=True):
            input_ids[start : start + PREMISE_LEN] = [self.premise, key, value]
        input_ids[q_at:] = [self.question, keys[0]]
        targets = np.full(self._seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[-1] = values[0]
        return Example(input_ids, targets, {"distance": distance, "distractors": self.num_distractors, "between": n_between})
