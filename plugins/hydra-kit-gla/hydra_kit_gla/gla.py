"""Gated linear attention: a linear-time sequence mixer with a data-dependent, per-key-dimension forget gate.

Yang, Wang, Shen, Panda & Kim 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training"
(arXiv 2312.06635). Per head, with a matrix-valued state S (d_k, d_v)::

    alpha_t = sigmoid(W_a2 W_a1 x_t + b_a) ** (1 / tau)      # (d_k,) in (0, 1): low-rank gate, temperature tau
    S_t     = diag(alpha_t) S_{t-1} + k_t^T v_t
    o_t     = q_t S_t
    y_t     = W_o (RMSNorm(o_t) * silu(W_r x_t))              # per-head norm, output gate

The forward pass is chunk-parallel (the paper's section 4, "secondary chunking"): inside a chunk of
``chunk_size`` tokens everything is matmuls on (chunk, chunk) blocks; between chunks only the (d_k, d_v) state
is carried, by a short loop over chunks (never over time steps). No (L, L) tensor is formed. Every decay
factor that is exponentiated is a product of gates, hence <= 1, so the pass is exact in float32 for any gate
values, including gates that forget almost everything (see ``chunked_gla``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from hydra_kit.ops import RMSNorm
from hydra_kit.protocol import ComponentContext, ComponentOutput, ComponentPath, TriPathComponent
from torch import Tensor, nn

__all__ = ["GLAState", "GatedLinearAttention", "chunked_gla"]


@dataclass
class GLAState:
    """The recurrent state of gated linear attention after the last token seen.

    Attributes:
        memory: (B, H, d_k, d_v) the matrix state S_t of every head.
    """

    memory: Tensor


def chunked_gla(
    q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, initial: Tensor, chunk_size: int, sub_chunk: int
) -> tuple[Tensor, Tensor]:
    """Gated linear attention over a whole sequence, chunk-parallel; returns outputs and the final state.

    Inside a chunk, with b_t the cumulative log gate from the chunk start through t (b is non-increasing),
    the weight of key s for query t is ``exp(b_t - b_s)`` per key dimension. Factoring it as
    ``exp(b_t) * exp(-b_s)`` would overflow when gates are small, so the chunk is cut into sub-chunks of
    ``sub_chunk`` tokens: for a key in an earlier sub-chunk the weight is split at the boundary B_i just before
    the query's sub-chunk, ``exp(b_t - B_i) * exp(B_i - b_s)`` (both factors <= 1, one matmul per sub-chunk);
    keys in the query's own sub-chunk use the exact pairwise form on a (sub_chunk, sub_chunk) block.

    Args:
        q: (B, H, L, d_k) queries (already scaled).
        k: (B, H, L, d_k) keys.
        v: (B, H, L, d_v) values.
        log_alpha: (B, H, L, d_k) log forget gates, <= 0.
        initial: (B, H, d_k, d_v) state before the first token.
        chunk_size: tokens per chunk (a multiple of ``sub_chunk``).
        sub_chunk: tokens per sub-chunk.

    Returns:
        o: (B, H, L, d_v) and the state (B, H, d_k, d_v) after the last token.
    """
    batch, heads, seq_len, d_k = q.shape
    d_v = v.shape[-1]
    c = min(sub_chunk, chunk_size)
    # Short inputs (chunked or single-token calls) use one short chunk instead of padding to a full one.
    size = min(chunk_size, c * math.ceil(seq_len / c))
    pad = (-seq_len) % size
    if pad:
        # Padding comes after the real tokens: zero keys write nothing and log gate 0 forgets nothing, so the
        # state after the padding equals the state after the last real token.
        q, k, v, log_alpha = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_alpha))
    n_chunks, n_sub = (seq_len + pad) // size, size // c
    q = q.view(batch, heads, n_chunks, size, d_k)
    k = k.view(batch, heads, n_chunks, size, d_k)
    v = v.view(batch, heads, n_chunks, size, d_v)
    b = log_alpha.view(batch, heads, n_chunks, size, d_k).cumsum(-2)  # (B, H, N, C, d_k), inclusive

    # Between chunks: what each chunk writes into the state, decayed to the chunk's end, and its total decay.
    b_end = b[..., -1:, :]  # (B, H, N, 1, d_k)
    written = (k * torch.exp(b_end - b)).transpose(-1, -2) @ v  # (B, H, N, d_k, d_v)
    decay = torch.exp(b_end).transpose(-1, -2)  # (B, H, N, d_k, 1)
    state = initial
    starts = []
    for n in range(n_chunks):  # a loop over chunks carrying only the (d_k, d_v) state
        starts.append(state)
        state = decay[:, :, n] * state + written[:, :, n]
    out = (q * torch.exp(b)) @ torch.stack(starts, dim=2)  # (B, H, N, C, d_v)

    # Inside a chunk, keys of earlier sub-chunks: split every weight at the query sub-chunk's start.
    bs = b.view(batch, heads, n_chunks, n_sub, c, d_k)
    boundary = torch.cat([torch.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], dim=-2)  # (B, H, N, S, d_k)
    q_hat = q.view_as(bs) * torch.exp(bs - boundary[..., None, :])  # (B, H, N, S, c, d_k)
    # clamp: entries for keys at or after the boundary are masked below; clamping keeps their exp finite.
    k_hat = k[..., None, :, :] * torch.exp((boundary[..., :, None, :] - b[..., None, :, :]).clamp(max=0))  # (B, H, N, S, C, d_k)
    scores = q_hat @ k_hat.transpose(-1, -2)  # (B, H, N, S, c, C)
    position = torch.arange(size, device=q.device)
    earlier = position[None, :] < (torch.arange(n_sub, device=q.device) * c)[:, None]  # (S, C)
    scores = scores * earlier[:, None, :].to(scores.dtype)
    # Keys of the query's own sub-chunk: exact pairwise decay on a (c, c) block, causal (s <= t).
    pair = torch.exp((bs[..., :, None, :] - bs[..., None, :, :]).clamp(max=0))  # (B, H, N, S, c, c, d_k)
    own = torch.einsum("...tk,...sk,...tsk->...ts", q.view_as(bs), k.view_as(bs), pair)  # (B, H, N, S, c, c)
    own = own * torch.ones(c, c, dtype=torch.bool, device=q.device).tril().to(own.dtype)
    eye = torch.eye(n_sub, dtype=own.dtype, device=q.device)
    scores = scores.view(batch, heads, n_chunks, n_sub, c, n_sub, c) + own[..., None, :] * eye[:, None, :, None]
    out = out + scores.view(batch, heads, n_chunks, size, size) @ v  # (B, H, N, C, d_v)
    return out.reshape(batch, heads, n_chunks * size, d_v)[:, :, :seq_len], state


class GatedLinearAttention(TriPathComponent):
    """Multi-head gated linear attention (GLA): linear-time causal mixing with a data-dependent forget gate.

    Args:
        d_model: model width D.
        layer_idx: index of the block holding this component.
        n_heads: number of heads; must divide both the key width ``D * expand_k`` and the value width
            ``D * expand_v``.
        expand_k: key (and query, gate) width as a multiple of D; the paper uses 0.5.
        expand_v: value width as a multiple of D; the paper uses 1.
        gate_rank: rank of the low-rank forget-gate projection (the paper's 16).
        gate_temperature: tau; the gate is ``sigmoid(.) ** (1 / tau)``, which keeps it near 1 (slow forgetting)
            at initialisation (the paper's 16).
        chunk_size: tokens per chunk of the chunk-parallel forward; speed only, never the result.
        sub_chunk: tokens per sub-chunk (must divide ``chunk_size``); speed and memory only.
        norm_eps: epsilon of the per-head output RMSNorm.

    Shapes: forward (B, L, D) -> update (B, L, D); state :class:`GLAState` with memory (B, H, d_k, d_v).
    """

    path: ClassVar[ComponentPath] = ComponentPath.SEQUENCE
    gated_by_router: ClassVar[bool] = True
    # A second sequence mixer beside the always-on SSM backbone (0.8) starts with a smaller share of the
    # residual, like sparse global attention (0.2); used in place of the SSM, a recipe sets layerscale: 0.8.
    layerscale_init: ClassVar[float] = 0.5
    # Chunks of 8 cut into sub-chunks of 4: within the conformance check's 40 tokens every code path runs
    # (several chunks, a ragged last chunk, keys in earlier sub-chunks and in the query's own).
    example_init_args: ClassVar[dict[str, Any]] = {"n_heads": 2, "chunk_size": 8, "sub_chunk": 4}

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        n_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_rank: int = 16,
        gate_temperature: float = 16.0,
        chunk_size: int = 64,
        sub_chunk: int = 16,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(d_model, layer_idx)
        key_dim, value_dim = d_model * expand_k, d_model * expand_v
        if expand_k <= 0 or expand_v <= 0 or key_dim != int(key_dim) or value_dim != int(value_dim):
            raise ValueError(
                f"gla: expand_k={expand_k} and expand_v={expand_v} must be positive and give integer widths for "
                f"d_model={d_model} (got key width {key_dim}, value width {value_dim})"
            )
        self.key_dim, self.value_dim = int(key_dim), int(value_dim)
        if n_heads <= 0 or self.key_dim % n_heads or self.value_dim % n_heads:
            raise ValueError(
                f"gla: n_heads={n_heads} must be positive and divide the key width {self.key_dim} "
                f"(d_model * expand_k) and the value width {self.value_dim} (d_model * expand_v)"
            )
        if gate_rank <= 0 or gate_temperature <= 0:
            raise ValueError(f"gla: gate_rank ({gate_rank}) and gate_temperature ({gate_temperature}) must be positive")
        if sub_chunk <= 0 or chunk_size <= 0 or chunk_size % sub_chunk:
            raise ValueError(f"gla: sub_chunk={sub_chunk} must be positive and divide chunk_size={chunk_size}")
        self.n_heads = n_heads
        self.head_k, self.head_v = self.key_dim // n_heads, self.value_dim // n_heads
        self.gate_temperature = gate_temperature
        self.chunk_size, self.sub_chunk = chunk_size, sub_chunk
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, self.key_dim, bias=True)
        self.out_gate = nn.Linear(d_model, self.value_dim, bias=False)
        self.norm = RMSNorm(self.head_v, eps=norm_eps)  # shared by the heads, as in the paper's code
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Queries, keys, values and log forget gates of x (B, L, D), each (B, H, L, d); public for tests."""
        batch, seq_len, _ = x.shape

        def heads(t: Tensor, width: int) -> Tensor:
            return t.view(batch, seq_len, self.n_heads, width).transpose(1, 2)  # (B, H, L, width)

        q = heads(self.q_proj(x), self.head_k) * self.head_k**-0.5
        k = heads(self.k_proj(x), self.head_k)
        v = heads(self.v_proj(x), self.head_v)
        log_alpha = heads(F.logsigmoid(self.gate_up(self.gate_down(x))), self.head_k) / self.gate_temperature
        return q, k, v, log_alpha

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head norm, output gate and output projection: o (B, H, L, d_v) and x (B, L, D) -> (B, L, D)."""
        batch, _, seq_len, _ = o.shape
        o = self.norm(o.transpose(1, 2)).reshape(batch, seq_len, self.value_dim)  # (B, L, H * d_v)
        return self.out_proj(o * F.silu(self.out_gate(x)))

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> GLAState:
        return GLAState(torch.zeros(batch_size, self.n_heads, self.head_k, self.head_v, device=device, dtype=dtype))

    def forward(
        self, x: Tensor, context: ComponentContext | None = None, state: GLAState | None = None
    ) -> ComponentOutput:
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        q, k, v, log_alpha = self.project(x)
        o, memory = chunked_gla(q, k, v, log_alpha, state.memory, self.chunk_size, self.sub_chunk)
        return ComponentOutput(update=self.finish(o, x), state=GLAState(memory))

    def step(self, x_t: Tensor, state: GLAState, context: ComponentContext | None = None) -> ComponentOutput:
        """One token x_t (B, D): the recurrence itself, S = diag(alpha) S + k^T v, o = q S."""
        q, k, v, log_alpha = (t[:, :, 0] for t in self.project(x_t[:, None]))  # (B, H, d)
        memory = torch.exp(log_alpha)[..., None] * state.memory + k[..., :, None] * v[..., None, :]
        o = (q[..., None, :] @ memory)[..., 0, :]  # (B, H, d_v)
        return ComponentOutput(update=self.finish(o[:, :, None], x_t[:, None])[:, 0], state=GLAState(memory))

    def flops_per_token(self, seq_len: int) -> float:
        # Projections, plus per head: reading and writing the state (2 d_k d_v each), the query against the
        # chunk's keys (C d_k), the own sub-chunk's pairwise decays (3 c d_k) and the scores against values.
        chunk = min(self.chunk_size, max(1, seq_len))
        per_head = 4 * self.head_k * self.head_v + 2 * chunk * (self.head_k + self.head_v) + 3 * self.sub_chunk * self.head_k
        return 2.0 * self.active_parameters() + self.n_heads * per_head
