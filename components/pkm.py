"""Product-key memory: a huge key-value table searched exactly in sub-linear time (docs/design.md 3.7).

Lample et al. 2019, "Large Memory Layers with Product Keys" (arXiv 1907.05242). Each of ``heads`` queries is
split in two halves; half ``j`` is scored against its own table of ``n_keys`` sub-keys. A full key is a pair of
sub-keys (one from each table) and its score is the sum of the two half scores, so the n_keys^2 full keys are
never built: the top-k of the product set lies among the pairs of the two per-half top-k lists. The chosen
slots' value vectors are mixed with softmax weights and the heads' reads are summed.

Everything is per token: no batch statistics (LayerNorm instead of the paper's BatchNorm on the query), no state,
so the memory is causal by construction and the block may run it on a gathered subset of tokens.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.ops import Linear
from hydra_kit.ops.pkm_step import pkm_read_cpu
from hydra_kit.ops.pkm_topk import (
    candidate_pairs,
    pkm_topk_triton,
    product_topk,
    triton_installed,
    triton_unavailable_reason,
)
from hydra_kit.protocol import (
    ComponentContext,
    ComponentOutput,
    ComponentPath,
    TriPathComponent,
    collects_aux,
    wants_diagnostics,
)

__all__ = ["ProductKeyMemory", "slot_usage_stats"]


@torch.no_grad()
def slot_usage_stats(slots: Tensor, weights: Tensor, n_slots: int) -> dict[str, Tensor]:
    """Slot-usage statistics of one batch (detached).

    Args:
        slots: (...) long slot indices read (any heads, any tokens).
        weights: (...) the matching non-negative read weights.
        n_slots: size of the value table.

    Returns:
        usage_frac: fraction of slots read with a nonzero weight at least once.
        usage_kl: KL(p || uniform) = log(n_slots) - H(p), where p is the total read weight per slot normalised
            to sum to 1; 0 when every slot is read equally, log(n_slots) when one slot takes everything.
    """
    weights = weights.detach()
    mass = torch.zeros(n_slots, device=weights.device, dtype=torch.float64)
    mass.index_add_(0, slots.reshape(-1), weights.reshape(-1).to(torch.float64))  # (n_slots,)
    hit = torch.zeros(n_slots, device=weights.device, dtype=torch.bool)
    hit[slots.reshape(-1)[weights.reshape(-1) > 0]] = True
    total = mass.sum()
    p = mass / total.clamp_min(torch.finfo(torch.float64).tiny)
    kl = (math.log(n_slots) + torch.special.xlogy(p, p).sum()).clamp_min(0.0)
    kl = torch.where(total > 0, kl, torch.zeros_like(kl))  # no reads (empty batch): no distribution to compare
    return {"usage_frac": hit.to(weights.dtype).mean(), "usage_kl": kl.to(weights.dtype)}


class ProductKeyMemory(TriPathComponent):
    """Product-key memory layer; stateless and pointwise.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        heads: number of query heads; their reads are summed.
        n_keys: sub-keys per half; the memory has n_keys^2 slots (128 -> 16,384).
        d_key: query width per head, split in two halves of d_key / 2; must be even.
        top_k: slots read per head (and sub-keys kept per half); at most n_keys.
        d_value: width of a value vector; None means d_model, otherwise an output projection maps it to d_model.
        sparse_values: give the value table sparse gradients (pays off when the table is much larger than the
            rows a batch touches; the optimiser must accept sparse gradients).
        value_lr_scale: learning-rate multiplier of the value table (the paper trains it with a larger rate),
            read by the trainer from the parameter's ``_hydra_lr_scale``.
        query_dropout: dropout on the normalised queries during training.
        backend: scoring and top-k implementation. "torch": matmuls and ``topk`` (any device); "triton": our fused
            kernel (:mod:`hydra_kit.ops.pkm_topk`; needs triton and a CUDA device, and says why
            when either is missing); "auto": triton for CUDA tensors when triton is installed, torch otherwise.
            The default is "torch": the kernel is verified against it only in triton's CPU interpreter so far,
            never compiled on a GPU, so a GPU run opts in with "auto" or "triton".
    """

    path: ClassVar[ComponentPath] = ComponentPath.MEMORY
    gated_by_router: ClassVar[bool] = True
    layerscale_init: ClassVar[float] = 0.1
    example_init_args: ClassVar[dict[str, Any]] = {"n_keys": 8, "top_k": 4, "heads": 2, "d_key": 16}
    # Pointwise and stateless (a per-token lookup in a table shared by all sequences, no batch statistics), so
    # documents cannot mix. The table is learned memory, like any weight, not per-document state.
    supports_resets: ClassVar[bool] = True

    cand_rows: Tensor  # (P,) buffers from candidate_pairs(top_k)
    cand_cols: Tensor

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        heads: int = 4,
        n_keys: int = 128,
        d_key: int = 128,
        top_k: int = 32,
        d_value: int | None = None,
        sparse_values: bool = False,
        value_lr_scale: float = 10.0,
        query_dropout: float = 0.0,
        backend: Literal["auto", "torch", "triton"] = "torch",
    ) -> None:
        super().__init__(d_model, layer_idx)
        if heads <= 0:
            raise ValueError(f"pkm: heads must be positive, got {heads}")
        if n_keys <= 0:
            raise ValueError(f"pkm: n_keys must be positive, got {n_keys}")
        if d_key <= 0 or d_key % 2:
            raise ValueError(f"pkm: d_key must be a positive even number (two halves), got {d_key}")
        if not 0 < top_k <= n_keys:
            raise ValueError(f"pkm: top_k must lie in [1, n_keys={n_keys}], got {top_k}")
        if d_value is not None and d_value <= 0:
            raise ValueError(f"pkm: d_value must be positive or None (= d_model), got {d_value}")
        if value_lr_scale <= 0:
            raise ValueError(f"pkm: value_lr_scale must be positive, got {value_lr_scale}")
        if not 0.0 <= query_dropout < 1.0:
            raise ValueError(f"pkm: query_dropout must lie in [0, 1), got {query_dropout}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"pkm: backend must be one of ['auto', 'torch', 'triton'], got {backend!r}")
        if backend == "triton" and (reason := triton_unavailable_reason()) is not None:
            raise ValueError(f"pkm: backend 'triton' is unavailable: {reason}. Use backend 'auto' or 'torch'.")
        self.heads, self.n_keys, self.d_key, self.top_k = heads, n_keys, d_key, top_k
        self.backend = backend
        # "auto" asks once whether triton is installed (without importing it); the device is checked per call.
        self._auto_triton = backend == "auto" and triton_installed()
        self.n_slots = n_keys * n_keys
        self.d_value = d_model if d_value is None else d_value
        self.query_dropout = query_dropout

        self.query = Linear(d_model, heads * d_key, bias=False)
        # Per-head, per-channel affine after a per-query LayerNorm: the role of the paper's BatchNorm affine,
        # without batch statistics (which would mix examples and break causality at inference).
        self.query_gain = nn.Parameter(torch.ones(heads, d_key))
        self.query_bias = nn.Parameter(torch.zeros(heads, d_key))
        half = d_key // 2
        bound = half**-0.5  # as the reference code: uniform in +-1/sqrt(half), a query half has norm ~sqrt(half)
        self.sub_keys = nn.Parameter(torch.empty(heads, 2, n_keys, half).uniform_(-bound, bound))
        # EmbeddingBag (mode "sum", per-sample weights) never materialises the (tokens, heads * k, d_value)
        # gathered rows; on CPU it is ~10x faster forward and 2.5-8x faster forward+backward than embedding+einsum.
        self.values = nn.EmbeddingBag(self.n_slots, self.d_value, mode="sum", sparse=sparse_values)
        nn.init.normal_(self.values.weight, std=self.d_value**-0.5)
        self.out = Linear(self.d_value, d_model, bias=False) if self.d_value != d_model else None
        for param in (self.query_gain, self.query_bias, self.values.weight):
            param._hydra_no_weight_decay = True  # type: ignore[attr-defined]
        self.values.weight._hydra_lr_scale = value_lr_scale  # type: ignore[attr-defined]
        self.values.weight._hydra_sparse_grad = sparse_values  # type: ignore[attr-defined]
        rows, cols = candidate_pairs(top_k)
        self.register_buffer("cand_rows", rows, persistent=False)
        self.register_buffer("cand_cols", cols, persistent=False)

    @property
    def pointwise(self) -> bool:
        return True

    @property
    def sparse_values(self) -> bool:
        return self.values.sparse

    def active_parameters(self) -> int:
        # Query projection and norm, both sub-key tables (every sub-key is scored), the heads * k value rows read,
        # and the output projection.
        dense = self.query.weight.numel() + self.query_gain.numel() + self.query_bias.numel() + self.sub_keys.numel()
        out = 0 if self.out is None else self.out.weight.numel()
        return dense + self.heads * self.top_k * self.d_value + out

    def flops_per_token(self, seq_len: int) -> float:
        query = 2.0 * self.d_model * self.heads * self.d_key
        scoring = 2.0 * self.heads * self.n_keys * self.d_key  # two halves x n_keys x d_key / 2 multiply-adds
        candidates = float(self.heads * self.cand_rows.numel())  # one addition per candidate pair
        read = 2.0 * self.heads * self.top_k * self.d_value
        out = 0.0 if self.out is None else 2.0 * self.d_value * self.d_model
        return query + scoring + candidates + read + out

    def queries(self, x: Tensor) -> Tensor:
        """Normalised queries (..., heads, d_key) of x (..., D)."""
        q = self.query(x).unflatten(-1, (self.heads, self.d_key))  # (..., H, dk)
        q = F.layer_norm(q, (self.d_key,)) * self.query_gain + self.query_bias
        return F.dropout(q, self.query_dropout, self.training)

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The k best slots of each head and their scores, without ever scoring the n_keys^2 full keys.

        Args:
            x: (..., D) normalised block input.

        Returns:
            slots: (..., heads, k) long slot indices (slot = i1 * n_keys + i2).
            scores: (..., heads, k) full-key scores q . [k1_i1, k2_i2], decreasing.
        """
        q = self.queries(x)  # (..., H, dk)
        if self.backend == "triton" or (self._auto_triton and q.is_cuda):
            scores, slots = pkm_topk_triton(q, self.sub_keys, self.top_k, self.cand_rows, self.cand_cols)
            return slots, scores
        q1, q2 = q.chunk(2, dim=-1)  # (..., H, dk/2) each
        scores1 = torch.einsum("...hd,hnd->...hn", q1, self.sub_keys[:, 0])  # (..., H, n_keys)
        scores2 = torch.einsum("...hd,hnd->...hn", q2, self.sub_keys[:, 1])
        scores, slots = product_topk(scores1, scores2, self.top_k, self.cand_rows, self.cand_cols)  # (..., H, k)
        return slots, scores

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: Any = None) -> ComponentOutput:
        batch, seq_len, _ = x.shape
        if not collects_aux(context) and not self.training:
            read = pkm_read_cpu(
                x, self.query.weight, self.query_gain, self.query_bias, self.sub_keys, self.values.weight,
                self.cand_rows, self.cand_cols, self.top_k,
            )  # fmt: skip
            if read is not None:  # decoding: the lookup and read below in one C call (CPU, float32, no autograd)
                return ComponentOutput(update=read if self.out is None else self.out(read))
        slots, scores = self.lookup(x)  # (B, L, H, k)
        weights = scores.softmax(dim=-1)  # (B, L, H, k)
        # One bag per token over all heads' reads: the heads' outputs are summed, as in the paper.
        bags = batch * seq_len, self.heads * self.top_k
        y = self.values(slots.reshape(bags), per_sample_weights=weights.reshape(bags))  # (B*L, dv)
        y = y.view(batch, seq_len, self.d_value)  # (B, L, dv)
        if self.out is not None:
            y = self.out(y)  # (B, L, D)
        stats = slot_usage_stats(slots, weights, self.n_slots) if collects_aux(context) else {}
        if wants_diagnostics(context):  # H(p) = log(n_slots) - KL(p || uniform): nats of key usage, log(n_slots) at best
            stats["usage_entropy"] = (math.log(self.n_slots) - stats["usage_kl"]).to(stats["usage_kl"].dtype)
        return ComponentOutput(update=y, stats=stats)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, layer_idx={self.layer_idx}, heads={self.heads}, n_keys={self.n_keys} "
            f"({self.n_slots} slots), d_key={self.d_key}, top_k={self.top_k}, d_value={self.d_value}, "
            f"sparse_values={self.sparse_values}, backend={self.backend}"
        )
