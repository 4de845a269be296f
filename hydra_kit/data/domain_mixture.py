"""Domain mixture (experiment E5): sequence transformations from several rule domains, one domain per example.

Every example applies one domain's rule to ``n`` distinct operand symbols (values 0..M-1, shared by all domains):

* ``copy``: y = x;  ``reverse``: y = x reversed;  ``rotate``: y = x shifted left by one (x_2, ..., x_n, x_1);
* ``difference``: y_i = (x_{i+1} - x_i) mod M, cyclically (y_n = x_1 - x_n);
* ``prefix_sum``: y_i = (x_1 + ... + x_i) mod M;  ``successor``: y_i = (x_i + 1) mod M (a pointwise rule).

Layout: ``[x_1 .. x_n  OP_d  POS_1 .. POS_n]``, where ``OP_d`` is the domain's operator token and ``POS_i``
asks for output symbol i; the target at ``POS_i`` is ``y_i``. The outputs are never fed back as inputs (the
answer positions hold only position tokens), so no answer appears at or after the position that predicts it.

Only positions whose answer needs the domain's rule are scored (in a first version, prefix sum's first answer was
just the first operand; :meth:`DomainMixture.heuristics` measures the shortcuts and
``tests/data/test_domain_mixture.py`` checks each stays near chance). A position keeps ``IGNORE_INDEX`` when its
answer copies the first or the last operand (copy's ends, reverse's ends, rotate's last two, prefix sum's first),
or the operand that another domain of the mixture copies there (reverse and copy in the middle of an odd n;
reverse and rotate at n/2 of an even n): a model that ignores the operator would be right there. Operands are
distinct, so no operand is more frequent than another, and a rule that copies an operand is no easier to fake
than guessing one of the n operands (1 / n, near chance 1 / M when n is a good part of M). Sorting, a domain
this task used to have, is gone: its answers are order statistics, which a per-position prior guesses.

Is the domain given away? It must be identifiable, or the task is ill-posed (the same operands have a
different answer in every domain). We give it as the operator token, *after* the operands: operands share one
vocabulary and carry no domain information, so a router that specialises by token identity cannot separate
domains on them; at the answer positions the domain is known (through the operator, read by sequence mixing)
and needed. Expert specialisation is therefore meaningful at the answer positions, where experiments should
measure it (``Example.meta["domain"]`` is the label).

Token ids (``num_symbols = M``, ``num_domains = K``, ``n`` operands): PAD 0, symbol value s is token 1 + s
(1..M), OP_d M+1..M+K, POS_i M+K+1..M+K+n. ``n = (seq_len - 1) // 2``; an even ``seq_len`` starts with one PAD.

Worked examples (``DomainMixture(num_domains=4, seq_len=9, num_symbols=5)``, seed 0, train indices 0 and 2)::

    ids:     symbols 0..4 = tokens 1..5, OP copy/reverse/difference/prefix_sum = 6..9, POS_1..POS_4 = 10..13

    index 0, prefix_sum (OP 9); operands 2 3 4 1 -> running sums 2 5 9 10 -> mod 5: 2 0 4 0; the first answer
    (the first operand) is not scored:
    input:   [3, 4, 5, 2, 9, 10, 11, 12, 13]
    targets: [-100, -100, -100, -100, -100, -100, 1, 5, 1]

    index 2, copy (OP 6); operands 1 4 2 3; the first and last answers (the first and last operands) are not
    scored:
    input:   [2, 5, 3, 4, 6, 10, 11, 12, 13]
    targets: [-100, -100, -100, -100, -100, -100, 5, 3, -100]

(``tests/data/test_domain_mixture.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, Heuristic, SyntheticTask


def _prefix_sum(x: np.ndarray, m: int) -> np.ndarray:
    return np.cumsum(x) % m


RULES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "copy": lambda x, m: x.copy(),
    "reverse": lambda x, m: x[::-1].copy(),
    "difference": lambda x, m: (np.roll(x, -1) - x) % m,
    "prefix_sum": _prefix_sum,
    "successor": lambda x, m: (x + 1) % m,
    "rotate": lambda x, m: np.roll(x, -1),
}
DOMAINS = tuple(RULES)

# Which operand each answer copies, for the rules whose answer at a position is one operand: n -> index per
# position, -1 where the answer is computed. Used to leave unscored the positions a shortcut answers.
SOURCES: dict[str, Callable[[int], np.ndarray]] = {
    "copy": lambda n: np.arange(n),
    "reverse": lambda n: np.arange(n)[::-1].copy(),
    "difference": lambda n: np.full(n, -1),
    "prefix_sum": lambda n: np.array([0] + [-1] * (n - 1)),
    "successor": lambda n: np.full(n, -1),
    "rotate": lambda n: np.roll(np.arange(n), -1),
}


class DomainMixture(SyntheticTask):
    """A mixture of rule domains (copy, reverse, difference, modular prefix sum, ...), one per example, drawn uniformly.

    Args:
        num_domains: how many of the domains, in the order copy, reverse, difference, prefix_sum, successor, rotate.
        seq_len: length of every example: ``n = (seq_len - 1) // 2`` operands, the operator, n answer positions.
        num_symbols: operand alphabet size M (also the modulus of the arithmetic rules), more than n: operands are
            distinct. Chance accuracy is 1 / M; a rule that copies an operand cannot be told from guessing one
            of the n operands, 1 / n, unless n is near M.
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(self, num_domains: int = 4, seq_len: int = 33, num_symbols: int = 32, heldout_buckets: int = 10) -> None:
        super().__init__(heldout_buckets)
        if not 1 <= num_domains <= len(DOMAINS):
            raise ValueError(f"DomainMixture: num_domains must lie in 1..{len(DOMAINS)} ({', '.join(DOMAINS)}), got {num_domains}")
        if seq_len < 7:
            raise ValueError(f"DomainMixture: seq_len must be at least 7 (three operands), got {seq_len}")
        length = (seq_len - 1) // 2
        if num_symbols <= length:
            raise ValueError(f"DomainMixture: num_symbols must exceed the {length} operands of seq_len={seq_len} (operands are distinct), got {num_symbols}")
        self.num_domains, self._seq_len, self.num_symbols = num_domains, seq_len, num_symbols
        self.domains = DOMAINS[:num_domains]
        self.length = length
        self.op0, self.pos0 = 1 + num_symbols, 1 + num_symbols + num_domains
        sources = {d: SOURCES[d](length) for d in self.domains}
        # A position is scored only if its answer needs the domain's rule: not when it copies the first or the
        # last operand (a shortcut for every domain), nor the operand another domain's rule copies there.
        self.scored = np.ones((num_domains, length), dtype=bool)
        for k, d in enumerate(self.domains):
            for i, src in enumerate(sources[d]):
                if src < 0:
                    continue
                others = [sources[e][i] for e in self.domains if e != d]
                self.scored[k, i] = src not in (0, length - 1) and src not in others
        self._prior: dict[tuple[int, int], int] | None = None

    @property
    def chance(self) -> float:
        """A uniform guess over the symbols."""
        return 1 / self.num_symbols

    @property
    def vocab_size(self) -> int:
        return self.pos0 + self.length

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def generate(self, rng: np.random.Generator) -> Example:
        domain = int(rng.integers(0, self.num_domains))
        x = rng.choice(self.num_symbols, size=self.length, replace=False)
        y = RULES[self.domains[domain]](x, self.num_symbols)
        pad = self._seq_len - (2 * self.length + 1)
        input_ids = np.concatenate([np.zeros(pad), 1 + x, [self.op0 + domain], self.pos0 + np.arange(self.length)]).astype(np.int64)
        targets = np.full(self._seq_len, IGNORE_INDEX, dtype=np.int64)
        answers = targets[self._seq_len - self.length :]  # a view: the answer positions
        answers[self.scored[domain]] = 1 + y[self.scored[domain]]
        return Example(input_ids, targets, {"domain": domain, "domain_name": self.domains[domain]})

    # --- no-skill baselines ---

    def _parse(self, input_ids: np.ndarray, t: int) -> tuple[np.ndarray, int, int]:
        """(operands 0..M-1, domain, answer index i) of answer position ``t``."""
        first = self._seq_len - (2 * self.length + 1)
        x = input_ids[first : first + self.length] - 1
        return x, int(input_ids[first + self.length] - self.op0), t - (first + self.length + 1)

    def heuristics(self) -> dict[str, Heuristic]:
        """Shortcuts that answer without the domain's rule.

        * ``first operand``, ``last operand`` (the symbol before the operator), ``most frequent operand`` (the
          smallest on a tie): the copies a first version allowed (prefix sum's first answer was the first operand);
        * ``as if <domain>`` for each domain of the mixture: that domain's rule applied whatever the operator
          says; on that domain's own examples, where it would be the rule itself, it answers the first operand.
          Its score is what a model that mixes up the domains gets;
        * ``position prior``: the answer most often seen at this (operator, position) in 3000 training examples
          (sorting, the domain this replaced, scored 0.21 against chance 0.03 this way: order statistics).

        No "not asked before" rule is listed (as MQAR and DistantPremise have): the answer positions hold the same
        ``POS_i`` tokens in the same order in every example, so earlier positions rule nothing out, and the
        earlier answers, which a permutation rule would exclude, are never in the input.
        """

        def first(input_ids: np.ndarray, t: int) -> int:
            return int(self._parse(input_ids, t)[0][0] + 1)

        def last(input_ids: np.ndarray, t: int) -> int:
            return int(self._parse(input_ids, t)[0][-1] + 1)

        def most_frequent(input_ids: np.ndarray, t: int) -> int:
            return int(np.bincount(self._parse(input_ids, t)[0]).argmax() + 1)

        def other_domains(name: str) -> Heuristic:
            def rule(input_ids: np.ndarray, t: int) -> int:
                x, domain, i = self._parse(input_ids, t)
                if self.domains[domain] == name:
                    return int(x[0] + 1)
                return int(RULES[name](x, self.num_symbols)[i] + 1)

            return rule

        if self._prior is None:
            seen: dict[tuple[int, int], Counter[int]] = defaultdict(Counter)
            for j in range(3000):
                example = self.sample(0, "train", j)
                for t in np.flatnonzero(example.targets != IGNORE_INDEX):
                    _, domain, i = self._parse(example.input_ids, int(t))
                    seen[(domain, i)][int(example.targets[t])] += 1
            self._prior = {cell: counter.most_common(1)[0][0] for cell, counter in seen.items()}
        prior = self._prior

        def position_prior(input_ids: np.ndarray, t: int) -> int:
            _, domain, i = self._parse(input_ids, t)
            return prior.get((domain, i), 1)

        heuristics: dict[str, Heuristic] = {"first operand": first, "last operand": last, "most frequent operand": most_frequent}
        heuristics.update({f"as if {name}": other_domains(name) for name in self.domains})
        heuristics["position prior"] = position_prior
        return heuristics
