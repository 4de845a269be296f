"""Sparse global attention (SGA): a sliding local window plus router-chosen global tokens (docs/design.md 3.4).

Hydra (arXiv 2508.15099), with RoPE (Su et al. 2021, arXiv 2104.09864). Query t attends to

* its local window, the previous ``window`` tokens and itself, and
* at most ``max_global`` global tokens of its past. The sequence is cut into chunks of ``window`` tokens
  (aligned to absolute position 0); when a chunk is complete, its ``globals_per_chunk`` tokens with the
  highest router score s (``context.global_score``) become global and are visible to every LATER chunk,
  never to the chunk itself or an earlier one, so a future score can never change what an earlier query
  reads. Only the most recent ``max_global`` globals are kept. A global that is also inside the query's
  local window is masked on the global side so no key counts twice.

Every scored token's value, local or global, is scaled by its salience ``2 * sigmoid(s)`` (1 at
initialisation, where s is near 0). This is how the selection learns: a token whose value helps the queries
that read it, in any local window, gets a higher score and so becomes a global of its chunk. Scaling only the
chosen globals (the design's first form) gave the score a gradient from the few tokens already chosen, and a
token pushed out of the top-k never came back (``docs/calibration/2026-12-07-mechanisms``).

Without a score (no router in the block) the layer is plain sliding-window attention: no token becomes
global and no query reads globals. There is deliberately no learned fallback score.

Document boundaries (``context.segment_ids``): a query reads local and global keys of its own document only, and
a chunk that holds a document start offers for promotion only the tokens of its last document (an earlier
document's token could serve no later query, and ranking it would let that document decide which of the new one's
tokens become global). The chunk grid stays aligned to the window's position 0, so a document's globals are those
it would get alone exactly when it starts on a chunk boundary; nothing of an earlier document reaches it anywhere.

Cost is O(L * (window + max_global)) in time and memory: queries are processed in blocks of ``window``
(one block per chunk), each against the 2 * window keys of its own and the previous chunk plus the globals
of earlier chunks, in one fused, masked ``scaled_dot_product_attention`` batched over blocks. No L x L
tensor exists anywhere.

The file is longer than most (about 640 lines) on purpose: the batched forward, the one-token decoding step and
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

__all__ = ["SGAState", "SparseGlobalAttention", "global_schedule", "select_globals"]

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
        global_keys: (B, G, H, hd) rotated keys of the globals chosen so far (G <= max_global), oldest first.
        global_values: (B, G, H, hd) their values (scaled by the salience, as every scored value is).
        global_scores: (B, G) their scores; -inf marks an empty slot (a chunk with too few scored tokens).
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


def select_globals(chunk_scores: Tensor, per_chunk: int) -> Tensor:
    """In-chunk positions of the ``per_chunk`` highest-scoring tokens of each chunk, in increasing order.

    A pick whose score is -inf (a padding slot or an unscored token) is an empty slot: callers read its
    score and mask it. Each chunk is ranked on its own scores only, which is what makes selection causal.

    Args:
        chunk_scores: (B, C, W) scores of C chunks of W tokens; -inf where a token cannot be global.
        per_chunk: k <= W.

    Returns:
        (B, C, k) long in-chunk positions.
    """
    return chunk_scores.topk(per_chunk, dim=-1).indices.sort(dim=-1).values


def salience(score: Tensor) -> Tensor:
    """The factor ``2 * sigmoid(s)`` on a scored token's value: 1 at s = 0, in (0, 2); shape of ``score``."""
    return 2.0 * torch.sigmoid(score)


def _windows(entries: Tensor, n_old: int, per_chunk: int, size: int, n_blocks: int, fill: float) -> Tensor:
    """Sliding windows over the global list: block j sees entries [n_old + j*k - size, n_old + j*k).

    ``entries`` lists the globals oldest first: n_old carried ones, then ``per_chunk`` per chunk of this call.
    Block j (the j-th chunk of the call) sees the carried ones and those of the j chunks before it, at most
    the last ``size``; missing entries are ``fill``.

    Args:
        entries: (B, n_old + n_blocks * per_chunk, *rest).

    Returns:
        (B, n_blocks, *rest, size): a strided view, no copy.
    """
    pad = entries.new_full((entries.shape[0], size, *entries.shape[2:]), fill)
    return torch.cat([pad, entries], dim=1)[:, n_old:].unfold(1, size, per_chunk)[:, :n_blocks]


def global_schedule(score: Tensor, window: int, globals_per_chunk: int, max_global: int) -> Tensor:
    """Positions of the global tokens visible to the queries of each chunk (-1: empty slot).

    The same selection and windowing as the forward pass, on positions only (for tests and inspection).

    Args:
        score: (B, L) router scores from position 0.
        window, globals_per_chunk, max_global: as in :class:`SparseGlobalAttention` (both counts > 0).

    Returns:
        (B, C, min(max_global, (C - 1) * globals_per_chunk)) long, C = ceil(L / window) chunks.
    """
    batch, seq_len = score.shape
    n_chunks = -(-seq_len // window)
    chunks = F.pad(score, (0, n_chunks * window - seq_len), value=NEG_INF).view(batch, n_chunks, window)
    index = select_globals(chunks, globals_per_chunk)  # (B, C, k)
    pos = index + torch.arange(n_chunks, device=score.device)[:, None] * window
    pos = pos.masked_fill(chunks.gather(-1, index) == NEG_INF, -1).flatten(1)  # (B, C * k)
    size = min(max_global, (n_chunks - 1) * globals_per_chunk)
    if size == 0:
        return pos.new_full((batch, n_chunks, 0), -1)
    return _windows(pos, 0, globals_per_chunk, size, n_chunks, -1)


class SparseGlobalAttention(TriPathComponent):
    """Causal multi-head attention over a local window plus router-chosen global tokens; linear in L.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        n_heads: number of heads; must divide d_model into an even head width (RoPE).
        window: local window (each query sees the previous ``window`` tokens and itself); also the chunk
            length for global selection.
        globals_per_chunk: tokens per chunk that become global. 16 with the default window 256 and
            max_global 512 makes the global memory reach back 32 chunks = 8K tokens, the paper's length,
            while 1 token in 16 is promoted. 0 turns globals off.
        max_global: most recent globals a query can see (0 turns globals off).
        rope_base: rotary frequency base.
        recompute: under autograd, rebuild each block's local + global key copies and masks in backward
            instead of saving them (same gradients, a fraction of the activation memory).

    ``context.keep`` (inference): skipped tokens issue no query (the kept queries of each block are gathered,
    so attention and the query/output projections run on them only) but still provide keys and values.
    The state (:class:`SGAState`) holds the last window, the globals and the open chunk's scores; ``step``
    is one query against at most window + 1 + max_global keys.
    """

    path: ClassVar[ComponentPath] = ComponentPath.SEQUENCE
    gated_by_router: ClassVar[bool] = True
    # 1.0 as for dense attention, not the paper's 0.2: a damped attention path learns its lookups that much
    # slower under Adam (hydra-kit's decision, docs/design-decisions.md).
    layerscale_init: ClassVar[float] = 1.0
    # 40 tokens = 5 chunks of 8; 2 globals per chunk overflow max_global=4 from the 4th chunk on.
    example_init_args: ClassVar[dict[str, Any]] = {"n_heads": 2, "window": 8, "globals_per_chunk": 2, "max_global": 4}
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
        globals_per_chunk: int = 16,
        max_global: int = 512,
        rope_base: float = 10000.0,
        recompute: bool = True,
    ) -> None:
        super().__init__(d_model, layer_idx)
        if n_heads <= 0 or d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"sga: n_heads={n_heads} must divide d_model={d_model} into an even head width")
        if window <= 0:
            raise ValueError(f"sga: window must be positive, got {window}")
        if not 0 <= globals_per_chunk <= window:
            raise ValueError(f"sga: globals_per_chunk must lie in [0, window={window}], got {globals_per_chunk}")
        if max_global < 0:
            raise ValueError(f"sga: max_global must be >= 0, got {max_global}")
        if rope_base <= 0:
            raise ValueError(f"sga: rope_base must be positive, got {rope_base}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.window = window
        self.globals_per_chunk = globals_per_chunk
        self.max_global = max_global
        self.recompute = recompute
        # Separate query projection: skipped tokens (context.keep) need keys and values but no query.
        self.q = Linear(d_model, d_model, bias=False)
        self.kv = Linear(d_model, 2 * d_model, bias=False)
        self.out = Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)

    @property
    def uses_globals(self) -> bool:
        return self.globals_per_chunk > 0 and self.max_global > 0

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_heads={self.n_heads}, window={self.window}, "
            f"globals_per_chunk={self.globals_per_chunk}, max_global={self.max_global}"
        )

    def flops_per_token(self, seq_len: int) -> float:
        # Projections, plus QK^T and AV over the keys a query really sees: min(t, W) + 1 local ones and the
        # globals of earlier chunks (the few masked as duplicates of local keys are not subtracted).
        w, k, m = self.window, self.globals_per_chunk, self.max_global
        local = sum(min(t, w) + 1 for t in range(min(seq_len, w))) + max(0, seq_len - w) * (w + 1)
        glob = sum(min(w, seq_len - c * w) * min(m, k * c) for c in range(-(-seq_len // w)))
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

    def _promote(
        self, state: SGAState, keys: Tensor, values: Tensor, scores: Tensor, chunk_start: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Append the picks of C chunks to the carried globals (oldest first; not yet cut to max_global).

        Args:
            state: holds the carried globals.
            keys, values: (B, C, W, H, hd) rotated keys and values of the chunks.
            scores: (B, C, W) their scores (-inf: cannot be global).
            chunk_start: (C,) absolute position of each chunk's first token.

        Returns:
            keys, values: (B, n, H, hd); scores, positions: (B, n). An empty slot (score -inf) is masked by
            every reader.
        """
        index = select_globals(scores, self.globals_per_chunk)  # (B, C, k)
        gather = index[..., None, None].expand(-1, -1, -1, self.n_heads, self.head_dim)
        picked = scores.gather(2, index).flatten(1)  # (B, C * k)
        new_keys = keys.gather(2, gather).flatten(1, 2)  # (B, C * k, H, hd)
        new_values = values.gather(2, gather).flatten(1, 2)
        new_pos = (chunk_start[:, None] + index).flatten(1)
        return (
            torch.cat([state.global_keys, new_keys], 1),
            torch.cat([state.global_values, new_values], 1),
            torch.cat([state.global_scores, picked], 1),
            torch.cat([state.global_pos, new_pos], 1),
        )

    def _attend(
        self,
        q: Tensor,
        k_grid: Tensor,
        v_grid: Tensor,
        q_pos: Tensor,
        q_doc: Tensor | None,
        windows: tuple[Tensor, Tensor, Tensor, Tensor] | None,
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
            windows: per block, global keys and values (B, nb, H, M, hd), positions (B, nb, M) and a mask of
                filled slots (B, nb, M); None when no global is visible.

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
        if windows is not None:
            g_keys, g_values, g_pos, g_ok = (t[:, first:stop] for t in windows)
            keys.append(g_keys)
            vals.append(g_values)
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
        h, hd, w, k = self.n_heads, self.head_dim, self.window, self.globals_per_chunk
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
        doc_start = None  # (B, L) where each token's document starts; None for one document
        if segment_ids is not None:  # a call from position 0 (r = 0): the chunk grid starts with x
            starts = document_starts(segment_ids)  # (B, L)
            doc_start = torch.arange(seq_len, device=dev) - document_offsets(starts)
            doc_in_chunk = F.pad(starts, (0, back)).view(batch, n_blocks, w).cumsum(-1)  # (B, nb, W)
            chunk_scores = chunk_scores.masked_fill(doc_in_chunk != doc_in_chunk[..., -1:], NEG_INF)

        # Every chunk of this call promotes its picks (the last one's count only once it is complete).
        n_old = state.global_keys.shape[1]
        stats: dict[str, Tensor] = {}
        if self.uses_globals:
            chunk_start = (c0 + torch.arange(n_blocks, device=dev)) * w
            chunk_k, chunk_v = (g[:, w:].view(batch, n_blocks, w, h, hd) for g in (k_grid, v_grid))
            g_keys, g_values, g_scores, g_pos = self._promote(state, chunk_k, chunk_v, chunk_scores, chunk_start)
            done = g_scores[:, n_old : n_old + n_done * k]
            if collects_aux(context) and (done > NEG_INF).any():
                stats["global_salience"] = salience(done[done > NEG_INF]).mean().detach()
            if wants_diagnostics(context) and read_globals and start == 0 and seq_len > w:
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
            n_vis = min(self.max_global, n_old + (n_blocks - 1) * k) if read_globals else 0
            windows = None
            if n_vis > 0:  # the globals each block may read: strided views over the global list
                windows = (
                    _windows(g_keys, n_old, k, n_vis, n_blocks, 0.0).transpose(-1, -2),  # (B, nb, H, M, hd)
                    _windows(g_values, n_old, k, n_vis, n_blocks, 0.0).transpose(-1, -2),
                    _windows(g_pos, n_old, k, n_vis, n_blocks, 0),  # (B, nb, M)
                    _windows(g_scores, n_old, k, n_vis, n_blocks, NEG_INF) > NEG_INF,
                )
            # At inference a few blocks per pass bound the transient key copies and masks (peak memory). Not
            # under autograd: every pass's inputs are saved anyway, and the backward of each pass's slices
            # would allocate full-size gradients. Results do not depend on the grouping.
            group = n_blocks if torch.is_grad_enabled() else max(1, self.queries_per_pass // w)
            if self.recompute and torch.is_grad_enabled():
                # Save the queries and the key grid, not the per-block key copies and masks: they are rebuilt
                # (cheap gathers) when backward needs them.
                y = checkpoint(self._attend, q, k_grid, v_grid, q_pos, q_doc, windows, c0, 0, n_blocks, use_reentrant=False)
            elif group >= n_blocks:
                y = self._attend(q, k_grid, v_grid, q_pos, q_doc, windows, c0, 0, n_blocks)  # (B, nb, H, Q, hd)
            else:
                y = q.new_empty(q.shape)
                for first in range(0, n_blocks, group):
                    stop = min(first + group, n_blocks)
                    y[:, first:stop] = self._attend(q, k_grid, v_grid, q_pos, q_doc, windows, c0, first, stop)
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
        if self.uses_globals:
            n_total = n_old + n_done * k
            first = max(0, n_total - self.max_global)
            kept = (g[:, first:n_total].clone() for g in (g_keys, g_values, g_scores, g_pos))
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
        h, hd, w = self.n_heads, self.head_dim, self.window
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
        if new_state.partial_scores.shape[1] == w:  # the chunk is complete: promote its globals
            if self.uses_globals:
                # The window now holds exactly this chunk's keys and values.
                chunk_k, chunk_v = (g.view(batch, 1, w, h, hd) for g in (new_state.keys, new_state.values))
                chunk_start = torch.tensor([pos + 1 - w], device=x_t.device)
                promoted = self._promote(state, chunk_k, chunk_v, new_state.partial_scores[:, None], chunk_start)
                first = max(0, promoted[0].shape[1] - self.max_global)
                kept = (g[:, first:] for g in promoted)
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
        if segment_ids is not None:
            starts = document_starts(segment_ids)  # (B, L)
            doc_first = (pos - document_offsets(starts))[:, positions]  # (B, Q) where each query's document starts
            local = local & (pos >= doc_first[..., None])
            if score is not None:  # as in forward: a chunk holding a start promotes only its last document's tokens
                n_chunks = -(-seq_len // w)
                doc = F.pad(starts, (0, n_chunks * w - seq_len)).view(batch, n_chunks, w).cumsum(-1)
                score = score.masked_fill((doc != doc[..., -1:]).flatten(1)[:, :seq_len], NEG_INF)
        if score is not None and self.uses_globals:
            schedule = global_schedule(score.to(x.dtype), w, self.globals_per_chunk, self.max_global)  # (B, C, M), -1: empty
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
