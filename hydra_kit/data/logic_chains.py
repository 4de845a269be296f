"""Logic chains (experiment E1): follow ``a -> b`` implications for L hops, among chains of the same shape.

A sequence states facts, one per three tokens ``a REL b``, shuffled; then a query ``QUERY start HOP ... HOP``
with L ``HOP`` tokens (the proof length, written in unary so a model trained on L <= 4 can at least be asked
about L = 8 with tokens it has seen). The target at the last ``HOP`` is the node reached from ``start`` after
L hops along ``->``. Nothing follows the query, and the query holds no node but ``start``.

The ``->`` facts form ``num_chains`` disjoint *closed* chains of ``chain_len`` nodes each (``a -> b -> ... -> a``),
and ``num_distractors`` branches ``c ~> x`` are added. The queried chain is one of the chains and ``start``
one of its nodes, both at random. Each of these choices removes a shortcut a model could learn instead of
following edges (measured by :meth:`LogicChains.heuristics`; ``tests/data/test_logic_chains.py``
checks each stays near chance):

* a closed chain has no end: every node has an outgoing ``->`` edge, so there is always an edge past the
  answer, and "the end of the chain" or "a node with no outgoing edge" is never the answer. A chain has at
  least ``2 * max_hops`` nodes, so walking backwards round it is never shorter than the L hops asked;
* every example has the same number of facts (all chains, all branches), so the amount of padding tells
  nothing about the chain; the ``HOP`` count is the only hop signal (the padding before the query shrinks
  by one per ``HOP``, which says the same);
* every node on a chain occurs exactly twice in the ``->`` facts (with the default ``chain_len`` every node
  is on a chain), the answer included, and branches leave from and arrive at any node (the start and the
  answer included), so how often a node is mentioned does not single out the answer;
* branches use another relation token ``~>`` (think "is not"), so a model that ignores the relation takes a
  wrong turn; ``->`` stays *functional* (each node has one outgoing ``->`` edge), so the answer is unique.

With ``num_queries`` Q > 1 (for training) the facts are followed by Q queries, each from another start node and
with its own proof length; each query is scored like the single one (its last ``HOP``, or every ``HOP``). One
forward pass over the ~130-token prompt then yields Q answers instead of one, as MQAR asks many keys of one
context: on the CPU a small transformer did not learn E1's task with one query per example in 1,000 steps
(``docs/calibration/2026-12-05-distant-premise``). The first query is the one a single-query example would
have, right after the facts, so held-out evaluation (Q = 1) asks the question training asked first. Starts
are distinct nodes drawn at random from the chains; a later query names only its start, never an answer.
Examples are split (train / held-out) by a hash of their facts alone, so a held-out prompt is never trained
on under other questions or another number of them.

With ``supervise_every_hop`` (for training) every ``HOP`` carries a target: the ``i``-th ``HOP`` the node ``i``
hops from ``start``. The input is unchanged and a prefix of a query is a query (``QUERY start HOP HOP`` asks
two hops whatever follows), so this is the same task with ``L`` answers per example instead of one; the
intermediate nodes are never in the input. It gives a small model more signal per sequence (one answer
per ~130 tokens is little on a CPU budget, see ``docs/calibration/2026-12-05-distant-premise``); held-out
evaluation at proof length ``L`` scores the last ``HOP`` only (the flag off).

Token ids (``num_nodes = N``): PAD 0, nodes 1..N, ``->`` N+1, ``~>`` N+2, ``QUERY`` N+3, ``HOP`` N+4.
Examples are left-padded with PAD to ``seq_len``, so a short-query and a long-query instance built with the
same ``num_nodes``, ``num_chains``, ``chain_len``, ``num_distractors`` and ``seq_len`` share one token layout,
one prompt distribution and one held-out hash (the length-generalisation test set ``LogicChains(max_hops=8,
...)`` is disjoint from the training split of ``LogicChains(max_hops=4, ...)`` with the same shape).

Worked example (``LogicChains(num_nodes=8, min_hops=2, max_hops=2, num_distractors=2)``, seed 0, train index 0)::

    ids:     nodes 1..8, -> = 9, ~> = 10, QUERY = 11, HOP = 12
    input:   [4 -> 7  5 -> 4  7 -> 3  2 -> 8  3 -> 5  2 ~> 7  6 -> 1  7 ~> 5  8 -> 6  1 -> 2  QUERY 3 HOP HOP]
             -> token ids  [4, 9, 7, 5, 9, 4, 7, 9, 3, 2, 9, 8, 3, 9, 5, 2, 10, 7, 6, 9, 1, 7, 10, 5, 8, 9, 6, 1, 9, 2, 11, 3, 12, 12]
    targets: -> [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 4]

The closed chains are 3 -> 5 -> 4 -> 7 -> 3 and 2 -> 8 -> 6 -> 1 -> 2. From 3, two hops reach 4, and the chain
runs on; ``2 ~> 7`` and ``7 ~> 5`` are branches (into the queried chain, and out of one of its nodes). Every
example of this instance has ten facts (two closed chains of four nodes, two branches), whatever its hop count. (``tests/data/test_logic_chains.py`` checks that the function produces exactly this.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from hydra_kit.data.task import IGNORE_INDEX, Example, Heuristic, SyntheticTask


class LogicChains(SyntheticTask):
    """Multi-hop implication chains among chains of the same shape; the answer is the node L hops from the start.

    Args:
        num_nodes: size of the node vocabulary (chance accuracy is 1 / num_nodes).
        min_hops: shortest proof length L drawn (uniformly in min_hops..max_hops).
        max_hops: longest proof length L drawn.
        num_distractors: branch facts ``c ~> x`` per example, out of and into any node.
        num_chains: closed chains per example (the queried one and num_chains - 1 others of the same shape), at
            least 2.
        chain_len: nodes (and ``->`` edges) per closed chain, at least 2 * max_hops, so that walking backwards
            round the chain is never shorter than walking L hops forwards; None: num_nodes // num_chains, every
            node on a chain. Give the training and the length-generalisation instance the same value.
        seq_len: length of every example (left-padded); None: the shortest length that fits ``max_hops``.
            Give the training and the length-generalisation instance the same value.
        supervise_every_hop: a target at every ``HOP`` (the node reached so far), not only at the last; the
            inputs, and so the held-out split, are the same either way.
        num_queries: queries after the facts, each from a distinct start node (at most num_chains * chain_len)
            with its own proof length drawn in min_hops..max_hops.
        heldout_buckets: see :class:`SyntheticTask`.
    """

    def __init__(
        self,
        num_nodes: int = 32,
        min_hops: int = 1,
        max_hops: int = 4,
        num_distractors: int = 8,
        num_chains: int = 2,
        chain_len: int | None = None,
        seq_len: int | None = None,
        supervise_every_hop: bool = False,
        num_queries: int = 1,
        heldout_buckets: int = 10,
    ) -> None:
        super().__init__(heldout_buckets)
        # The adjustable arguments as given (None stays None), so that a curriculum stage restores exactly this task.
        self._given = {
            "min_hops": min_hops, "max_hops": max_hops, "num_distractors": num_distractors, "num_chains": num_chains,
            "chain_len": chain_len, "seq_len": seq_len, "supervise_every_hop": supervise_every_hop, "num_queries": num_queries,
        }
        if min_hops < 1 or max_hops < min_hops:
            raise ValueError(f"LogicChains: need 1 <= min_hops <= max_hops, got min_hops={min_hops}, max_hops={max_hops}")
        if not 0 <= num_distractors <= num_nodes * (num_nodes - 2):
            raise ValueError(f"LogicChains: num_distractors must lie in 0..num_nodes * (num_nodes - 2) = {num_nodes * (num_nodes - 2)} (distinct branches), got {num_distractors}")
        if num_chains < 2:
            raise ValueError(f"LogicChains: num_chains must be at least 2 (the queried chain and one like it), got {num_chains}")
        chain_len = num_nodes // num_chains if chain_len is None else chain_len
        if chain_len < 2 * max_hops or num_chains * chain_len > num_nodes:
            raise ValueError(
                f"LogicChains: need 2 * max_hops = {2 * max_hops} <= chain_len and num_chains * chain_len <= num_nodes; got "
                f"chain_len={chain_len}, num_chains={num_chains}, num_nodes={num_nodes} (num_nodes >= {2 * max_hops * num_chains} would do)"
            )
        self.num_nodes, self.min_hops, self.max_hops = num_nodes, min_hops, max_hops
        if not 1 <= num_queries <= num_chains * chain_len:
            raise ValueError(f"LogicChains: num_queries must lie in 1..num_chains * chain_len = {num_chains * chain_len} (one per start node), got {num_queries}")
        self.num_distractors, self.num_chains, self.chain_len = num_distractors, num_chains, chain_len
        self.num_queries = num_queries
        self.pad, self.rel, self.nrel = 0, num_nodes + 1, num_nodes + 2
        self.query, self.hop = num_nodes + 3, num_nodes + 4
        self.num_facts = num_chains * chain_len + num_distractors
        self.min_seq_len = 3 * self.num_facts + num_queries * (2 + max_hops)
        if seq_len is not None and seq_len < self.min_seq_len:
            raise ValueError(
                f"LogicChains: seq_len={seq_len} cannot hold {self.num_facts} facts and {num_queries} quer{'y' if num_queries == 1 else 'ies'} of up to "
                f"max_hops={max_hops}; it needs at least {self.min_seq_len}"
            )
        self._seq_len = self.min_seq_len if seq_len is None else seq_len
        self.supervise_every_hop = supervise_every_hop
        self._length_tell: dict[tuple[int, int], str] | None = None

    #: constructor arguments :meth:`with_params` may change (length and difficulty, not the vocabulary)
    adjustable = ("min_hops", "max_hops", "num_distractors", "num_chains", "chain_len", "seq_len", "supervise_every_hop", "num_queries")

    def params(self) -> dict[str, Any]:
        """The :attr:`adjustable` arguments as given to the constructor (None where the default was taken)."""
        return dict(self._given)

    def with_params(self, changes: Mapping[str, Any]) -> LogicChains:
        """A copy of this task with some :attr:`adjustable` arguments changed (the curriculum hook).

        A curriculum can start on one-hop queries over a few short chains, where a small model learns to look
        an edge up, and move to longer proofs among more facts.

        Raises:
            ValueError: an argument is not adjustable, or the combination is invalid (as in the constructor).
        """
        unknown = sorted(set(changes) - set(self.adjustable))
        if unknown:
            raise ValueError(f"LogicChains: cannot change {', '.join(map(repr, unknown))} during training; adjustable: {', '.join(self.adjustable)}")
        return LogicChains(num_nodes=self.num_nodes, heldout_buckets=self.heldout_buckets, **{**self._given, **changes})

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
        order = 1 + rng.permutation(self.num_nodes)  # node ids in random order
        chains = order[: self.num_chains * self.chain_len].reshape(self.num_chains, self.chain_len)
        facts = [(int(c[i]), self.rel, int(c[(i + 1) % self.chain_len])) for c in chains for i in range(self.chain_len)]
        successor = {a: b for a, _, b in facts}
        seen = set(facts)
        while len(facts) < self.num_facts:  # distinct branches, never restating a -> edge with the other relation
            source, target = (int(v) for v in 1 + rng.choice(self.num_nodes, size=2, replace=False))
            if successor.get(source) != target and (source, self.nrel, target) not in seen:
                seen.add((source, self.nrel, target))
                facts.append((source, self.nrel, target))
        shuffled = np.asarray(facts, dtype=np.int64)[rng.permutation(len(facts))].reshape(-1)
        # Chain 0, at node 0, is as random as any chain and node: the order above is a random permutation.
        # Further queries start at other nodes (flat index chain * chain_len + position), drawn after the
        # facts so that a one-query example is the same whatever num_queries other instances use.
        starts, lengths = [0], [hops]
        if self.num_queries > 1:
            starts += (1 + rng.choice(self.num_chains * self.chain_len - 1, size=self.num_queries - 1, replace=False)).tolist()
            lengths += rng.integers(self.min_hops, self.max_hops + 1, size=self.num_queries - 1).tolist()
        parts, answers = [shuffled], []
        for flat, length in zip(starts, lengths, strict=True):
            chain, at = divmod(int(flat), self.chain_len)
            parts.append(np.array([self.query, chains[chain, at]] + [self.hop] * length, dtype=np.int64))
            # the node 1..length hops on, one per HOP: the query's targets
            answers.append(chains[chain, (at + np.arange(1, length + 1)) % self.chain_len])
        body = np.concatenate(parts)
        pad = self._seq_len - len(body)
        input_ids = np.concatenate([np.full(pad, self.pad, dtype=np.int64), body])
        targets = np.full(self._seq_len, IGNORE_INDEX, dtype=np.int64)
        end = pad + len(shuffled)
        for part, answer in zip(parts[1:], answers, strict=True):
            end += len(part)
            if self.supervise_every_hop:
                targets[end - len(answer) : end] = answer
            else:
                targets[end - 1] = answer[-1]
        return Example(input_ids, targets, {"hops": hops, "distractors": self.num_distractors})

    def split_tokens(self, example: Example) -> np.ndarray:
        """The facts alone (no padding, no query): a held-out prompt is held out under every question about it."""
        ids = example.input_ids
        facts = ids[: int(np.flatnonzero(ids == self.query)[0])]
        return facts[facts != self.pad]

    def _parse(self, input_ids: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(facts (F, 3), start, hops so far) of the last query of an input that ends inside a query."""
        queries = np.flatnonzero(input_ids == self.query)
        facts = input_ids[: int(queries[0])]
        query_at = int(queries[-1])
        return facts[facts != self.pad].reshape(-1, 3), int(input_ids[query_at + 1]), int((input_ids[query_at:] == self.hop).sum())

    def follow(self, input_ids: np.ndarray) -> int:
        """Solve an example from its input alone (the oracle tests use): follow ``->`` from the last query's start, L hops."""
        facts, node, hops = self._parse(input_ids)
        step = {int(a): int(b) for a, r, b in facts if r == self.rel}
        for _ in range(hops):
            node = step[node]
        return node

    # --- no-skill baselines ---

    def heuristics(self) -> dict[str, Heuristic]:
        """Shortcuts that answer without following L edges from the start (see the module docstring).

        * ``most frequent node``: the node mentioned most often in the facts (the start excluded);
        * ``chain end``: follow ``->`` from the start until a node has no outgoing ``->`` edge or the next one
          was visited (on a closed chain: the start's predecessor);
        * ``a node with no outgoing edge``: the first target of a ``->`` fact that has no outgoing ``->`` edge;
        * ``one hop``: the start's ``->`` target, what the answer would be if L were 1. At L = 1 this *is* the
          rule, so it shows whether accuracy at L >= 2 comes from composing edges;
        * ``last node mentioned``: the target of the last fact before the query;
        * ``length tell``: for each (number of facts, L) seen in 3000 training examples, whichever of the
          guesses above except ``one hop`` was right most often there (what a model that reads the padding
          could learn: with a variable number of facts it picks out "the answer is the chain end").

        No "not asked before" rule is listed for several queries (as MQAR and DistantPremise have): a query names
        only its start, and the starts are distinct nodes drawn uniformly, so an earlier start is the current
        answer as often as any other node; ruling earlier starts out gains nothing (measured:
        docs/results.md, "The earlier numbers on this page were withdrawn").
        """

        def most_frequent(input_ids: np.ndarray, t: int) -> int:
            facts, start, _ = self._parse(input_ids[: t + 1])
            counts = np.bincount(facts[:, [0, 2]].reshape(-1), minlength=self.num_nodes + 1)
            counts[[0, start]] = -1
            return int(counts.argmax())

        def chain_end(input_ids: np.ndarray, t: int) -> int:
            facts, node, _ = self._parse(input_ids[: t + 1])
            step = {int(a): int(b) for a, r, b in facts if r == self.rel}
            seen = {node}
            while node in step and step[node] not in seen:
                node = step[node]
                seen.add(node)
            return node

        def sink(input_ids: np.ndarray, t: int) -> int:
            facts, start, _ = self._parse(input_ids[: t + 1])
            sources = {int(a) for a, r, _ in facts if r == self.rel}
            return next((int(b) for _, r, b in facts if r == self.rel and int(b) not in sources), start)

        def one_hop(input_ids: np.ndarray, t: int) -> int:
            facts, start, _ = self._parse(input_ids[: t + 1])
            return next((int(b) for a, r, b in facts if a == start and r == self.rel), start)

        def last_node(input_ids: np.ndarray, t: int) -> int:
            facts, start, _ = self._parse(input_ids[: t + 1])
            return int(facts[-1, 2]) if len(facts) else start

        guesses: dict[str, Heuristic] = {"most frequent node": most_frequent, "chain end": chain_end, "a node with no outgoing edge": sink, "last node mentioned": last_node}
        if self._length_tell is None:
            wins: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
            for i in range(3000):
                example = self.sample(0, "train", i)
                facts, _, hops = self._parse(example.input_ids)
                t = len(example.input_ids) - 1
                for name, guess in guesses.items():
                    wins[(len(facts), hops)][name] += int(guess(example.input_ids, t) == example.targets[t])
            self._length_tell = {cell: counter.most_common(1)[0][0] for cell, counter in wins.items()}
        choice = self._length_tell

        def length_tell(input_ids: np.ndarray, t: int) -> int:
            facts, _, hops = self._parse(input_ids[: t + 1])
            return guesses[choice.get((len(facts), hops), "most frequent node")](input_ids, t)

        return {**guesses, "one hop": one_hop, "length tell": length_tell}
