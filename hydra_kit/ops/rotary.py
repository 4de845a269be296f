"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864), and the rotary q/k/v projection of a decoding step.

:class:`RotaryEmbedding` and :func:`apply_rotary` serve dense and sparse attention on any input. For one token
per sequence, an attention layer projects it to queries, keys and values and rotates the first two: in PyTorch a
product, views, a position tensor, the cos/sin table and two rotations of about six ops each. :func:`qkv_rotary`
does it as one C call on CPU (``rotary.c``); dense attention (one qkv weight) and sparse global attention
(separate q and kv weights) both use it, so the two models' decoding steps carry the same fixed costs.
:func:`qkv_rotary_reference` is the same in PyTorch, the reference the kernel is tested against.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "MAX_HALF_WIDTH", "RotaryEmbedding", "apply_rotary", "qkv_rotary", "qkv_rotary_reference"]


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for rotary embeddings, computed for the absolute positions asked for.

    Args:
        head_dim: per-head width (even).
        base: frequency base.
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        # Not a checkpointed buffer: it is a pure function of head_dim and base.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Return cos and sin of shape (*positions.shape, head_dim // 2) for integer positions."""
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x (..., head_dim) by the angles behind cos/sin (..., head_dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def qkv_rotary_reference(x: Tensor, weight_a: Tensor, weight_b: Tensor | None, inv_freq: Tensor, heads: int, pos: int) -> Tensor:
    """:func:`qkv_rotary` in PyTorch ops (any device, dtype and autograd): (B, 3, H, hd) from x (B, D) at ``pos``."""
    weight = weight_a if weight_b is None else torch.cat([weight_a, weight_b])  # (3 H hd, D)
    q, k, v = F.linear(x, weight).view(x.shape[0], 3, heads, 2 * inv_freq.shape[0]).unbind(1)  # (B, H, hd) each
    angles = float(pos) * inv_freq  # (hd / 2,)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v], dim=1)


MAX_HALF_WIDTH = 512  # the kernel's rotary table lives on its stack: head widths up to 1024

_l, _p = ctypes.c_long, ctypes.c_void_p
_ARGUMENTS: list[type] = [_p, _p, _p, _p, _p, _l, _l, _l, _l, _l, _l, _l, _p]  # x, weights, freqs, out; sizes; slots
LIBRARY = native.NativeLibrary(Path(__file__).with_name("rotary.c"), {"hk_qkv_rotary": _ARGUMENTS})


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

    Returns None (nothing computed) for tensors the kernel cannot take: not contiguous float32 on the CPU,
    autograd on, head widths above ``2 * MAX_HALF_WIDTH``. Tensors it could take but whose shapes do not fit
    together raise a ValueError naming them (the PyTorch path would fail on them too).
    """
    weights = (weight_a,) if weight_b is None else (weight_a, weight_b)
    if inv_freq.numel() > MAX_HALF_WIDTH or not dispatch.usable(x, inv_freq, *weights):
        return None
    _check_shapes(x, weight_a, weight_b, inv_freq, heads, key_out, value_out)
    dst = None
    if key_out is not None and value_out is not None:
        stride = key_out.stride()
        if not (
            key_out.dtype is value_out.dtype is torch.float32 and key_out.is_cpu and value_out.is_cpu and stride[2] == 1
            and value_out.stride() == stride
        ):  # fmt: skip
            return None
        dst = (ctypes.c_int64 * 6)(key_out.data_ptr(), value_out.data_ptr(), stride[0], stride[1], stride[0], stride[1])
    library = dispatch.kernel(LIBRARY, x, inv_freq, *weights)
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


def _check_shapes(
    x: Tensor, weight_a: Tensor, weight_b: Tensor | None, inv_freq: Tensor, heads: int,
    key_out: Tensor | None, value_out: Tensor | None,
) -> None:  # fmt: skip
    """Raise unless the kernel's reads and writes stay inside these tensors: x (B, D), 3 H hd rows of width D, ..."""
    if x.dim() != 2 or inv_freq.dim() != 1 or heads < 1 or inv_freq.shape[0] < 1:
        raise ValueError(
            f"qkv_rotary: expected x (B, D), inv_freq (hd / 2,) and heads >= 1, got x {tuple(x.shape)}, "
            f"inv_freq {tuple(inv_freq.shape)}, heads {heads}"
        )
    d_model, rows = x.shape[1], 6 * heads * inv_freq.shape[0]  # 3 H hd
    given = [tuple(weight_a.shape)] + ([] if weight_b is None else [tuple(weight_b.shape)])
    if any(len(w) != 2 or w[1] != d_model for w in given) or sum(w[0] for w in given) != rows:
        raise ValueError(f"qkv_rotary: weights {given} for x {tuple(x.shape)}: expected {rows} rows of width {d_model} in all")
    if (key_out is None) != (value_out is None):
        raise ValueError("qkv_rotary: key_out and value_out go together")
    expected = (x.shape[0], heads, 2 * inv_freq.shape[0])
    for name, t in (("key_out", key_out), ("value_out", value_out)):
        if t is not None:
            dispatch.expect_shape("qkv_rotary", name, t, expected)
