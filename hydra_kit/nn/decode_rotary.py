"""Rotary query/key/value projection of one token per sequence as one C call on CPU (``decode_rotary.c``).

An attention layer decoding one token projects it to queries, keys and values and rotates the first two: in
PyTorch a product, views, a position tensor, the cos/sin table and two rotations of about six ops each. Dense
attention (one qkv weight) and sparse global attention (separate q and kv weights) both use this kernel, so the
two models' decoding steps carry the same fixed costs; the PyTorch ops stay the reference and the fallback.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "MAX_HALF_WIDTH", "qkv_rotary"]

MAX_HALF_WIDTH = 512  # the kernel's rotary table lives on its stack: head widths up to 1024

_l, _p = ctypes.c_long, ctypes.c_void_p
_ARGUMENTS: list[type] = [_p, _p, _p, _p, _p, _l, _l, _l, _l, _l, _l, _l, _p]  # x, weights, freqs, out; sizes; slots
LIBRARY = native.NativeLibrary(Path(__file__).with_name("decode_rotary.c"), {"hk_qkv_rotary": _ARGUMENTS})


def qkv_rotary(
    x: Tensor, weight_a: Tensor, weight_b: Tensor | None, inv_freq: Tensor, heads: int, pos: int,
    key_out: Tensor | None = None, value_out: Tensor | None = None,
) -> Tensor | None:  # fmt: skip
    """(B, 3, H, hd) queries, keys (both rotated to position ``pos``) and values, or None when the kernel cannot run.

    Args:
        x: (B, D) one token per sequence, all at absolute position ``pos``.
        weight_a, weight_b: the projection's rows, concatenated (weight_b may be None): 3 * H * hd rows in all,
            queries first, then keys, then values.
        inv_freq: (hd / 2,) rotary frequencies.
        key_out, value_out: optional (B, H, hd) views (float32, same strides, contiguous heads), e.g. the next
            slot of a key/value cache: the keys and values are written there too. Nothing is written when the
            kernel cannot run (the result is then None).
    """
    weights = (weight_a,) if weight_b is None else (weight_a, weight_b)
    if inv_freq.shape[0] > MAX_HALF_WIDTH or not native.usable(x, inv_freq, *weights):
        return None
    dst = None
    if key_out is not None and value_out is not None:
        stride = key_out.stride()
        shape = (x.shape[0], heads, inv_freq.shape[0] * 2)
        if not (
            key_out.dtype is value_out.dtype is torch.float32 and key_out.is_cpu and value_out.is_cpu and stride[2] == 1
            and value_out.stride() == stride and key_out.shape == value_out.shape == shape
        ):  # fmt: skip
            return None
        dst = (ctypes.c_int64 * 6)(key_out.data_ptr(), value_out.data_ptr(), stride[0], stride[1], stride[0], stride[1])
    library = LIBRARY.load()
    if library is None:
        return None
    batch, d_model = x.shape
    rows_a, rows_b = weight_a.shape[0], 0 if weight_b is None else weight_b.shape[0]
    head_dim = 2 * inv_freq.shape[0]
    out = x.new_empty(batch, 3, heads, head_dim)
    library.hk_qkv_rotary(
        x.data_ptr(), weight_a.data_ptr(), native.ptr(weight_b), inv_freq.data_ptr(), out.data_ptr(),
        batch, d_model, rows_a, rows_b, heads, head_dim, pos, dst,
    )  # fmt: skip
    return out
