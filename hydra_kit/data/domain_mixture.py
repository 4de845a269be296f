"""Domain mixture (experiment E5): sequence transformations from several rule domains, one domain per example.

Every example applies one domain's rule to ``n`` operand symbols (values 0..M-1, shared by all domains):

* ``copy``: y = x;  ``reverse``: y = x reversed;  ``sort``: y = x in ascending order;
* ``prefix_sum``: y_i = (x_1 + ... + x_i) mod M;  ``successor``: y_i = (x_i + 1) mod M (a pointwise rule);
* ``rotate``: y = x shifted left by one (x_2, ..., x_n, x_1).

Layout: ``[x_1 .. x_n  OP_d  POS_1 .. POS_n]``, where ``OP_d`` is the domain's operator token and ``POS_i``
asks for output symbol i; the target at ``POS_i`` is ``y_i``. The outputs are never fed back as inputs (the
answer positions hold only position tokens), so no answer appears at or after the position that predicts it.

Is the domain given away? It must be identifiable, or the task is ill-posed (the same operands have a
different answer in every domain). We give it as the operator token, *after* the operands: operands share one
vocabulary and carry no domain information, so a router that specialises by token identity cannot separate
domains on them; at the answer positions the domain is known (through the operator, read by sequence mixing)
and needed. Expert specialisation is therefore meaningful at the answer positions, where experiments should
measure it (``Example.meta["domain"]`` is the label).

Token ids (``num_symbols = M``, ``num_domains = K``, ``n`` operands): PAD 0, symbol value s is token 1 + s
(1..M), OP_d M+1..M+K, POS_i M+K+1..M+K+n. ``n = (seq_len - 1) // 2``; an even ``seq_len`` starts with one PAD.

Worked example (``DomainMixture(num_domains=4, seq_len=9, num_symbols=5)``, seed 0, train index 0)::

    ids:     symbols 0..4 = tokens 1..5, OP copy/reverse/sort/prefix_sum = 6..9, POS_1..POS_4 = 10..13
    domain:  prefix_sum (OP 9); operands 3 2 1 1 -> running sums 3 5 6 7 -> mod 5: 3 0 1 2
    input:   [4, 3, 2, 2, 9, 10, 11, 12, 13]
    targets: [-100, -100, -100, -100, -100, 4, 1, 2, 3]

(``tests/data/test_domain_mixture.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask


def _prefix_sum(x: np.ndarray, m: int) -> np.ndarray:
    return np.cumsum(x) % m


RULES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "copy": lambda x, m: x.copy(),
    "reverse": lambda x, m: x[::-1].copy(),
    "sort": lambda x, m: np.sort(x),
    "prefix_sum": _prefix_sum,
    "successor": lambda x, m: (x + 1) % m,
    "rotate": lambda x, m: np.roll(x, -1),
}
DOMAINS = tuple(RULES)


class DomainMixture(SyntheticTask):
    """A mixture of rule domains (copy, reverse, sort, modular prefix sum, ...), one per example, drawn uniformly.

    Args:
        num_domains: how many of the domains, in the order copy, reverse, sort, prefix_sum, successor, rotate.
        seq_len: length of every example: ``n = (seq_len - 1) // 2`` operands, the operator, n answer positions.
        num_symbols: operand alphabet size M (also the modulus of the arithmetic rules).
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(self, num_domains: int = 4, seq_len: int = 33, num_symbols: int = 10, heldout_buckets: int = 10) -> None:
        super().__init__(heldout_buckets)
        if not 1 <= num_domains <= len(DOMAINS):
            raise ValueError(f"DomainMixture: num_domains must lie in 1..{len(DOMAINS)} ({', '.join(DOMAINS)}), got {num_domains}")
        if seq_len < 5:
            raise ValueError(f"DomainMixture: seq_len must be at least 5 (two operands), got {seq_len}")
        if num_symbols < 2:
            raise ValueError(f"DomainMixture: num_symbols must be at least 2, got {num_symbols}")
        self.num_domains, self._seq_len, self.num_symbols = num_domains, seq_len, num_symbols
        self.domains = DOMAINS[:num_domains]
        self.length = (seq_len - 1) // 2
        self.op0, self.pos0 = 1 + num_symbols, 1 + num_symbols + num_domains

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
        x = rng.integers(0, self.num_symbols, size=self.length)
        y = RULES[self.domains[domain]](x, self.num_symbols)
        pad = self._seq_len - (2 * self.length + 1)
        input_ids = np.concatenate([np.zeros(pad), 1 + x, [self.op0 + domain], self.pos0 + np.arange(self.length)]).astype(np.int64)
        targets = np.full(self._seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[self._seq_len - self.length :] = 1 + y
        return Example(input_ids, targets, {"domain": domain, "domain_name": self.domains[domain]})
