"""Rotary query/key/value projection of one token per sequence as one C call on CPU (``decode_rotary.c``).

An attention layer decoding one token projects it to queries, keys and values and rotates the first two: in
PyTorch a product, views, a position tensor, the cos/sin table and two rotations of about six ops each. Dense
attention (one qkv weight) and sparse global attention (separate q and kv weights) both use this kernel, so the
two models' decoding steps carry the same fixed costs; the PyTorch ops stay the reference and the fallback.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "MAX_HALF_WIDTH", "qkv_rotary"]

MAX_HALF_WIDTH = 512  # the kernel's rotary table lives on its stack: head widths up to 1024

_l, _p = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("decode_rotary.c"), {"hk_qkv_rotary": [_p] * 5 + [_l] * 7})


def qkv_rotary(x: Tensor, weight_a: Tensor, weight_b: Tensor | None, inv_freq: Tensor, heads: int, pos: int) -> Tensor | None:
    """(B, 3, H, hd) queries, keys (both rotated to position ``pos``) and values, or None when the kernel cannot run.

    Args:
        x: (B, D) one token per sequence, all at absolute position ``pos``.
        weight_a, weight_b: the projection's rows, concatenated (weight_b may be None): 3 * H * hd rows in all,
            queries first, then keys, then values.
        inv_freq: (hd / 2,) rotary frequencies.
    """
    weights = (weight_a,) if weight_b is None else (weight_a, weight_b)
    if inv_freq.shape[0] > MAX_HALF_WIDTH or not native.usable(x, inv_freq, *weights):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    batch, d_model = x.shape
    rows_a, rows_b = weight_a.shape[0], 0 if weight_b is None else weight_b.shape[0]
    head_dim = 2 * inv_freq.shape[0]
    out = x.new_empty(batch, 3, heads, head_dim)
    library.hk_qkv_rotary(
        x.data_ptr(), weight_a.data_ptr(), native.ptr(weight_b), inv_freq.data_ptr(), out.data_ptr(),
        batch, d_model, rows_a, rows_b, heads, head_dim, pos,
    )  # fmt: skip
    return out
