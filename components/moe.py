"""Mixture of SwiGLU experts with top-k softmax routing and real sparse dispatch (docs/design.md 3.5).

Shazeer et al. 2017 (arXiv 1701.06538) top-k gating, Switch Transformer (Fedus et al. 2021, arXiv 2101.03961)
load-balance loss and capacity factor, ST-MoE (Zoph et al. 2022, arXiv 2202.08906) router z-loss. Hydra
(arXiv 2508.15099) adds chunk-level routing; its reference code runs every expert on every token and routes a
chunk from the chunk's own tokens (which leaks the future). Here each expert only ever multiplies the rows routed
to it, and chunk routing is causal: chunk c is routed from the tokens of chunk c - 1.

Dispatch: the (token, expert) assignments are sorted by expert, the tokens gathered into one contiguous slice per
expert, each expert's SwiGLU runs on its slice with plain matmuls, and the outputs, weighted by their gate, are
scatter-added back. Experts are a ModuleList of :class:`hydra_kit.ops.SwiGLU`: on CPU this runs as fast as stacked
(E, D, 2H) / (E, H, D) weights (both at the matmul roof; ``docs/benchmarks.md``) and keeps per-expert names and
hooks.

Capacity (optional) is made causal and chunk-invariant: positions are cut into fixed windows of
``capacity_window`` tokens (absolute positions, per example); inside a window an expert accepts its first
``ceil(capacity_factor * capacity_window * top_k / n_experts)`` assignments in position order and drops the rest.
Whether token t is dropped therefore depends only on tokens at or before t, never on the batch or the future
(Switch's batch-wide priority would make the past depend on later tokens).

Document boundaries (``context.segment_ids``, docs/design.md 3.10): token routing is per token. Chunk routing
routes the tokens of a document that started inside their chunk from the learned start summary, and summarises a
chunk that holds a start by its last document's tokens only; a capacity window counts only the assignments of the
token's own document. Both grids stay aligned to the window's position 0: a document gets the routing it gets
alone exactly when it starts on them, and nothing of an earlier document reaches it anywhere.

The file is longer than most (about 450 lines) on purpose: the three routing rules (token, chunk, capacity), their
document-boundary forms and the one-token step make the same decisions, and side by side they cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hydra_kit.ops import Linear, SwiGLU
from hydra_kit.ops.moe_step import MoEStepWeights, moe_step_cpu, pack_moe_step_weights
from hydra_kit.ops.packed import PackedWeights, Reader
from hydra_kit.ops.segments import document_offsets, document_starts
from hydra_kit.protocol import ComponentContext, ComponentOutput, ComponentPath, TriPathComponent, collects_aux

__all__ = ["MixtureOfExperts", "MoEState", "Routing", "dispatch"]


@dataclass
class MoEState:
    """What a stateful MoE (chunk routing or a capacity) carries between calls.

    Attributes:
        position: tokens processed so far (the same for every example).
        summary: (B, D) mean of the last complete routing chunk (zeros before one exists); chunk routing only.
        chunk_sum: (B, D) sum of the tokens seen so far of the current, incomplete routing chunk; chunk routing only.
        counts: (B, E) long assignments each expert received so far in the current capacity window; capacity only.
    """

    position: int
    summary: Tensor | None = None
    chunk_sum: Tensor | None = None
    counts: Tensor | None = None


@dataclass
class Routing:
    """The routing decisions for one input.

    Attributes:
        logits: (B, L, E) router logits (a chunk's tokens share their chunk's logits).
        probs: (B, L, E) softmax of the logits.
        expert_idx: (B, L, k) long chosen experts, most probable first.
        weight: (B, L, k) their probabilities renormalised to sum to 1.
        fits: (B, L, k) bool, the assignment fits in its expert's capacity; None when dropless.
        state: the state after x (None for a stateless MoE).
    """

    logits: Tensor
    probs: Tensor
    expert_idx: Tensor
    weight: Tensor
    fits: Tensor | None
    state: MoEState | None


def dispatch(x: Tensor, experts: nn.ModuleList, expert_idx: Tensor, weight: Tensor, active: Tensor | None) -> Tensor:
    """Run each expert only on the tokens routed to it and combine the outputs with their gate weights.

    Args:
        x: (N, D) tokens.
        experts: E modules mapping (n, D) and a row scale (n, 1) to (n, D) (:class:`hydra_kit.ops.SwiGLU`).
        expert_idx: (N, k) long expert of each assignment.
        weight: (N, k) gate weight of each assignment.
        active: (N, k) bool, assignments to compute (False: dropped by capacity or token skipped); None = all.

    Returns:
        (N, D) sum over each token's computed assignments of weight * expert(x).
    """
    n_tokens, top_k = expert_idx.shape
    flat_e = expert_idx.reshape(-1)  # (N*k,)
    chosen = None if active is None else active.reshape(-1).nonzero().squeeze(1)  # (M,)
    if chosen is not None:
        flat_e = flat_e[chosen]
    # A stable sort keeps position order inside each expert's slice, so results do not depend on sort internals.
    order = flat_e.argsort(stable=True)  # (M,)
    assignment = order if chosen is None else chosen[order]  # (M,) index into the N*k assignments
    token = assignment // top_k  # (M,)
    counts = torch.bincount(flat_e, minlength=len(experts)).tolist()  # one host sync: slice sizes
    gate = weight.reshape(-1)[assignment, None].to(x.dtype)  # (M, 1)
    # Per expert: gather its rows, run it (the gate scales its narrow hidden activation, not the (n, D) output),
    # and add its outputs into their tokens' rows. Expert by expert, every temporary is one expert's size, and
    # there is no concatenation of all outputs, no zeroed (N*k, D) slots and no sum over them: each of those was
    # a pass over memory larger than the caches (docs/benchmarks.md). Tokens whose assignments were all dropped
    # stay zero.
    out = x.new_zeros(n_tokens, x.shape[-1])  # (N, D)
    for expert, rows, part_gate in zip(experts, token.split(counts), gate.split(counts), strict=True):
        if rows.numel():
            out.index_add_(0, rows, expert(x.index_select(0, rows), row_scale=part_gate))
    return out


class MixtureOfExperts(TriPathComponent):
    """Top-k mixture of SwiGLU experts with sparse dispatch, token or causal chunk routing, optional capacity.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        n_experts: number of experts E.
        top_k: experts per token (or per chunk), k <= E; their softmax probabilities are renormalised to sum to 1.
        expert_hidden: hidden width of each expert. None: the dense SwiGLU MLP's hidden width (8/3 d_model rounded
            up to a multiple of 16) divided by top_k, rounded up to 16, so the k active experts cost what one dense
            MLP costs (equal active parameters; E / k times the total).
        routing: "token" routes every token from itself; "chunk" routes all tokens of chunk c (absolute positions
            [c S, (c + 1) S)) to the experts chosen from the RMS-normalised mean of chunk c - 1 (chunk 0 from a
            learned start summary), so routing never sees the chunk's own tokens or anything later.
        chunk_size: S, tokens per routing chunk ("chunk" routing only).
        capacity_factor: None for dropless routing; otherwise each expert accepts at most
            ceil(capacity_factor * capacity_window * top_k / n_experts) assignments per window, first come first
            served by position; a dropped assignment contributes zero (the other expert's weight is not renormalised).
        capacity_window: tokens per capacity window (absolute positions, per example).
        load_balance_weight: weight of the Switch load-balance loss E * sum_e f_e P_e (1 when balanced).
        z_loss_weight: weight of the router z-loss mean(logsumexp(logits)^2).
        recompute: under autograd, keep only the block input and the routing for backward and run the dispatch
            and the experts again there (same gradients; the gathered tokens and expert activations are the
            largest activations of the layer).

    Chunk routing: chunk c - 1's mean, not the whole prefix's, because a prefix mean stops moving after a few
    thousand tokens and would freeze the routing of long sequences. All tokens of a chunk share the summary's
    renormalised top-k probabilities as gate weights. The state carries the position, the last complete chunk's
    mean and the running sum of the current chunk, so pieces and single steps route exactly like one call.

    With ``context.keep``, routing still covers every token (so chunk summaries and capacity counts, hence the
    outputs at kept tokens, do not change) but only the kept tokens' assignments are dispatched to experts.

    Aux losses (weighted): ``load_balance`` (f_e: fraction of the routing assignments to expert e, P_e: mean router
    probability of e, over all tokens of the call; gradient through P), ``z_loss``. Stats: ``load_e{i}`` (f_i, before
    capacity drops; they sum to 1), ``router_entropy`` (mean entropy of the router softmax, nats) and, with a
    capacity, ``dropped_frac`` (fraction of assignments dropped).
    """

    path: ClassVar[ComponentPath] = ComponentPath.CHANNEL
    gated_by_router: ClassVar[bool] = True
    layerscale_init: ClassVar[float] = 0.5
    example_init_args: ClassVar[dict[str, Any]] = {
        "n_experts": 4,
        "top_k": 2,
        "expert_hidden": 16,
        "chunk_size": 8,
        "capacity_window": 16,
    }
    supports_resets: ClassVar[bool] = True  # every routing mode restarts at a document start (module docstring)

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        n_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        routing: Literal["token", "chunk"] = "token",
        chunk_size: int = 64,
        capacity_factor: float | None = None,
        capacity_window: int = 512,
        load_balance_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        recompute: bool = True,
    ) -> None:
        super().__init__(d_model, layer_idx)
        if n_experts <= 0:
            raise ValueError(f"moe: n_experts must be positive, got {n_experts}")
        if not 0 < top_k <= n_experts:
            raise ValueError(f"moe: top_k must lie in [1, n_experts={n_experts}], got {top_k}")
        if expert_hidden is not None and expert_hidden <= 0:
            raise ValueError(f"moe: expert_hidden must be positive or None (dense-MLP matched), got {expert_hidden}")
        if routing not in ("token", "chunk"):
            raise ValueError(f"moe: routing must be 'token' or 'chunk', got {routing!r}")
        if chunk_size <= 0:
            raise ValueError(f"moe: chunk_size must be positive, got {chunk_size}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"moe: capacity_factor must be positive or None (dropless), got {capacity_factor}")
        if capacity_window <= 0:
            raise ValueError(f"moe: capacity_window must be positive, got {capacity_window}")
        if load_balance_weight < 0 or z_loss_weight < 0:
            raise ValueError(
                f"moe: load_balance_weight ({load_balance_weight}) and z_loss_weight ({z_loss_weight}) must be >= 0"
            )
        if expert_hidden is None:
            dense = 16 * math.ceil(int(8 / 3 * d_model) / 16)
            expert_hidden = 16 * math.ceil(dense / top_k / 16)
        self.n_experts, self.top_k, self.expert_hidden = n_experts, top_k, expert_hidden
        self.routing, self.chunk_size = routing, chunk_size
        self.capacity_factor, self.capacity_window = capacity_factor, capacity_window
        self.capacity: int | None = None  # assignments each expert accepts per capacity window
        if capacity_factor is not None:
            self.capacity = math.ceil(capacity_factor * capacity_window * top_k / n_experts)
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.recompute = recompute
        self.router = Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, expert_hidden) for _ in range(n_experts))
        # Chunk 0 has no past to summarise: a learned summary lets it learn its own preferred experts. Random like a
        # token (a zero start would tie every logit and always pick experts 0..k-1).
        self.start_summary = nn.Parameter(torch.randn(d_model)) if routing == "chunk" else None
        self._step_pack: PackedWeights[MoEStepWeights] = PackedWeights()  # what the C step reads, packed once

    @property
    def pointwise(self) -> bool:
        return self.routing == "token" and self.capacity is None

    @property
    def stateful(self) -> bool:
        return not self.pointwise

    def active_parameters(self) -> int:
        return self.router.weight.numel() + self.top_k * sum(p.numel() for p in self.experts[0].parameters())

    def flops_per_token(self, seq_len: int) -> float:
        experts = 2.0 * self.top_k * sum(p.numel() for p in self.experts[0].parameters())
        if self.routing == "chunk":  # the router runs once per chunk; the summary costs one add per channel
            return experts + 2.0 * self.router.weight.numel() / self.chunk_size + self.d_model
        return experts + 2.0 * self.router.weight.numel()

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> MoEState | None:
        if not self.stateful:
            return None
        state = MoEState(position=0)
        if self.routing == "chunk":
            state.summary = torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)
            state.chunk_sum = torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)
        if self.capacity is not None:
            state.counts = torch.zeros(batch_size, self.n_experts, device=device, dtype=torch.long)
        return state

    def _chunk_inputs(self, x: Tensor, state: MoEState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Router inputs of the chunks that x (B, L, D) touches, and the chunk summary state after x.

        Returns:
            route_in: (B, n, D) RMS-normalised summary each touched chunk is routed from.
            chunk_of: (L,) long index of each token's chunk among the n touched.
            summary, chunk_sum: (B, D) the new state's fields.
        """
        assert state.summary is not None and state.chunk_sum is not None and self.start_summary is not None
        batch, seq_len, _ = x.shape
        size, pos = self.chunk_size, state.position
        chunk_of = (pos + torch.arange(seq_len, device=x.device)) // size - pos // size  # (L,)
        n_chunks = int(chunk_of[-1]) + 1
        sums = x.new_zeros(batch, n_chunks, self.d_model).index_add(1, chunk_of, x)  # (B, n, D)
        sums = torch.cat([sums[:, :1] + state.chunk_sum[:, None], sums[:, 1:]], dim=1)  # first chunk: add its past
        means = sums / size  # (B, n, D), final only for complete chunks
        first = self.start_summary.to(x.dtype).expand(batch, -1) if pos < size else state.summary  # (B, D)
        route_in = torch.cat([first[:, None], means[:, :-1]], dim=1)  # chunk c is routed from chunk c - 1
        # The mean of n tokens shrinks as they disagree; normalising keeps router logits on the token scale.
        route_in = F.rms_norm(route_in, (self.d_model,), eps=1e-6)
        if (pos + seq_len) % size == 0:  # x ends on a chunk boundary: its last chunk is complete
            return route_in, chunk_of, means[:, -1], torch.zeros_like(state.chunk_sum)
        summary = means[:, -2] if n_chunks > 1 else state.summary
        return route_in, chunk_of, summary, sums[:, -1]

    def _chunk_logits_by_document(self, x: Tensor, starts: Tensor, chunk_of: Tensor) -> Tensor:
        """Chunk routing's logits (B, L, E) for x (B, L, D) from position 0 with document ``starts`` (B, L).

        A token whose document started inside its chunk is routed from the start summary (its document has no
        earlier chunk); a chunk that holds a start is summarised for the next chunk by its last document's tokens.
        """
        assert self.start_summary is not None
        batch, seq_len, _ = x.shape
        n_chunks = int(chunk_of[-1]) + 1
        grid = F.pad(starts, (0, n_chunks * self.chunk_size - seq_len)).view(batch, n_chunks, self.chunk_size)
        doc = grid.cumsum(-1)  # (B, n, S) document index within the chunk
        in_last = (doc == doc[..., -1:]).flatten(1)[:, :seq_len]  # (B, L)
        fresh = (doc > 0).flatten(1)[:, :seq_len]  # (B, L)
        sums = x.new_zeros(batch, n_chunks, self.d_model).index_add(1, chunk_of, x * in_last[..., None].to(x.dtype))
        counts = x.new_zeros(batch, n_chunks).index_add(1, chunk_of, in_last.to(x.dtype))  # (B, n)
        means = sums / counts.clamp_min(1)[..., None]  # (B, n, D)
        start = self.start_summary.to(x.dtype).expand(batch, 1, -1)
        route_in = F.rms_norm(torch.cat([start, means[:, :-1]], dim=1), (self.d_model,), eps=1e-6)
        per_chunk = self.router(route_in)  # (B, n, E); chunk 0 is routed from the start summary
        return torch.where(fresh[..., None], per_chunk[:, :1], per_chunk[:, chunk_of])

    def _capacity_mask(self, expert_idx: Tensor, state: MoEState, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Which assignments (B, L, k) fit in their expert's capacity, and the window counts (B, E) after x.

        ``starts`` (B, L) bool marks document starts: a token then counts only its own document's assignments.
        """
        assert state.counts is not None and self.capacity is not None
        seq_len = expert_idx.shape[1]
        window, pos = self.capacity_window, state.position
        routed = F.one_hot(expert_idx, self.n_experts).sum(dim=2)  # (B, L, E), 0/1 since the k experts differ
        before = routed.cumsum(dim=1) - routed  # (B, L, E) assignments at earlier positions of x
        absolute = pos + torch.arange(seq_len, device=expert_idx.device)  # (L,)
        window_start = (absolute // window * window - pos).clamp_min(0)  # (L,) first position in x of t's window
        carried = (absolute // window == pos // window)[None, :, None]  # the window's count before x counts too
        if starts is None:
            before = before - before[:, window_start]  # count only inside t's window
        else:  # count only inside t's window and t's document
            doc_first = torch.arange(seq_len, device=expert_idx.device) - document_offsets(starts)  # (B, L)
            first = torch.maximum(window_start, doc_first)
            before = before - before.gather(1, first[..., None].expand_as(before))
            carried = carried & (starts.cumsum(1) == 0)[..., None]  # only for the document continuing the state
        before = before + carried * state.counts[:, None]
        fits = before.gather(2, expert_idx) < self.capacity  # (B, L, k), first come first served by position
        after = before[:, -1] + routed[:, -1]  # (B, E) through the last token
        counts = torch.zeros_like(after) if (pos + seq_len) % window == 0 else after
        return fits, counts

    def assign(self, x: Tensor, state: MoEState | None = None, starts: Tensor | None = None) -> Routing:
        """Route x (B, L, D), continuing from ``state``; runs no expert.

        Routing covers every token of x: chunk summaries and capacity counts must see the whole sequence.
        ``starts`` (B, L) bool marks the document starts of a call from position 0 (module docstring).
        """
        batch, seq_len, _ = x.shape
        if self.stateful and state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        new_state = None
        if self.routing == "chunk":
            assert state is not None
            route_in, chunk_of, summary, chunk_sum = self._chunk_inputs(x, state)
            if starts is None:
                logits = self.router(route_in)[:, chunk_of]  # (B, L, E): every token of a chunk shares its logits
            else:
                logits = self._chunk_logits_by_document(x, starts, chunk_of)
            new_state = MoEState(state.position + seq_len, summary, chunk_sum)
        else:
            logits = self.router(x)  # (B, L, E)
            if state is not None:
                new_state = MoEState(state.position + seq_len)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax and z-loss in at least float32
        probs = logits.softmax(dim=-1)  # (B, L, E)
        top_p, expert_idx = probs.topk(self.top_k, dim=-1)  # (B, L, k)
        weight = top_p / top_p.sum(dim=-1, keepdim=True)  # renormalised over the chosen experts
        fits = None
        if self.capacity is not None:
            assert state is not None and new_state is not None
            fits, new_state.counts = self._capacity_mask(expert_idx, state, starts)
        return Routing(logits, probs, expert_idx, weight, fits, new_state)

    def forward(
        self, x: Tensor, context: ComponentContext | None = None, state: MoEState | None = None
    ) -> ComponentOutput:
        batch, seq_len, _ = x.shape
        segment_ids = None if context is None else context.segment_ids
        starts = None
        if segment_ids is not None:
            if state is not None:
                raise ValueError("moe: segment_ids mark documents from the start of a sequence; they cannot continue a state")
            starts = document_starts(segment_ids)  # (B, L)
        routing = self.assign(x, state, starts)
        logits, probs, expert_idx, weight = routing.logits, routing.probs, routing.expert_idx, routing.weight
        active = routing.fits  # (B, L, k) or None
        stats: dict[str, Tensor] = {}
        if active is not None and collects_aux(context):  # fraction of assignments dropped by the capacity (before keep)
            stats["dropped_frac"] = 1.0 - active.to(x.dtype).mean()
        keep = None if context is None else context.keep  # (B, L) bool
        if keep is not None:
            active = keep[..., None].expand_as(expert_idx) if active is None else active & keep[..., None]

        dispatch_args = (
            x.reshape(batch * seq_len, self.d_model),
            self.experts,
            expert_idx.reshape(-1, self.top_k),
            weight.reshape(-1, self.top_k),
            None if active is None else active.reshape(-1, self.top_k),
        )
        if self.recompute and torch.is_grad_enabled():
            update = checkpoint(dispatch, *dispatch_args, use_reentrant=False)
        else:
            update = dispatch(*dispatch_args)
        update = update.view(batch, seq_len, self.d_model)  # (B, L, D)

        if not collects_aux(context) or batch * seq_len == 0:  # no tokens: no load, no losses (a mean would be NaN)
            return ComponentOutput(update=update, state=routing.state)
        # Switch load balance: f_e (fraction of assignments, no gradient) times P_e (mean probability, gradient).
        # Minimal (= 1) when both are uniform; up to E / k when all tokens go to the same k experts.
        routed = F.one_hot(expert_idx, self.n_experts).sum(dim=2).flatten(0, 1)  # (B*L, E) 0/1
        load = routed.to(probs.dtype).mean(0) / self.top_k  # (E,), sums to 1
        mean_prob = probs.flatten(0, 1).mean(0)  # (E,)
        load_balance = self.n_experts * (load * mean_prob).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        aux = {
            "load_balance": (self.load_balance_weight * load_balance).to(x.dtype),
            "z_loss": (self.z_loss_weight * z_loss).to(x.dtype),
        }
        with torch.no_grad():  # load_e{i}: fraction of assignments routed to expert i, before capacity drops
            stats.update({f"load_e{i}": load[i].to(x.dtype) for i in range(self.n_experts)})
            entropy = -torch.special.xlogy(probs, probs).sum(-1).mean()
            stats["router_entropy"] = entropy.to(x.dtype)
        return ComponentOutput(update=update, aux_losses=aux, stats=stats, state=routing.state)

    def step(self, x_t: Tensor, state: MoEState | None, context: ComponentContext | None = None) -> ComponentOutput:
        """One token x_t (B, D). A single sequence decoding without statistics calls its k experts directly.

        The sorted dispatch of :func:`dispatch` (argsort, counts, gather, scatter) is what makes a batch of tokens
        efficient; for one token it is pure overhead, several times the cost of the k small expert matmuls. Batches,
        stateful routing and calls that want the auxiliary losses go through ``forward``, which returns the same
        update.
        """
        if self.stateful or x_t.shape[0] != 1 or collects_aux(context):
            return super().step(x_t, state, context)
        keep = None if context is None else context.keep
        if keep is not None and not bool(keep[0]):
            return ComponentOutput(update=x_t.new_zeros(x_t.shape))  # skipped token: no expert runs
        # Collecting the 2E expert weights through the module tree costs more than the kernel: they are cached.
        fused = moe_step_cpu(x_t, self._step_pack.get(self, self._pack_step), self.top_k)
        if fused is not None:  # the same as below in one C call (CPU, float32, no autograd)
            return ComponentOutput(update=fused[0])
        logits = self.router(x_t)[0]  # (E,)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        top_p, expert_idx = logits.softmax(dim=-1).topk(self.top_k)  # (k,)
        weight = (top_p / top_p.sum()).to(x_t.dtype)
        update = None
        for j, e in enumerate(expert_idx.tolist()):  # in order of probability, as dispatch sums its k slots
            out = self.experts[e](x_t, row_scale=weight[j : j + 1, None])  # (1, D)
            update = out if update is None else update + out
        assert update is not None
        return ComponentOutput(update=update)

    def _pack_step(self, read: Reader) -> MoEStepWeights:
        """What the C step reads: the router and expert weights, checked and packed with their addresses (see ``step``;
        cached by ``self._step_pack``, which watches what ``read`` reads)."""
        gate_up = [read(f"experts.{e}.gate_up.weight") for e in range(len(self.experts))]
        down = [read(f"experts.{e}.down.weight") for e in range(len(self.experts))]
        return pack_moe_step_weights(read("router.weight"), gate_up, down)

    def expert_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        """The experts' gate_up (2F, D) and down (D, F) weights, as two lists of Parameters."""
        experts = [cast("SwiGLU", e) for e in self.experts]
        return [e.gate_up.weight for e in experts], [e.down.weight for e in experts]

    def extra_repr(self) -> str:
        capacity = "dropless" if self.capacity is None else f"capacity={self.capacity}/{self.capacity_window} tokens"
        chunk = f", chunk_size={self.chunk_size}" if self.routing == "chunk" else ""
        return (
            f"d_model={self.d_model}, layer_idx={self.layer_idx}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"expert_hidden={self.expert_hidden}, routing={self.routing}{chunk}, {capacity}"
        )
