"""The product-key memory's read of a few tokens as one C call on CPU (``pkm_step.c``).

Decoding one token through :class:`hydra_kit.components.pkm.ProductKeyMemory` in PyTorch is a query product, a
LayerNorm, two sub-key score products, three ``topk`` calls, gathers, a softmax and an ``EmbeddingBag``: about 20
ops of 5-10 us fixed cost for a few hundred kilobytes of reads. The kernel does the same selection and weighted
sum; the PyTorch path is the reference (``tests/kernels/test_native_decode.py``). Built on first use by
:mod:`hydra_kit.nn.native`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "MAX_ROWS", "pkm_read_cpu"]

MAX_ROWS = 8  # tokens per call; more go through the batched PyTorch path
MAX_SELECT = 4096  # as in pkm_step.c: longest list a selection runs over

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("pkm_step.c"), {"hk_pkm_step": [_p] * 11 + [_l] * 8 + [_f]})


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
        x: (..., D), at most ``MAX_ROWS`` tokens.
        query_weight: (H * dk, D); gain, bias: (H, dk); sub_keys: (H, 2, n_keys, dk / 2); values: (n_keys^2, dv).
        rows, cols: (P,) long candidate pairs (``candidate_pairs``).
        eps: epsilon of the query LayerNorm.
    """
    heads, _, n_keys, half = sub_keys.shape
    d_model, d_value = x.shape[-1], values.shape[1]
    tokens, n_candidates = x.numel() // d_model, rows.shape[0]
    if not 0 < tokens <= MAX_ROWS or max(n_keys, n_candidates) > MAX_SELECT or top_k > n_keys:
        return None
    if not native.usable(x, query_weight, gain, bias, sub_keys, values) or not (rows.is_contiguous() and cols.is_contiguous()):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    d_key = 2 * half
    out = x.new_empty(*x.shape[:-1], d_value)
    scratch = x.new_empty(heads * (d_key + 2 * n_keys + 2 * top_k + n_candidates + d_value))
    index_scratch = torch.empty(heads * 3 * top_k, dtype=torch.long)
    library.hk_pkm_step(
        *(t.data_ptr() for t in (x, query_weight, gain, bias, sub_keys, values, rows, cols, out, scratch, index_scratch)),
        tokens, d_model, heads, d_key, n_keys, top_k, n_candidates, d_value, eps,
    )  # fmt: skip
    return out
