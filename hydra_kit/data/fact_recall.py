"""Fact recall, closed- and open-book (experiment E3): recall a stored fact, or read one from the prompt.

A fixed fact table, drawn once from ``table_seed``, gives every subject ``s`` a value ``table[s]``. A subject is
two tokens ``a b`` from a shared pool of n tokens (every pair is a subject: ``num_facts = n * n``). A sequence
lists facts ``a b v`` (three tokens each), then ``SEP``, then query subjects ``a b``; the target at each query's
second token is its answer:

* closed-book: the asked subjects are *not* in the prompt; the answer is ``table[s]``, which a model can only
  know by having stored it during training (this is the product-key memory's job);
* open-book: each asked subject *is* in the prompt, among distractor facts, and the answer is the value the
  prompt states. With probability ``counterfactual`` that value is a random value *other than* ``table[s]``
  (a counterfactual context), otherwise it is ``table[s]``. So reading and recalling can be told apart: on
  counterfactual questions a model that recalls instead of reading is wrong (``Example.meta["counterfactual"]``
  counts them), and a model that reads is right whether or not it stored the table.

Why two-token subjects and a balanced table (a first version's closed-book recall was a bigram: one subject token
named the fact, so an embedding table answered it; :meth:`FactRecall.heuristics` measures the shortcuts and
``tests/data/test_fact_recall.py`` checks each stays near chance): the table is a *frequency square*, every row
(first token) and every column (second token) holding each value equally often, so no single token says
anything about the value: a bigram from the last subject token, or from the first, is right 1 / num_values of
the time, and only the pair identifies the fact.

The prompt's values are distinct, and by default (``context_facts = num_values - num_queries``) every value is
stated exactly once, so "the most frequent value in the prompt" or "the last one" is chance too; with fewer
context facts, guessing a stated value scores 1 / (prompt facts) on open-book questions. With several queries an
open-book guess can skip the facts whose subjects earlier queries asked (1 / (prompt facts - i) at query i,
counted from 0; listed in :meth:`FactRecall.heuristics`). Distractor facts are true
table facts of other subjects. Both books hold the same number of facts, ``context_facts + num_queries``
(closed-book prompts get ``num_queries`` more distractors), so the length or layout of a prompt never tells the
book; only whether the asked subject appears does. Nothing after ``SEP`` is a value.

Held-out data: closed-book questions must be about subjects seen in training (a fact never trained on cannot be
recalled), so held-out examples are new *prompts* (a different set and order of context facts), disjoint from
training by the base class's hash of the input tokens, not new facts. Pass the same ``table_seed`` to the
training and the test instance.

Token ids (``num_facts = n * n``, ``num_values = V``): subject tokens 1..n, values n+1..n+V, SEP n+V+1.

Worked examples (``FactRecall(num_facts=16, num_values=4, table_seed=0, mode="mixed", num_queries=1)``, seed 0,
train indices 0 and 8). Subject tokens are 1..4, values 5..8, SEP 9; three context facts (every value stated
once), and the table (rows: first token 1..4, columns: second token 1..4) is a Latin square::

    [[7, 6, 8, 5],
     [8, 5, 7, 6],
     [6, 8, 5, 7],
     [5, 7, 6, 8]]

    index 0, closed-book (subject 3 1 is not in the prompt; table[3 1] = 6):
    input:   [4 3 v6  3 2 v8  1 4 v5  4 2 v7  SEP 3 1]  -> token ids  [4, 3, 6, 3, 2, 8, 1, 4, 5, 4, 2, 7, 9, 3, 1]
    targets: -> [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 6]

    index 8, open-book, counterfactual (the prompt says 3 3 -> 7 although table[3 3] = 5; the answer is 7):
    input:   [4 3 v6  3 3 v7  4 1 v5  2 1 v8  SEP 3 3]  -> token ids  [4, 3, 6, 3, 3, 7, 4, 1, 5, 2, 1, 8, 9, 3, 3]
    targets: -> [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 7]

(``tests/data/test_fact_recall.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, Heuristic, SyntheticTask

MODES = ("closed", "open", "mixed")


def balanced_table(rng: np.random.Generator, n: int, num_values: int) -> np.ndarray:
    """A random (n, n) table of value indices in which every row and every column holds each value n / num_values times.

    Built row by row: each row is a random assignment of the columns to values, each value used n / num_values
    times, where a column may take a value it holds fewer than n / num_values times (a bipartite matching,
    found by augmenting paths from a random start; one always exists, as for Latin rectangles). Then rows and
    columns are shuffled. With n == num_values the table is a Latin square.
    """
    per = n // num_values
    held = np.zeros((n, num_values), dtype=np.int64)  # held[j, v]: rows so far with value v in column j
    table = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        table[i] = _assign_row(rng, held < per, per)
        held[np.arange(n), table[i]] += 1
    return table[rng.permutation(n)][:, rng.permutation(n)]


def _assign_row(rng: np.random.Generator, allowed: np.ndarray, per: int) -> np.ndarray:
    """Columns -> values, each value taken by ``per`` columns, column j only by a value with ``allowed[j, v]``."""
    n, num_values = allowed.shape
    assigned = np.full(n, -1, dtype=np.int64)
    columns_of: list[list[int]] = [[] for _ in range(num_values)]

    def place(j: int, visited: set[int]) -> bool:
        options = np.flatnonzero(allowed[j])
        for v in (int(u) for u in options[rng.permutation(len(options))]):
            if v in visited:
                continue
            visited.add(v)
            if len(columns_of[v]) < per:
                columns_of[v].append(j)
                assigned[j] = v
                return True
            for other in list(columns_of[v]):
                if place(other, visited):  # ``other`` moved to another value: v has room for j
                    columns_of[v].remove(other)
                    columns_of[v].append(j)
                    assigned[j] = v
                    return True
        return False

    for j in (int(c) for c in rng.permutation(n)):
        if not place(j, set()):
            raise RuntimeError("balanced_table: no assignment found (cannot happen for a balanced partial table)")
    return assigned


class FactRecall(SyntheticTask):
    """Questions about a fixed table of two-token subjects, answered from memory (closed-book) or the prompt (open-book).

    Args:
        num_facts: subjects in the fact table, a square n * n: every subject is a pair of tokens from a pool of
            n, and n must be a multiple of num_values (so the table can be balanced).
        num_values: size of the value vocabulary (chance accuracy is 1 / num_values).
        table_seed: seed of the fact table; the same for every split, seed and instance that should share facts.
        mode: "closed", "open", or "mixed" (each example open-book with probability ``open_fraction``).
        open_fraction: probability of an open-book example in mixed mode.
        counterfactual: probability that an open-book prompt states a value other than the table's.
        num_queries: subjects asked per example (distinct; all of the example's book).
        context_facts: distractor facts in an open-book prompt (a closed-book prompt has num_queries more);
            the prompt's values are distinct, so context_facts + num_queries <= num_values. None:
            num_values - num_queries, so that every value is stated exactly once.
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(
        self,
        num_facts: int = 256,
        num_values: int = 16,
        table_seed: int = 0,
        mode: str = "mixed",
        open_fraction: float = 0.5,
        counterfactual: float = 0.5,
        num_queries: int = 1,
        context_facts: int | None = None,
        heldout_buckets: int = 10,
    ) -> None:
        super().__init__(heldout_buckets)
        if mode not in MODES:
            raise ValueError(f"FactRecall: mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not 0.0 <= open_fraction <= 1.0 or not 0.0 <= counterfactual <= 1.0:
            raise ValueError(f"FactRecall: open_fraction ({open_fraction}) and counterfactual ({counterfactual}) must lie in [0, 1]")
        if num_values < 2:
            raise ValueError(f"FactRecall: num_values must be at least 2, got {num_values}")
        if num_queries < 1:
            raise ValueError(f"FactRecall: num_queries must be at least 1, got {num_queries}")
        context_facts = num_values - num_queries if context_facts is None else context_facts
        if context_facts < 0 or context_facts + num_queries > num_values:
            raise ValueError(
                f"FactRecall: need 0 <= context_facts and context_facts + num_queries <= num_values ({num_values}; a prompt's "
                f"values are distinct), got context_facts={context_facts}, num_queries={num_queries}"
            )
        pool = math.isqrt(num_facts)
        if pool * pool != num_facts or pool % num_values or pool < 2:
            sizes = ", ".join(str((k * num_values) ** 2) for k in range(1, 5))
            raise ValueError(
                f"FactRecall: num_facts={num_facts} must be n * n with n a multiple of num_values={num_values} (subjects are "
                f"token pairs from a pool of n, balanced over the values); e.g. {sizes}"
            )
        if num_facts < context_facts + 2 * num_queries:
            raise ValueError(f"FactRecall: num_facts={num_facts} is too small for context_facts={context_facts} and num_queries={num_queries}")
        self.num_facts, self.num_values, self.table_seed = num_facts, num_values, table_seed
        self.mode, self.open_fraction, self.counterfactual = mode, open_fraction, counterfactual
        self.num_queries, self.context_facts = num_queries, context_facts
        self.pool = pool
        self.value0, self.sep = pool + 1, pool + num_values + 1
        # The fact table: subject (a, b) (tokens 1..pool) has value token table[a - 1, b - 1]. Its own generator,
        # so it never depends on the example stream's seed.
        self.table = self.value0 + balanced_table(np.random.default_rng(table_seed), pool, num_values)
        flat = self.table.reshape(-1) - self.value0
        self._subjects_of = [np.flatnonzero(flat == v) for v in range(num_values)]  # subject indices a * pool + b
        self._fitted: tuple[dict[int, int], dict[int, int], int] | None = None

    @property
    def chance(self) -> float:
        """A uniform guess over the value vocabulary."""
        return 1 / self.num_values

    @property
    def vocab_size(self) -> int:
        return self.sep + 1

    @property
    def seq_len(self) -> int:
        return 3 * (self.context_facts + self.num_queries) + 1 + 2 * self.num_queries

    def subject_tokens(self, subject: int) -> tuple[int, int]:
        """The two tokens of subject index ``subject`` (0 .. num_facts - 1)."""
        return 1 + subject // self.pool, 1 + subject % self.pool

    def generate(self, rng: np.random.Generator) -> Example:
        is_open = self.mode == "open" or (self.mode == "mixed" and rng.random() < self.open_fraction)
        table = self.table.reshape(-1)
        asked: list[int] = []
        answers: list[int] = []
        counterfactual = 0
        while len(asked) < self.num_queries:  # distinct subjects with distinct answers
            subject = int(rng.integers(0, self.num_facts))
            answer = int(table[subject])
            flip = is_open and rng.random() < self.counterfactual
            if flip:  # a value other than the table's (and the other answers'), uniformly
                options = [v for v in range(self.value0, self.sep) if v != answer and v not in answers]
                answer = options[int(rng.integers(0, len(options)))]
            if subject in asked or answer in answers:
                continue
            asked.append(subject)
            answers.append(answer)
            counterfactual += flip
        # Distractors: true facts of other subjects, one per value of a random set of values not yet stated.
        n_distract = self.context_facts + (0 if is_open else self.num_queries)
        stated = set(answers) if is_open else set()
        free = np.array([v for v in range(self.num_values) if self.value0 + v not in stated])
        facts = [(s, a) for s, a in zip(asked, answers, strict=True)] if is_open else []
        for v in rng.choice(free, size=n_distract, replace=False):
            candidates = self._subjects_of[int(v)]
            while True:
                subject = int(candidates[rng.integers(0, len(candidates))])
                if subject not in asked and all(subject != s for s, _ in facts):
                    break
            facts.append((subject, self.value0 + int(v)))
        prompt = [tok for i in rng.permutation(len(facts)) for tok in (*self.subject_tokens(facts[i][0]), facts[i][1])]
        query_order = rng.permutation(self.num_queries)
        queries = [tok for i in query_order for tok in self.subject_tokens(asked[i])]
        input_ids = np.array([*prompt, self.sep, *queries], dtype=np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[len(prompt) + 2 :: 2] = np.asarray(answers)[query_order]
        return Example(input_ids, targets, {"book": "open" if is_open else "closed", "counterfactual": counterfactual})

    # --- no-skill baselines ---

    def heuristics(self) -> dict[str, Heuristic]:
        """Shortcuts that answer without the whole subject: one of its tokens, or the prompt's values.

        * ``last subject token``: a bigram model, the value most often asked after this token in 4000
          training examples (with single-token subjects, as in a first version of this task, this *was* closed-book recall);
        * ``first subject token``: the same for the subject's first token;
        * ``commonest answer``: the value most often asked in those training examples;
        * ``most frequent value``: the value stated most often in the prompt (the smallest on a tie);
        * ``last value``: the value of the prompt's last fact;
        * ``first fact not asked before`` (with several queries): the value of the prompt's first fact whose
          subject no earlier query asked. Subjects are asked at most once and the earlier queries' subjects are
          in the input, so on open-book prompts this rules their facts out without reading the current subject
          (1 / (prompt facts - i) at query i, counted from 0); closed-book prompts never state an asked subject,
          so there it rules nothing out.

        Matching only one subject token against the prompt (reading with half the key) is not listed: it is
        reading, the mechanism open-book questions are about, not a shortcut around it.
        """
        if self._fitted is None:
            last: dict[int, Counter[int]] = defaultdict(Counter)
            first: dict[int, Counter[int]] = defaultdict(Counter)
            answers: Counter[int] = Counter()
            for i in range(4000):
                example = self.sample(0, "train", i)
                for t in np.flatnonzero(example.targets != IGNORE_INDEX):
                    answer = int(example.targets[t])
                    last[int(example.input_ids[t])][answer] += 1
                    first[int(example.input_ids[t - 1])][answer] += 1
                    answers[answer] += 1
            self._fitted = (
                {k: c.most_common(1)[0][0] for k, c in last.items()},
                {k: c.most_common(1)[0][0] for k, c in first.items()},
                answers.most_common(1)[0][0],
            )
        by_last, by_first, commonest = self._fitted

        def prompt_values(input_ids: np.ndarray) -> np.ndarray:
            sep_at = int(np.flatnonzero(input_ids == self.sep)[0])
            return input_ids[:sep_at].reshape(-1, 3)[:, 2]

        def most_frequent(input_ids: np.ndarray, t: int) -> int:
            values = prompt_values(input_ids[: t + 1])
            return int(np.bincount(values).argmax()) if len(values) else commonest

        def last_value(input_ids: np.ndarray, t: int) -> int:
            values = prompt_values(input_ids[: t + 1])
            return int(values[-1]) if len(values) else commonest

        def first_not_asked(input_ids: np.ndarray, t: int) -> int:
            sep_at = int(np.flatnonzero(input_ids == self.sep)[0])
            facts = input_ids[:sep_at].reshape(-1, 3)
            earlier = input_ids[sep_at + 1 : t - 1].reshape(-1, 2)  # the subjects of the earlier queries, not the current one
            asked = (facts[:, None, :2] == earlier[None, :, :]).all(axis=2).any(axis=1)
            left = facts[~asked, 2]
            return int(left[0]) if len(left) else commonest

        heuristics: dict[str, Heuristic] = {
            "last subject token": lambda input_ids, t: by_last.get(int(input_ids[t]), commonest),
            "first subject token": lambda input_ids, t: by_first.get(int(input_ids[t - 1]), commonest),
            "commonest answer": lambda input_ids, t: commonest,
            "most frequent value": most_frequent,
            "last value": last_value,
        }
        if self.num_queries > 1:
            heuristics["first fact not asked before"] = first_not_asked
        return heuristics
