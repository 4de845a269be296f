"""The product-key memory's read of a few tokens as one C call on CPU (``pkm_step.c``).

Decoding one token through :class:`hydra_kit.components.pkm.ProductKeyMemory` in PyTorch is a query product, a
LayerNorm, two sub-key score products, three ``topk`` calls, gathers, a softmax and an ``EmbeddingBag``: about 20
ops of 5-10 us fixed cost for a few hundred kilobytes of reads. The kernel does the same selection and weighted
sum; :func:`pkm_read_reference` is the same read in PyTorch ops, the reference it is tested against (as is the
component's own path). Built on first use by
:mod:`hydra_kit.ops.native`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.ops import dispatch, native
from hydra_kit.ops.pkm_topk import product_topk

__all__ = ["LIBRARY", "MAX_SELECT", "pkm_read_cpu", "pkm_read_reference"]

MAX_SELECT = 4096  # as in pkm_step.c: longest list a selection runs over

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(
    Path(__file__).with_name("pkm_step.c"), {"hk_pkm_step": [_p] * 11 + [_l] * 8 + [_f]}, {"hk_pkm_step": ctypes.c_int}
)


def pkm_read_cpu(
    x: Tensor,
    query_weight: Tensor,
    gain: Tensor,
    bias: Tensor,
    sub_keys: Tensor,
    values: Tensor,
    rows: Tensor,
    cols: Tensor,
    top_k: int,
    eps: float = 1e-5,
) -> Tensor | None:
    """The memory read (..., d_value) of tokens x (..., D), before any output projection; None when the kernel
    cannot take these tensors.

    Args:
        x: (..., D), at most ``dispatch.MAX_ROWS`` tokens.
        query_weight: (H * dk, D); gain, bias: (H, dk); sub_keys: (H, 2, n_keys, dk / 2); values: (n_keys^2, dv).
        rows, cols: (P,) long candidate pairs (``candidate_pairs``), each in [0, top_k).
        top_k: slots read per head, 1 to min(n_keys, P).
        eps: epsilon of the query LayerNorm.

    Returns:
        None when the kernel cannot take the tensors (not contiguous float32 on the CPU, or long pairs, autograd on,
        more than ``dispatch.MAX_ROWS`` tokens, lists longer than ``MAX_SELECT``); shapes that do not fit together, a top_k
        out of range or a pair outside the k-lists raise a ValueError.
    """
    tokens = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    library = dispatch.kernel(LIBRARY, x, query_weight, gain, bias, sub_keys, values, rows=tokens)
    if library is None or not all(t.dtype is torch.long and t.is_cpu and t.is_contiguous() for t in (rows, cols)):
        return None
    _check_shapes(x, query_weight, gain, bias, sub_keys, values, rows, cols, top_k)
    heads, _, n_keys, half = sub_keys.shape
    d_model, d_value = x.shape[-1], values.shape[1]
    n_candidates = rows.shape[0]
    if max(n_keys, n_candidates) > MAX_SELECT:
        return None
    d_key = 2 * half
    out = x.new_empty(*x.shape[:-1], d_value)
    scratch = x.new_empty(heads * (d_key + 2 * n_keys + 2 * top_k + n_candidates + d_value))
    index_scratch = torch.empty(heads * 3 * top_k, dtype=torch.long)
    status = library.hk_pkm_step(
        *(t.data_ptr() for t in (x, query_weight, gain, bias, sub_keys, values, rows, cols, out, scratch, index_scratch)),
        tokens, d_model, heads, d_key, n_keys, top_k, n_candidates, d_value, eps,
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"pkm_read: a candidate pair (rows, cols) lies outside [0, top_k = {top_k})")
    return out


def _check_shapes(
    x: Tensor, query_weight: Tensor, gain: Tensor, bias: Tensor, sub_keys: Tensor, values: Tensor, rows: Tensor,
    cols: Tensor, top_k: int,
) -> None:  # fmt: skip
    """Raise a ValueError naming the tensor unless every read of the kernel stays inside its argument."""
    if sub_keys.dim() != 4 or sub_keys.shape[1] != 2 or x.dim() == 0 or values.dim() != 2:
        raise ValueError(
            f"pkm_read: expected x (..., D), sub_keys (H, 2, n_keys, dk / 2) and values (n_keys^2, dv), got x "
            f"{tuple(x.shape)}, sub_keys {tuple(sub_keys.shape)}, values {tuple(values.shape)}"
        )
    heads, _, n_keys, half = sub_keys.shape
    d_model, d_key = x.shape[-1], 2 * half
    dispatch.expect_shape("pkm_read", f"query_weight (for x {tuple(x.shape)})", query_weight, (heads * d_key, d_model))
    dispatch.expect_shape("pkm_read", "gain", gain, (heads, d_key))
    dispatch.expect_shape("pkm_read", "bias", bias, (heads, d_key))
    dispatch.expect_shape("pkm_read", "values", values, (n_keys * n_keys, values.shape[1]))
    if rows.dim() != 1 or rows.shape != cols.shape:
        raise ValueError(f"pkm_read: candidate rows {tuple(rows.shape)} and cols {tuple(cols.shape)}: expected two (P,)")
    if not 0 < top_k <= min(n_keys, rows.shape[0]):
        raise ValueError(f"pkm_read: top_k {top_k} for {n_keys} sub-keys and {rows.shape[0]} candidate pairs")


def pkm_read_reference(
    x: Tensor, query_weight: Tensor, gain: Tensor, bias: Tensor, sub_keys: Tensor, values: Tensor, rows: Tensor,
    cols: Tensor, top_k: int, eps: float = 1e-5,
) -> Tensor:  # fmt: skip
    """:func:`pkm_read_cpu` in PyTorch ops (any device, dtype, number of tokens): the read (..., d_value) of x (..., D)."""
    heads, _, _, half = sub_keys.shape
    q = F.linear(x, query_weight).unflatten(-1, (heads, 2 * half))  # (..., H, dk)
    q = F.layer_norm(q, (2 * half,), eps=eps) * gain + bias
    q1, q2 = q.chunk(2, dim=-1)  # (..., H, dk / 2) each
    scores1 = torch.einsum("...hd,hnd->...hn", q1, sub_keys[:, 0])  # (..., H, n_keys)
    scores2 = torch.einsum("...hd,hnd->...hn", q2, sub_keys[:, 1])
    scores, slots = product_topk(scores1, scores2, top_k, rows, cols)  # (..., H, k)
    return (values[slots] * scores.softmax(-1)[..., None]).sum((-3, -2))  # the heads' reads, summed
