"""Logic chains (experiment E1): follow ``a -> b`` implications for L hops, among distractor edges.

A sequence states facts, one per three tokens ``a REL b``, shuffled; then a query ``QUERY start HOP ... HOP``
with L ``HOP`` tokens (the proof length, written in unary so a model trained on L <= 4 can at least be asked
about L = 8 with tokens it has seen). The target at the last ``HOP`` is the node reached from ``start`` after
L hops along ``->``. Nothing follows the query, and the query holds no node but ``start``.

Why the answer is unique although chain nodes branch: the chain relation ``->`` is *functional* in every
example: each node has at most one outgoing ``->`` edge. Distractors come in two kinds:

* branches: ``c ~> x`` out of chain nodes ``c``, written with a different relation token ``~>`` (think
  "is not"), so a model that ignores the relation token takes a wrong turn;
* off-chain ``->`` edges ``u -> v`` whose source ``u`` is not a chain node (the target ``v`` may be any node,
  so they form other chains, some merging into the queried one). They share the form of the real facts,
  so a model that ignores which node the chain is at picks a wrong edge.

The chain also runs on for 0..``max_extra`` edges past the answer, so "the end of the chain" is not a
shortcut for "the answer": the hop count must be used.

Token ids (``num_nodes = N``): PAD 0, nodes 1..N, ``->`` N+1, ``~>`` N+2, ``QUERY`` N+3, ``HOP`` N+4.
Examples are left-padded with PAD to ``seq_len``, so a short-chain and a long-chain instance built with the
same ``num_nodes`` and ``seq_len`` share one token layout and one held-out hash (the length-generalisation
test set ``LogicChains(max_hops=8, seq_len=S)`` is disjoint from the training split of
``LogicChains(max_hops=4, seq_len=S)``; examples with more hops differ in their query anyway). The amount
of padding tells the number of facts, hence hops + extra, but never which node is the answer.

Worked example (``LogicChains(num_nodes=8, min_hops=2, max_hops=2, num_distractors=2, max_extra=1)``, seed 0,
train index 0)::

    ids:     nodes 1..8, -> = 9, ~> = 10, QUERY = 11, HOP = 12
    input:   [3 -> 5  4 -> 7  6 -> 5  3 ~> 7  5 -> 4  QUERY 3 HOP HOP]
             -> token ids  [3, 9, 5, 4, 9, 7, 6, 9, 5, 3, 10, 7, 5, 9, 4, 11, 3, 12, 12]
    targets: -> [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 4]

The chain is 3 -> 5 -> 4, and runs on for one extra edge, 4 -> 7, so its end (7) is not the answer (4);
``3 ~> 7`` branches out of chain node 3 with the other relation; ``6 -> 5`` is an off-chain edge merging into
the chain. This example fills ``seq_len`` exactly; shorter ones start with PAD (0) tokens.
(``tests/data/test_logic_chains.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask


class LogicChains(SyntheticTask):
    """Multi-hop implication chains with branching distractors; the answer is the node L hops from the start.

    Args:
        num_nodes: size of the node vocabulary.
        min_hops: shortest proof length L drawn (uniformly in min_hops..max_hops).
        max_hops: longest proof length L drawn.
        num_distractors: distractor edges per example: half (rounded up) are branches ``c ~> x`` out of chain
            nodes, the rest off-chain ``u -> v`` edges.
        max_extra: the chain continues for 0..max_extra edges past the answer (drawn uniformly).
        seq_len: length of every example (left-padded); None: the shortest length that fits ``max_hops``.
            Give the training and the length-generalisation instance the same value.
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(
        self,
        num_nodes: int = 32,
        min_hops: int = 1,
        max_hops: int = 4,
        num_distractors: int = 8,
        max_extra: int = 2,
        seq_len: int | None = None,
        heldout_buckets: int = 10,
    ) -> None:
        super().__init__(heldout_buckets)
        if min_hops < 1 or max_hops < min_hops:
            raise ValueError(f"LogicChains: need 1 <= min_hops <= max_hops, got min_hops={min_hops}, max_hops={max_hops}")
        if num_distractors < 0 or max_extra < 0:
            raise ValueError(f"LogicChains: num_distractors ({num_distractors}) and max_extra ({max_extra}) must be >= 0")
        self.num_branches = (num_distractors + 1) // 2
        self.num_offchain = num_distractors - self.num_branches
        # Chain nodes, plus one distinct source per off-chain edge, plus at least one other node as a target.
        needed_nodes = max_hops + max_extra + 1 + self.num_offchain + 1
        if num_nodes < needed_nodes:
            raise ValueError(
                f"LogicChains: num_nodes={num_nodes} is too small; max_hops + max_extra + 1 chain nodes plus "
                f"{self.num_offchain} off-chain sources plus one need num_nodes >= {needed_nodes}"
            )
        self.num_nodes, self.min_hops, self.max_hops = num_nodes, min_hops, max_hops
        self.num_distractors, self.max_extra = num_distractors, max_extra
        self.pad, self.rel, self.nrel = 0, num_nodes + 1, num_nodes + 2
        self.query, self.hop = num_nodes + 3, num_nodes + 4
        self.min_seq_len = 3 * (max_hops + max_extra + num_distractors) + 2 + max_hops
        if seq_len is not None and seq_len < self.min_seq_len:
            raise ValueError(f"LogicChains: seq_len={seq_len} cannot hold max_hops={max_hops}; it needs at least {self.min_seq_len}")
        self._seq_len = self.min_seq_len if seq_len is None else seq_len

    @property
    def chance(self) -> float:
        """A uniform guess over the nodes."""
        return 1 / self.num_nodes

    @property
    def vocab_size(self) -> int:
        return self.num_nodes + 5

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def generate(self, rng: np.random.Generator) -> Example:
        hops = int(rng.integers(self.min_hops, self.max_hops + 1))
        extra = int(rng.integers(0, self.max_extra + 1))
        order = 1 + rng.permutation(self.num_nodes)  # node ids in random order
        chain = order[: hops + extra + 1]  # chain[0] = start, chain[hops] = answer
        others = order[hops + extra + 1 :]  # never chain nodes: off-chain sources come from here
        facts = [(chain[i], self.rel, chain[i + 1]) for i in range(hops + extra)]
        for _ in range(self.num_branches):
            source = chain[rng.integers(0, len(chain))]
            target = 1 + rng.integers(0, self.num_nodes - 1)
            target += target >= source  # any node but the source itself
            facts.append((source, self.nrel, target))
        for source in others[: self.num_offchain]:  # distinct sources: -> stays functional
            target = 1 + rng.integers(0, self.num_nodes - 1)
            target += target >= source
            facts.append((source, self.rel, target))
        shuffled = np.asarray(facts, dtype=np.int64)[rng.permutation(len(facts))].reshape(-1)
        query = np.array([self.query, chain[0]] + [self.hop] * hops, dtype=np.int64)
        body = np.concatenate([shuffled, query])
        input_ids = np.concatenate([np.full(self._seq_len - len(body), self.pad, dtype=np.int64), body])
        targets = np.full(self._seq_len, IGNORE_INDEX, dtype=np.int64)
        targets[-1] = chain[hops]
        return Example(input_ids, targets, {"hops": hops, "extra": extra, "distractors": self.num_distractors})

    def follow(self, input_ids: np.ndarray) -> int:
        """Solve an example from its input alone (the oracle tests use): follow ``->`` from the start, L hops."""
        query_at = int(np.flatnonzero(input_ids == self.query)[-1])
        start, hops = int(input_ids[query_at + 1]), int((input_ids[query_at:] == self.hop).sum())
        facts = input_ids[:query_at]
        facts = facts[facts != self.pad].reshape(-1, 3)
        step = {int(a): int(b) for a, r, b in facts if r == self.rel}
        node = start
        for _ in range(hops):
            node = step[node]
        return node
