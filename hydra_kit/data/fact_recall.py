"""Fact recall, closed- and open-book (experiment E3): recall a stored fact, or read one from the prompt.

A fixed fact table, drawn once from ``table_seed``, gives every subject ``s`` a value ``table[s]``. A sequence
lists facts ``s v`` (two tokens each), then ``SEP``, then query subjects; the target at each query subject is
its answer:

* closed-book: the asked subjects are *not* in the prompt; the answer is ``table[s]``, which a model can only
  know by having stored it during training (this is the product-key memory's job);
* open-book: each asked subject *is* in the prompt, among distractor facts, and the answer is the value the
  prompt states. With probability ``counterfactual`` that value is a random value *other than* ``table[s]``
  (a counterfactual context), otherwise it is ``table[s]``. So reading and recalling can be told apart: on
  counterfactual questions a model that recalls instead of reading is wrong (``Example.meta["counterfactual"]``
  counts them), and a model that reads is right whether or not it stored the table.

Distractor facts are true table facts of other subjects. Both books hold the same number of facts,
``context_facts + num_queries`` (closed-book prompts get ``num_queries`` more distractors), so the length or
layout of a prompt never tells the book; only whether the asked subject appears does. A value token may appear
in the prompt as the value of another subject (values are shared), never as the stated value of the asked
subject in a closed-book prompt; nothing after ``SEP`` is a value.

Held-out data: closed-book questions must be about subjects seen in training (a fact never trained on cannot be
recalled), so held-out examples are new *prompts* (a different set and order of context facts), disjoint from
training by the base class's hash of the input tokens, not new facts. Pass the same ``table_seed`` to the
training and the test instance.

Token ids (``num_facts = F``, ``num_values = V``): subjects 1..F, values F+1..F+V, SEP F+V+1.

Worked examples (``FactRecall(num_facts=6, num_values=4, table_seed=0, mode="mixed", num_queries=1,
context_facts=2)``, seed 0, train indices 0 and 1). Values are tokens 7..10, SEP is 11, and the table is
``[10, 9, 9, 8, 8, 7]`` for subjects 1..6::

    index 0, closed-book (subject 4 is not in the prompt; table[4] = 8):
    input:   [s3 v9  s6 v7  s5 v8  SEP s4]   -> token ids  [3, 9, 6, 7, 5, 8, 11, 4]
    targets: [ -  -   -  -   -  -   -  v8]   -> [-100, -100, -100, -100, -100, -100, -100, 8]

    index 1, open-book, counterfactual (the prompt says 5 -> 7 although table[5] = 8; the answer is 7):
    input:   [s6 v7  s5 v7  s2 v9  SEP s5]   -> token ids  [6, 7, 5, 7, 2, 9, 11, 5]
    targets: [ -  -   -  -   -  -   -  v7]   -> [-100, -100, -100, -100, -100, -100, -100, 7]

(``tests/data/test_fact_recall.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask

MODES = ("closed", "open", "mixed")


class FactRecall(SyntheticTask):
    """Questions about a fixed fact table, answered from memory (closed-book) or from the prompt (open-book).

    Args:
        num_facts: subjects in the fact table (each has one value).
        num_values: size of the value vocabulary (chance accuracy is 1 / num_values).
        table_seed: seed of the fact table; the same for every split, seed and instance that should share facts.
        mode: "closed", "open", or "mixed" (each example open-book with probability ``open_fraction``).
        open_fraction: probability of an open-book example in mixed mode.
        counterfactual: probability that an open-book prompt states a value other than the table's.
        num_queries: subjects asked per example (distinct; all of the example's book).
        context_facts: distractor facts in an open-book prompt (a closed-book prompt has num_queries more).
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(
        self,
        num_facts: int = 256,
        num_values: int = 32,
        table_seed: int = 0,
        mode: str = "mixed",
        open_fraction: float = 0.5,
        counterfactual: float = 0.5,
        num_queries: int = 1,
        context_facts: int = 8,
        heldout_buckets: int = 10,
    ) -> None:
        super().__init__(heldout_buckets)
        if mode not in MODES:
            raise ValueError(f"FactRecall: mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not 0.0 <= open_fraction <= 1.0 or not 0.0 <= counterfactual <= 1.0:
            raise ValueError(f"FactRecall: open_fraction ({open_fraction}) and counterfactual ({counterfactual}) must lie in [0, 1]")
        if num_values < 2:
            raise ValueError(f"FactRecall: num_values must be at least 2, got {num_values}")
        if num_queries < 1 or context_facts < 0:
            raise ValueError(f"FactRecall: need num_queries >= 1 and context_facts >= 0, got {num_queries} and {context_facts}")
        # A closed-book prompt needs context_facts + num_queries subjects other than the num_queries asked.
        if num_facts < context_facts + 2 * num_queries:
            raise ValueError(
                f"FactRecall: num_facts={num_facts} is too small for context_facts={context_facts} and "
                f"num_queries={num_queries}; need num_facts >= context_facts + 2 * num_queries = {context_facts + 2 * num_queries}"
            )
        self.num_facts, self.num_values, self.table_seed = num_facts, num_values, table_seed
        self.mode, self.open_fraction, self.counterfactual = mode, open_fraction, counterfactual
        self.num_queries, self.context_facts = num_queries, context_facts
        self.sep = num_facts + num_values + 1
        # The fact table: value token of subject s is table[s - 1]. Its own generator, so it never depends on
        # the example stream's seed.
        self.table = (1 + num_facts + np.random.default_rng(table_seed).integers(0, num_values, size=num_facts)).astype(np.int64)

    @property
    def chance(self) -> float:
        """A uniform guess over the value vocabulary."""
        return 1 / self.num_values

    @property
    def vocab_size(self) -> int:
        return self.sep + 1

    @property
    def seq_len(self) -> int:
        return 2 * (self.context_facts + self.num_queries) + 1 + self.num_queries

    def generate(self, rng: np.random.Generator) -> Example:
        is_open = self.mode == "open" or (self.mode == "mixed" and rng.random() < self.open_fraction)
        n_prompt = self.context_facts + self.num_queries
        subjects = 1 + rng.permutation(self.num_facts)
        asked = subjects[: self.num_queries]
        answers = self.table[asked - 1].copy()
        counterfactual = 0
        if is_open:
            for i in range(self.num_queries):
                if rng.random() < self.counterfactual:  # a value other than the table's, uniformly
                    other = 1 + self.num_facts + rng.integers(0, self.num_values - 1)
                    answers[i] = other + (other >= answers[i])
                    counterfactual += 1
            prompt_subjects = subjects[:n_prompt]
        else:
            prompt_subjects = subjects[self.num_queries : self.num_queries + n_prompt]
        prompt_values = self.table[prompt_subjects - 1].copy()
        if is_open:
            prompt_values[: self.num_queries] = answers
        order = rng.permutation(n_prompt)
        facts = np.stack([prompt_subjects[order], prompt_values[order]], axis=1).reshape(-1)
        query_order = rng.permutation(self.num_queries)
        input_ids = np.concatenate([facts, [self.sep], asked[query_order]]).astype(np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[2 * n_prompt + 1 :] = answers[query_order]
        return Example(input_ids, targets, {"book": "open" if is_open else "closed", "counterfactual": counterfactual})
