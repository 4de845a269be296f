"""Sparse global attention (SGA): a sliding local window plus router-chosen global tokens (docs/design.md 3.4).

Hydra (arXiv 2508.15099), with RoPE (Su et al. 2021, arXiv 2104.09864). Query t attends to

* its local window, the previous ``window`` tokens and itself, and
* at most ``max_global`` global tokens of its past. The sequence is cut into chunks of ``window`` tokens
  (aligned to absolute position 0). The queries of chunk c read the ``max_global`` tokens of chunks before c
  with the highest router score s (``context.global_score``); a tie goes to the earlier token. A token becomes
  eligible only once its chunk is complete, so a future score can never change what an earlier query reads.
  A global that is also inside the query's local window is masked on the global side so no key counts twice.

Selection ranks the whole past, not a quota per chunk (the design's first form took the top few of each chunk
and kept the most recent ``max_global``). A quota caps how many important tokens a stretch of text can keep
and evicts them by age however important they are; ranking keeps any ``max_global`` of them at any distance,
which is what the paper asks of a "small controller-selected set of global tokens" (#G <= max_global). Each
query still reads at most window + 1 + max_global keys, so the cost is unchanged
(``docs/calibration/2026-12-07-mechanisms``, ``docs/design-decisions.md``).

Every scored token's value, local or global, is scaled by its salience ``2 * sigmoid(s)`` (1 at
initialisation, where s is near 0). This is how the selection learns: a token whose value helps the queries
that read it, in any local window, gets a higher score and so ranks among the globals. Scaling only the
chosen globals (the design's first form) gave the score a gradient from the few tokens already chosen, and a
token pushed out of the selection never came back.

Without a score (no router in the block) the layer is plain sliding-window attention: no token becomes
global and no query reads globals. There is deliberately no learned fallback score.

Document boundaries (``context.segment_ids``): a query reads local and global keys of its own document only, and
the globals of chunk c are ranked among the tokens of the document current at the end of chunk c - 1 only (an
earlier document's token could serve no later query, and ranking it would take a slot from the new one). The chunk
grid stays aligned to the window's position 0, so a document's globals are those it would get alone exactly when it
starts on a chunk boundary; nothing of an earlier document reaches it anywhere.

Cost is O(L * (window + max_global)) in time and memory: queries are processed in blocks of ``window``
(one block per chunk), each against the 2 * window keys of its own and the previous chunk plus the globals
chosen for it, in one fused, masked ``scaled_dot_product_attention`` batched over blocks. Ranking sorts each
block's candidates: O(L^2 / window) comparisons, small beside the attention. No L x L tensor exists anywhere.

The file is longer than most (about 680 lines) on purpose: the batched forward, the one-token decoding step and
the inspection map each apply the same selection and visibility rules, and keeping them side by side is what
keeps them from drifting apart (the conformance check compares forward and step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from hydra_kit.ops import Linear, RotaryEmbedding, apply_rotary
from hydra_kit.ops.decode_attention import decode_attention
from hydra_kit.ops.rotary import qkv_rotary
from hydra_kit.ops.segments import document_offsets, document_starts
from hydra_kit.protocol import (
    AttentionMap,
    ComponentContext,
    ComponentOutput,
    ComponentPath,
    TriPathComponent,
    collects_aux,
    wants_diagnostics,
)

__all__ = ["SGAState", "SparseGlobalAttention", "global_schedule", "rank_in", "select_per_block"]

NEG_INF = float("-inf")


@dataclass
class SGAState:
    """Everything later tokens need from the past.

    The keys/values of the current, incomplete chunk are the last ``offset % window`` entries of ``keys`` /
    ``values`` (a partial chunk is shorter than the window), so only their scores are stored apart.

    Attributes:
        keys: (B, n, H, hd) rotated keys of the last n = min(offset, window) tokens.
        values: (B, n, H, hd) their values (scaled by the salience when scored).
        partial_scores: (B, offset % window) router scores of the tokens of the incomplete chunk.
        global_keys: (B, G, H, hd) rotated keys of the globals the next chunk reads (G <= max_global), in
            position order (what keeps ties going to the earlier token when the next chunk is ranked in).
        global_values: (B, G, H, hd) their values (scaled by the salience, as every scored value is).
        global_scores: (B, G) their scores; -inf marks an empty slot (a row of the batch with fewer candidates).
        global_pos: (B, G) long absolute positions.
        offset: number of tokens processed so far.
        key_buffer, value_buffer: (B, capacity, H, hd) or None. At inference :meth:`SparseGlobalAttention.step`
            keeps the window in these buffers, with ``keys`` and ``values`` views of them from index ``start``,
            and writes each new token's key and value in place after the view (a copy of the window once per
            ``window`` tokens instead of once per token). Like a key/value cache, such a state is append-only:
            continue from the state a step returned, never twice from the same one.
        start: index of ``keys[:, 0]`` in the buffers.
        global_reveal: (B, G) long or None: for each global, the first position whose query sees it (past the
            window; the largest long for an empty slot). Derived from ``global_scores`` and ``global_pos`` by
            ``step``, kept until the globals change.
    """

    keys: Tensor
    values: Tensor
    partial_scores: Tensor
    global_keys: Tensor
    global_values: Tensor
    global_scores: Tensor
    global_pos: Tensor
    offset: int
    key_buffer: Tensor | None = None
    value_buffer: Tensor | None = None
    start: int = 0
    global_reveal: Tensor | None = None


def rank_in(scores: Tensor, index: Tensor, valid: Tensor, new: Tensor, new_valid: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The globals once a chunk is complete: the ``size`` highest-scoring of the current globals and its tokens.

    A tie goes to the earlier token: the candidates are ranked by a stable sort in position order, the same
    way in the batched forward and in one-token decoding.

    Args:
        scores: (B, N) scores of every candidate, candidates in position order.
        index: (B, S) the current globals, indices into the candidates in position order, empty slots last.
        valid: (B, S) bool, False on an empty slot (or a global that may no longer be read: another document).
        new: (W,) indices of the chunk's tokens, each after every current global.
        new_valid: (B, W) bool: which of them may become global (scored, of the current document).
        size: most globals kept.

    Returns:
        index, valid: (B, min(size, S + W)), in position order with the empty slots last.
    """
    candidates = torch.cat([index, new.expand(index.shape[0], -1)], 1)  # (B, S + W), position order
    ranked = scores.gather(1, candidates).masked_fill(~torch.cat([valid, new_valid], 1), NEG_INF)
    values, order = ranked.sort(dim=-1, descending=True, stable=True)
    best, kept = candidates.gather(1, order[:, :size]), values[:, :size] > NEG_INF
    # Back to position order, empty slots last: what the next chunk's stable ranking relies on.
    order = best.masked_fill(~kept, scores.shape[1]).sort(dim=-1).indices
    return best.gather(1, order), kept.gather(1, order)


def select_per_block(
    scores: Tensor, n_old: int, n_rows: int, window: int, size: int, doc: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The globals each block reads: row j is the ``size`` best of the carried globals and the blocks before j.

    Row 0 is the carried globals; row j + 1 ranks block j's tokens in (:func:`rank_in`), one block at a time, so
    memory stays O(rows * size), linear in the length.

    Args:
        scores: (B, n_old + n_blocks * window) scores of the carried globals (-inf on an empty slot), then of
            the blocks' tokens (-inf where a token cannot be global), all in position order.
        n_rows: rows wanted, 1 <= n_rows <= n_blocks + 1.
        size: most globals per row.
        doc: (B, n_blocks * window) long document index of each token, or None for one document. Row j ranks
            only the tokens of the document current at the end of block j - 1 (the carried globals count as
            document 0).

    Returns:
        index: (B, n_rows, size) indices into the candidates, in position order, empty slots last.
        valid: (B, n_rows, size) bool, False on an empty slot.
    """
    batch, device = scores.shape[0], scores.device
    index = torch.arange(n_old, device=device).expand(batch, -1)
    valid = scores[:, :n_old] > NEG_INF
    rows = [(index, valid)]
    candidate_doc = None if doc is None else F.pad(doc, (n_old, 0))  # (B, N): the carried globals are document 0
    for j in range(n_rows - 1):
        new = n_old + j * window + torch.arange(window, device=device)
        new_valid = scores[:, new] > NEG_INF
        if doc is not None and candidate_doc is not None:
            current = doc[:, (j + 1) * window - 1, None]  # (B, 1)
            valid = valid & (candidate_doc.gather(1, index) == current)
            new_valid = new_valid & (doc[:, j * window : (j + 1) * window] == current)
        index, valid = rank_in(scores, index, valid, new, new_valid, size)
        rows.append((index, valid))
    pad = [size - i.shape[1] for i, _ in rows]
    return (
        torch.stack([F.pad(i, (0, n)) for (i, _), n in zip(rows, pad, strict=True)], 1),
        torch.stack([F.pad(v, (0, n), value=False) for (_, v), n in zip(rows, pad, strict=True)], 1),
    )


def take_rows(t: Tensor, index: Tensor) -> Tensor:
    """The rows ``index`` (B, M) of t (B, N, ...) per sequence: (B, M, ...).

    One ``index_select`` over the batch flattened: a ``gather`` with the index expanded over the trailing
    dimensions reads an index per element, which costs more than the rows it copies.
    """
    batch, n = t.shape[:2]
    flat = (index + torch.arange(batch, device=index.device)[:, None] * n).reshape(-1)  # (B * M,)
    return t.reshape(batch * n, *t.shape[2:]).index_select(0, flat).view(batch, index.shape[1], *t.shape[2:])


def salience(score: Tensor) -> Tensor:
    """The factor ``2 * sigmoid(s)`` on a scored token's value: 1 at s = 0, in (0, 2); shape of ``score``."""
    return 2.0 * torch.sigmoid(score)


def global_schedule(score: Tensor, window: int, max_global: int, doc: Tensor | None = None) -> Tensor:
    """Positions of the global tokens visible to the queries of each chunk (-1: empty slot), in position order.

    The same selection as the forward pass, on positions only (for tests and inspection).

    Args:
        score: (B, L) router scores from position 0.
        window, max_global: as in :class:`SparseGlobalAttention` (max_global > 0).
        doc: (B, L) long document index of each token, or None for one document.

    Returns:
        (B, C, min(max_global, (C - 1) * window)) long, C = ceil(L / window) chunks.
    """
    n_chunks = -(-score.shape[1] // window)
    size = min(max_global, (n_chunks - 1) * window)
    pad = n_chunks * window - score.shape[1]
    doc = None if doc is None else F.pad(doc, (0, pad))
    index, valid = select_per_block(F.pad(score, (0, pad), value=NEG_INF), 0, n_chunks, window, size, doc)
    return index.masked_fill(~valid, -1)


class SparseGlobalAttention(TriPathComponent):
    """Causal multi-head attention over a local window plus router-chosen global tokens; linear in L.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        n_heads: number of heads; must divide d_model into an even head width (RoPE).
        window: local window (each query sees the previous ``window`` tokens and itself); also the chunk
            length for global selection.
        max_global: globals a query can see: the highest-scoring tokens of the earlier chunks, at any
            distance (0 turns globals off). The paper's #G <= 512.
        rope_base: rotary frequency base.
        recompute: under autograd, rebuild each block's local + global key copies and masks in backward
            instead of saving them (same gradients, a fraction of the activation memory).

    ``context.keep`` (inference): skipped tokens issue no query (the kept queries of each block are gathered,
    so attention and the query/output projections run on them only) but still provide keys and values.
    The state (:class:`SGAState`) holds the last window, the globals and the open chunk's scores; ``step``
    is one query against at most window + 1 + max_global keys, and ranks the chunk in when it is complete.
    """

    path: ClassVar[ComponentPath] = ComponentPath.SEQUENCE
    gated_by_router: ClassVar[bool] = True
    # 1.0 as for dense attention, not the paper's 0.2: a damped attention path learns its lookups that much
    # slower under Adam (hydra-kit's decision, docs/design-decisions.md).
    layerscale_init: ClassVar[float] = 1.0
    # 40 tokens = 5 chunks of 8: from the second chunk on, more candidates than max_global=4.
    example_init_args: ClassVar[dict[str, Any]] = {"n_heads": 2, "window": 8, "max_global": 4}
    supports_resets: ClassVar[bool] = True  # masked by document, local and global (module docstring)
    # Queries attended in one pass (rounded to whole blocks): bounds transient memory, never changes results.
    queries_per_pass: int = 4096

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        n_heads: int = 8,
        window: int = 256,
        max_global: int = 512,
        rope_base: float = 10000.0,
        recompute: bool = True,
    ) -> None:
        super().__init__(d_model, layer_idx)
        if n_heads <= 0 or d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"sga: n_heads={n_heads} must divide d_model={d_model} into an even head width")
        if window <= 0:
            raise ValueError(f"sga: window must be positive, got {window}")
        if max_global < 0:
            raise ValueError(f"sga: max_global must be >= 0, got {max_global}")
        if rope_base <= 0:
            raise ValueError(f"sga: rope_base must be positive, got {rope_base}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.window = window
        self.max_global = max_global
        self.recompute = recompute
        # Separate query projection: skipped tokens (context.keep) need keys and values but no query.
        self.q = Linear(d_model, d_model, bias=False)
        self.kv = Linear(d_model, 2 * d_model, bias=False)
        self.out = Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)

    @property
    def uses_globals(self) -> bool:
        return self.max_global > 0

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_heads={self.n_heads}, window={self.window}, max_global={self.max_global}"
        )

    def flops_per_token(self, seq_len: int) -> float:
        # Projections, plus QK^T and AV over the keys a query really sees: min(t, W) + 1 local ones and the
        # globals chosen from earlier chunks (the few masked as duplicates of local keys are not subtracted).
        w, m = self.window, self.max_global
        local = sum(min(t, w) + 1 for t in range(min(seq_len, w))) + max(0, seq_len - w) * (w + 1)
        glob = sum(min(w, seq_len - c * w) * min(m, w * c) for c in range(-(-seq_len // w)))
        return 2.0 * self.active_parameters() + 2 * 2 * self.d_model * (local + glob) / max(seq_len, 1)

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> SGAState:
        kv = torch.zeros(batch_size, 0, self.n_heads, self.head_dim, device=device, dtype=dtype)
        scores = torch.zeros(batch_size, 0, device=device, dtype=dtype)
        pos = torch.zeros(batch_size, 0, device=device, dtype=torch.long)
        return SGAState(kv, kv.clone(), scores, kv.clone(), kv.clone(), scores.clone(), pos, 0)

    def _rotate(self, t: Tensor, positions: Tensor) -> Tensor:
        """Apply RoPE to t (*positions.shape, H, hd) at integer ``positions``."""
        cos, sin = self.rotary(positions)
        return apply_rotary(t, cos[..., None, :], sin[..., None, :])

    def _kept_globals(
        self, candidates: tuple[Tensor, Tensor, Tensor, Tensor], index: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The global set a state carries, from one row of :func:`select_per_block` or :func:`rank_in`.

        Args:
            candidates: keys, values (B, N, H, hd), scores, positions (B, N) of the candidates.
            index, valid: (B, S) the row, in position order with the empty slots last.

        Returns:
            keys, values (B, G, H, hd), scores, positions (B, G), in position order: G = the most globals any row
            of the batch holds; a slot left empty in a row has score -inf.
        """
        n_keep = int(valid.sum(-1).max()) if valid.numel() else 0
        index, valid = index[:, :n_keep], valid[:, :n_keep]
        keys, values, scores, pos = candidates
        # An empty slot may point at a token that was not eligible: its score must read -inf, not its own.
        return take_rows(keys, index), take_rows(values, index), scores.gather(1, index).masked_fill(~valid, NEG_INF), pos.gather(1, index)

    def _attend(
        self,
        q: Tensor,
        k_grid: Tensor,
        v_grid: Tensor,
        q_pos: Tensor,
        q_doc: Tensor | None,
        chosen: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None,
        c0: int,
        first: int,
        stop: int,
    ) -> Tensor:
        """Attention of the queries of blocks first..stop-1 (block j = chunk c0 + j) to their local and global keys.

        Args:
            q: (B, nb, H, Q, hd) rotated queries of every block.
            k_grid, v_grid: (B, (nb + 1) * W, H, hd) keys/values of absolute positions from (c0 - 1) * W.
            q_pos: (B or 1, nb, Q) absolute query positions.
            q_doc: (B, nb, Q) absolute position where each query's document starts (it reads no key before), or
                None for one document.
            chosen: the globals of every block: candidate keys and values (B, N, H, hd) and positions (B, N),
                and per block the indices of its globals into them (B, nb, M) with a mask of filled slots
                (B, nb, M); None when no global is visible. Gathered here, a few blocks at a time, so the
                per-block copies exist only for the blocks of one pass (and are rebuilt in backward).

        Returns:
            (B, stop - first, H, Q, hd).
        """
        batch, _, h, n_q, hd = q.shape
        w, n = self.window, stop - first
        # Local keys of block j: chunks c0 + j - 1 and c0 + j, as two strided views of the grid.
        prev, cur = slice(first * w, stop * w), slice((first + 1) * w, (stop + 1) * w)
        keys = [k_grid[:, s].view(batch, n, w, h, hd).transpose(2, 3) for s in (prev, cur)]  # (B, n, H, w, hd)
        vals = [v_grid[:, s].view(batch, n, w, h, hd).transpose(2, 3) for s in (prev, cur)]
        block = c0 - 1 + torch.arange(first, stop, device=q.device)
        key_pos = block[:, None, None] * w + torch.arange(2 * w, device=q.device)  # (n, 1, 2w)
        qp = q_pos[:, first:stop, :, None]  # (B|1, n, Q, 1)
        local = (qp >= key_pos) & (qp <= key_pos + w) & (key_pos >= 0)
        qd = None if q_doc is None else q_doc[:, first:stop, :, None]  # (B, n, Q, 1)
        if qd is not None:
            local = local & (key_pos >= qd)
        masks = [local.expand(batch, -1, -1, -1)]
        if chosen is not None:
            cand_keys, cand_values, cand_pos, index, ok = chosen
            n_g = index.shape[-1]
            flat = index[:, first:stop].reshape(batch, n * n_g)
            keys.append(take_rows(cand_keys, flat).view(batch, n, n_g, h, hd).transpose(2, 3))  # (B, n, H, M, hd)
            vals.append(take_rows(cand_values, flat).view(batch, n, n_g, h, hd).transpose(2, 3))
            g_pos, g_ok = cand_pos.gather(1, flat).view(batch, n, n_g), ok[:, first:stop]
            # A global inside the query's local window is already there as a local key: count it once.
            seen = g_ok[:, :, None, :] & (qp > g_pos[:, :, None, :] + w)  # (B, n, Q, M)
            masks.append(seen if qd is None else seen & (g_pos[:, :, None, :] >= qd))
        n_keys = sum(t.shape[3] for t in keys)
        y = F.scaled_dot_product_attention(
            q[:, first:stop].reshape(batch * n, h, n_q, hd),
            torch.cat(keys, 3).reshape(batch * n, h, n_keys, hd),
            torch.cat(vals, 3).reshape(batch * n, h, n_keys, hd),
            attn_mask=torch.cat(masks, -1).reshape(batch * n, 1, n_q, n_keys),
        )
        return y.view(batch, n, h, n_q, hd)

    def forward(
        self, x: Tensor, context: ComponentContext | None = None, state: SGAState | None = None
    ) -> ComponentOutput:
        batch, seq_len, _ = x.shape
        segment_ids = None if context is None else context.segment_ids
        if segment_ids is not None and state is not None:
            raise ValueError("sga: segment_ids mark documents from the start of a sequence; they cannot continue a state")
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        if seq_len == 0:
            return ComponentOutput(update=x.new_zeros(x.shape), state=state)
        h, hd, w = self.n_heads, self.head_dim, self.window
        score = None if context is None or context.global_score is None else context.global_score.to(x.dtype)
        keep = None if context is None else context.keep
        read_globals = score is not None and self.uses_globals
        if score is None:
            score = x.new_full((batch, seq_len), NEG_INF)  # unscored tokens never become global
        start = state.offset
        r, c0, n_prev = start % w, start // w, state.keys.shape[1]
        n_blocks = -(-(r + seq_len) // w)  # chunks this call touches; block j holds the queries of chunk c0 + j
        n_done = (r + seq_len) // w  # chunks completed by this call
        dev = x.device

        key, value = self.kv(x).view(batch, seq_len, 2, h, hd).unbind(2)  # (B, L, H, hd) each
        key = self._rotate(key, torch.arange(start, start + seq_len, device=dev))
        if read_globals:
            value = value * salience(score)[..., None, None]
        # Key grid over absolute positions (c0 - 1) * w ... (c0 + n_blocks) * w - 1. Slots with no key (before
        # the carried window, after the input) are zeros that no query's mask ever admits.
        front, back = w + r - n_prev, n_blocks * w - r - seq_len

        def grid(past: Tensor, new: Tensor) -> Tensor:  # (B, (n_blocks + 1) * w, H, hd)
            return torch.cat([new.new_zeros(batch, front, h, hd), past, new, new.new_zeros(batch, back, h, hd)], 1)

        k_grid, v_grid = grid(state.keys, key), grid(state.values, value)
        del key, value  # at inference, frees the projection output before the attention peak
        scores = torch.cat([state.partial_scores, score], dim=1)  # (B, r + L) from the start of chunk c0
        chunk_scores = F.pad(scores, (0, back), value=NEG_INF).view(batch, n_blocks, w)
        doc_start = doc = None  # (B, L) where each token's document starts, (B, nb * W) its index; None: one document
        if segment_ids is not None:  # a call from position 0 (r = 0): the chunk grid starts with x
            starts = document_starts(segment_ids)  # (B, L)
            doc_start = torch.arange(seq_len, device=dev) - document_offsets(starts)
            doc = F.pad(starts.long().cumsum(-1), (0, back))

        # Candidates for global: the carried globals, then every token of this call's chunks (and the carried
        # start of the first one); the globals of block j are the best of those before it (row j). Row n_done is
        # what the state carries.
        n_old = state.global_keys.shape[1]
        stats: dict[str, Tensor] = {}
        chosen = kept = None
        if read_globals:  # unscored tokens are never candidates: without a score the carried globals stand
            positions = (c0 * w + torch.arange(n_blocks * w, device=dev)).expand(batch, -1)
            candidates = (
                torch.cat([state.global_keys, k_grid[:, w:]], 1),  # (B, N, H, hd)
                torch.cat([state.global_values, v_grid[:, w:]], 1),
                torch.cat([state.global_scores, chunk_scores.flatten(1)], 1),  # (B, N)
                torch.cat([state.global_pos, positions], 1),
            )
            size = min(self.max_global, candidates[2].shape[1])
            index, valid = select_per_block(candidates[2], n_old, n_done + 1, w, size, doc)  # (B, n_done + 1, S)
            n_vis = int(valid[:, :n_blocks].sum(-1).max())  # empty slots are last: beyond n_vis, empty everywhere
            if n_vis > 0:
                chosen = (candidates[0], candidates[1], candidates[3], index[:, :n_blocks, :n_vis], valid[:, :n_blocks, :n_vis])
            kept = self._kept_globals(candidates, index[:, n_done], valid[:, n_done])
            if collects_aux(context) and (kept[2] > NEG_INF).any():
                stats["global_salience"] = salience(kept[2][kept[2] > NEG_INF]).mean().detach()
            if wants_diagnostics(context) and start == 0 and seq_len > w:
                stats["global_attn_share"] = self._global_attention_share(x, context)

        # Queries: whole blocks when every grid slot is a real, kept token; otherwise gather per block only the
        # kept real queries (skipped tokens issue no query: real saving, not a zero multiply).
        whole = keep is None and r == 0 and seq_len == n_blocks * w
        if whole:
            n_q = w
            x_q = x.reshape(batch, n_blocks, w, -1)
            q_pos = torch.arange(start, start + seq_len, device=dev).view(1, n_blocks, w)
            q_doc = None if doc_start is None else doc_start.view(batch, n_blocks, w)
        else:
            wanted = torch.zeros(batch, n_blocks * w, dtype=torch.bool, device=dev)
            wanted[:, r : r + seq_len] = True if keep is None else keep
            wanted = wanted.view(batch, n_blocks, w)
            n_q = int(wanted.sum(-1).max())
            # Stable sort puts each block's wanted slots first, in position order.
            q_idx = torch.argsort((~wanted).to(torch.int8), dim=-1, stable=True)[..., :n_q]  # (B, nb, Q)
            q_valid = wanted.gather(-1, q_idx)
            slot = torch.arange(n_blocks, device=dev)[:, None] * w + q_idx  # grid slot (B, nb, Q)
            x_idx = (slot - r).clamp(0, seq_len - 1).flatten(1)  # filler queries read any token
            x_q = x.gather(1, x_idx[..., None].expand(-1, -1, x.shape[-1])).view(batch, n_blocks, n_q, x.shape[-1])
            q_pos = c0 * w + slot
            q_doc = None if doc_start is None else doc_start.gather(1, x_idx).view(batch, n_blocks, n_q)
        if n_q > 0:
            q = self._rotate(self.q(x_q).view(*x_q.shape[:3], h, hd), q_pos).transpose(2, 3)  # (B, nb, H, Q, hd)
            # At inference a few blocks per pass bound the transient key copies and masks (peak memory). Not
            # under autograd: every pass's inputs are saved anyway, and the backward of each pass's slices
            # would allocate full-size gradients. Results do not depend on the grouping.
            group = n_blocks if torch.is_grad_enabled() else max(1, self.queries_per_pass // w)
            if self.recompute and torch.is_grad_enabled():
                # Save the queries and the key grid, not the per-block key copies and masks: they are rebuilt
                # (cheap gathers) when backward needs them.
                y = checkpoint(self._attend, q, k_grid, v_grid, q_pos, q_doc, chosen, c0, 0, n_blocks, use_reentrant=False)
            elif group >= n_blocks:
                y = self._attend(q, k_grid, v_grid, q_pos, q_doc, chosen, c0, 0, n_blocks)  # (B, nb, H, Q, hd)
            else:
                y = q.new_empty(q.shape)
                for first in range(0, n_blocks, group):
                    stop = min(first + group, n_blocks)
                    y[:, first:stop] = self._attend(q, k_grid, v_grid, q_pos, q_doc, chosen, c0, first, stop)
            y = self.out(y.transpose(2, 3).reshape(batch, n_blocks, n_q, -1))  # (B, nb, Q, D)
        if whole:
            update = y.reshape(batch, seq_len, -1)
        elif n_q == 0:
            update = x.new_zeros(x.shape)
        else:
            y = y * q_valid[..., None].to(y.dtype)
            out = y.new_zeros(batch, n_blocks, w, y.shape[-1]).scatter(2, q_idx[..., None].expand_as(y), y)
            update = out.view(batch, n_blocks * w, -1)[:, r : r + seq_len]

        n_local = min(n_prev + seq_len, w)
        end = front + n_prev + seq_len  # one past the last real slot of the grid
        tail = (r + seq_len) % w
        new_state = SGAState(
            keys=k_grid[:, end - n_local : end].clone(),  # clone: do not pin the whole grid in memory
            values=v_grid[:, end - n_local : end].clone(),
            partial_scores=scores[:, scores.shape[1] - tail :].clone(),
            global_keys=state.global_keys,
            global_values=state.global_values,
            global_scores=state.global_scores,
            global_pos=state.global_pos,
            offset=start + seq_len,
        )
        if kept is not None:
            new_state.global_keys, new_state.global_values, new_state.global_scores, new_state.global_pos = kept
        return ComponentOutput(update=update, stats=stats, state=new_state)

    def _window_with(
        self, state: SGAState, x_t: Tensor, value_scale: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, int]:
        """The query (B, H, hd) of token x_t (B, D), and the window with its key and value: (B, n + 1, H, hd) each.

        ``value_scale`` (B,) is the token's salience when it is scored (its value is stored scaled, as in forward).

        Also returns the buffers the window lives in and its start in them. Under autograd, a concatenation
        (in-place writes would corrupt saved activations). At inference, the new key and value go in place after
        the window's view of its buffer, which is reallocated with room for ``window`` more tokens when full or
        missing (the state came from ``forward`` or ``init_state``); the C kernel writes them there directly.
        """
        n, pos = state.keys.shape[1], state.offset
        if torch.is_grad_enabled():
            q, key, value = self._qkv_step(x_t, pos)
            if value_scale is not None:
                value = value * value_scale[:, None, None]
            return q, torch.cat([state.keys, key[:, None]], 1), torch.cat([state.values, value[:, None]], 1), None, None, 0
        key_buffer, value_buffer, start = state.key_buffer, state.value_buffer, state.start
        if key_buffer is None or value_buffer is None or start + n >= key_buffer.shape[1]:
            batch, _, h, hd = state.keys.shape
            key_buffer = x_t.new_empty(batch, n + self.window + 1, h, hd)
            value_buffer = torch.empty_like(key_buffer)
            key_buffer[:, :n], value_buffer[:, :n], start = state.keys, state.values, 0
        slot = start + n
        # One C call (CPU, float32): the projections, the rotations, and the key and value written into their slot.
        fused = qkv_rotary(x_t, self.q.weight, self.kv.weight, self.rotary.inv_freq, self.n_heads, pos, key_buffer[:, slot], value_buffer[:, slot])
        if fused is not None:
            q = fused[:, 0]
        else:
            q, key_buffer[:, slot], value_buffer[:, slot] = self._qkv_step(x_t, pos)
        if value_scale is not None:
            value_buffer[:, slot] *= value_scale[:, None, None]
        return q, key_buffer[:, start : slot + 1], value_buffer[:, start : slot + 1], key_buffer, value_buffer, start

    def _qkv_step(self, x_t: Tensor, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """Query and key rotated to position ``pos``, and value, (B, H, hd) each, of one token x_t (B, D)."""
        key, value = self.kv(x_t).view(x_t.shape[0], 2, self.n_heads, self.head_dim).unbind(1)  # (B, H, hd)
        cos, sin = self.rotary(torch.tensor([pos], device=x_t.device))  # (1, hd / 2), shared by key and query
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, hd / 2): broadcast over batch and heads
        q = self.q(x_t).view(x_t.shape[0], self.n_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(key, cos, sin), value

    def step(self, x_t: Tensor, state: SGAState, context: ComponentContext | None = None) -> ComponentOutput:
        """One token x_t (B, D): one query against the window and the visible globals; O(window + max_global)."""
        batch = x_t.shape[0]
        hd, w = self.head_dim, self.window
        score = None if context is None else context.global_score
        if score is not None and score.dtype != x_t.dtype:
            score = score.to(x_t.dtype)
        keep = None if context is None else context.keep
        pos = state.offset
        value_scale = salience(score) if score is not None and self.uses_globals else None
        q, keys, values, key_buffer, value_buffer, start = self._window_with(state, x_t, value_scale)  # (B, H, hd), (B, n + 1, H, hd)
        reveal = state.global_reveal
        if keep is not None and not bool(keep.any()):
            update = x_t.new_zeros(x_t.shape)  # nobody in the batch issues a query
        else:
            visible = None
            if score is not None and self.uses_globals and state.global_keys.shape[1] > 0:
                if reveal is None:  # a global is visible past the window; an empty slot never
                    reveal = torch.where(state.global_scores > NEG_INF, state.global_pos + (w + 1), torch.iinfo(torch.long).max)
                visible = reveal <= pos  # (B, G)
            sets: list[tuple[Tensor, Tensor, Tensor | None]] = [(keys.transpose(1, 2), values.transpose(1, 2), None)]  # (B, H, n + 1, hd): all local keys visible
            if visible is not None:
                sets.append((state.global_keys.transpose(1, 2), state.global_values.transpose(1, 2), visible))
            y = decode_attention(q, sets, hd**-0.5)  # (B, H, hd): the C kernel, or the same in PyTorch
            update = self.out(y.reshape(batch, -1))
            if keep is not None:
                update = update * keep[:, None].to(update.dtype)

        s_t = x_t.new_full((batch,), NEG_INF) if score is None else score
        dropped = max(0, keys.shape[1] - w)  # the window slides once it is full
        new_state = SGAState(
            keys=keys[:, dropped:],
            values=values[:, dropped:],
            partial_scores=torch.cat([state.partial_scores, s_t[:, None]], 1),
            global_keys=state.global_keys,
            global_values=state.global_values,
            global_scores=state.global_scores,
            global_pos=state.global_pos,
            offset=pos + 1,
            key_buffer=key_buffer,
            value_buffer=value_buffer,
            start=start + dropped,
            global_reveal=reveal,
        )
        if new_state.partial_scores.shape[1] == w:  # the chunk is complete: rank its tokens in
            if self.uses_globals:
                # The window now holds exactly this chunk's keys and values; they follow the globals in position order.
                chunk_pos = torch.arange(pos + 1 - w, pos + 1, device=x_t.device).expand(batch, -1)
                candidates = (
                    torch.cat([state.global_keys, new_state.keys], 1),
                    torch.cat([state.global_values, new_state.values], 1),
                    torch.cat([state.global_scores, new_state.partial_scores], 1),
                    torch.cat([state.global_pos, chunk_pos], 1),
                )
                n_old = state.global_scores.shape[1]
                index, valid = rank_in(
                    candidates[2],
                    torch.arange(n_old, device=x_t.device).expand(batch, -1),
                    state.global_scores > NEG_INF,
                    n_old + torch.arange(w, device=x_t.device),
                    new_state.partial_scores > NEG_INF,
                    self.max_global,
                )
                kept = self._kept_globals(candidates, index, valid)
                new_state.global_keys, new_state.global_values, new_state.global_scores, new_state.global_pos = kept
                new_state.global_reveal = None
            new_state.partial_scores = new_state.partial_scores[:, :0]
        return ComponentOutput(update=update, state=new_state)

    @torch.no_grad()
    def attention_map(self, x: Tensor, context: ComponentContext | None = None, positions: Tensor | None = None) -> AttentionMap:
        """Attention weights of the queries at ``positions`` (default: all) of x (B, L, D), a sequence from position 0.

        The keys, masks and global selection of :meth:`forward` written out densely over the L key positions, for
        inspection and diagnostics: O(Q * L) memory. (A scored value is scaled by its salience after the softmax,
        so the scaling is not part of the weights.) Honours ``context.segment_ids`` as :meth:`forward` does.
        """
        batch, seq_len, _ = x.shape
        h, hd, w = self.n_heads, self.head_dim, self.window
        pos = torch.arange(seq_len, device=x.device)
        positions = pos if positions is None else positions.to(x.device)
        key = self._rotate(self.kv(x).view(batch, seq_len, 2, h, hd)[:, :, 0], pos)  # (B, L, H, hd)
        q = self._rotate(self.q(x[:, positions]).view(batch, -1, h, hd), positions)  # (B, Q, H, hd)
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32: weights of bfloat16 runs too
        logits = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), key.to(dtype)) * hd**-0.5  # (B, H, Q, L)
        qp = positions[:, None]  # (Q, 1)
        local = ((pos <= qp) & (qp <= pos + w)).expand(batch, -1, -1)  # (B, Q, L)
        hits = torch.zeros(local.shape, dtype=torch.long, device=x.device)
        score = None if context is None else context.global_score
        segment_ids = None if context is None else context.segment_ids
        doc = None
        if segment_ids is not None:
            starts = document_starts(segment_ids)  # (B, L)
            doc_first = (pos - document_offsets(starts))[:, positions]  # (B, Q) where each query's document starts
            local = local & (pos >= doc_first[..., None])
            doc = starts.long().cumsum(-1)  # as in forward: globals are ranked within the current document
        if score is not None and self.uses_globals:
            schedule = global_schedule(score.to(x.dtype), w, self.max_global, doc)  # (B, C, M), -1: empty
            seen = schedule[:, positions // w]  # (B, Q, M): the globals each query's chunk may read
            # As in forward: a global inside the query's local window is read there, not through the global set.
            reads = (seen >= 0) & (qp > seen + w)
            if segment_ids is not None:  # and never an earlier document's global
                reads = reads & (seen >= doc_first[..., None])
            hits.scatter_add_(2, seen.clamp_min(0), reads.long())
        via_global = hits > 0
        visible = local | via_global
        weights = logits.masked_fill(~visible[:, None], NEG_INF).softmax(-1)  # each query sees itself: no empty row
        return AttentionMap(weights=weights, positions=positions, visible=visible, via_global=via_global)

    def _global_attention_share(self, x: Tensor, context: ComponentContext | None) -> Tensor:
        """Mean attention mass on global tokens over heads and up to 32 evenly spaced queries past the first chunk.

        Queries of the first chunk have no global to read, so they are left out rather than averaged in as zeros.
        """
        seq_len = x.shape[1]
        n = min(32, seq_len - self.window)
        positions = torch.linspace(self.window, seq_len - 1, n, device=x.device).round().long().unique()
        amap = self.attention_map(x, context, positions)
        return (amap.weights * amap.via_global[:, None]).sum(-1).mean().to(x.dtype)
