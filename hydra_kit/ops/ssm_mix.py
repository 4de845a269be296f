"""The element-wise stages of the selective SSM's sequence forward, each one C pass forward and one backward.

Between its two projections the SSM (:mod:`components.ssm`) runs, besides the chunked scan, two stages made of
element-wise ops over (B, T, C) tensors larger than the caches:

- :func:`conv_silu`: the causal depthwise convolution over the carried window and the new tokens, its bias and a
  SiLU (as PyTorch ops: a concatenation, K shifted multiply-adds and a SiLU, each a pass over memory);
- :func:`gated_norm`: the D skip, the SiLU gate and the (grouped) RMSNorm, ``rmsnorm((y + D x) * silu(z)) * w``
  (a multiply-add, a SiLU, a product, and RMSNorm's square, mean and scalings).

Each is one pass in C (``ssm_mix.c``) that reads its inputs once, in place (the column slices of the input
projection are read through their strides), and an autograd function whose backward is one C pass too, so
training gains as well as inference. :func:`conv_silu_reference` and :func:`gated_norm_reference` are the same
stages in PyTorch ops: what runs on any other device or dtype, under torch.compile (which fuses them itself), or
without a C compiler, and what the tests hold the kernels to, values and gradients.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.ops import dispatch, native
from hydra_kit.ops.conv import causal_depthwise_conv

__all__ = ["LIBRARY", "conv_silu", "conv_silu_reference", "gated_norm", "gated_norm_reference"]

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(
    Path(__file__).with_name("ssm_mix.c"),
    {
        # x, sxb, sxt, state, wt, bias, offsets, out, B, T, C, K
        "hk_conv_silu_forward": [_p, _l, _l, _p, _p, _p, _p, _p, _l, _l, _l, _l],
        # ... offsets, gout, gx, gstate, gwt, gbias, ga, scratch, threads, B, T, C, K
        "hk_conv_silu_backward": [_p, _l, _l, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _l, _l, _l, _l, _l],
        # y, syb, syt, xs, sxb, sxt, z, szb, szt, d, w, eps, groups, out, rstd, B, T, n
        "hk_gated_norm_forward": [_p, _l, _l, _p, _l, _l, _p, _l, _l, _p, _p, _f, _l, _p, _p, _l, _l, _l],
        # ... d, w, rstd, groups, gout, gy, gxs, gz, gd, gw, scratch, threads, B, T, n
        "hk_gated_norm_backward": [_p, _l, _l, _p, _l, _l, _p, _l, _l, _p, _p, _p, _l, _p, _p, _p, _p, _p, _p, _p, _l, _l, _l, _l],
    },
)


def _rows(t: Tensor) -> tuple[int, int, int]:
    """Address and the (batch, token) strides in elements of a (B, T, C) tensor read row by row."""
    return t.data_ptr(), t.stride(0), t.stride(1)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def conv_silu_reference(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor | None = None) -> Tensor:
    """:func:`conv_silu` in PyTorch ops: any device, dtype and autograd."""
    return F.silu(causal_depthwise_conv(torch.cat([state, x], dim=1), weight, bias, offsets))


class _ConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, state: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor | None, library: ctypes.CDLL) -> Tensor:
        taps = weight.t().contiguous()  # (K, C): the kernel's inner loop runs along the channels
        b, t, c = x.shape
        out = x.new_empty(b, t, c)
        library.hk_conv_silu_forward(*_rows(x), state.data_ptr(), taps.data_ptr(), bias.data_ptr(), native.ptr(offsets), out.data_ptr(), b, t, c, taps.shape[0])
        ctx.save_for_backward(x, state, taps, bias, offsets)
        ctx.library = library
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, state, taps, bias, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        b, t, c = x.shape
        k = taps.shape[0]
        gx, gstate, scratch = x.new_empty(b, t, c), state.new_empty(state.shape), x.new_empty(b, t, c)
        gtaps, gbias = taps.new_zeros(k, c), bias.new_zeros(c)
        threads = _threads()
        sums = torch.empty(threads * (k + 1) * c, dtype=torch.float64)
        ctx.library.hk_conv_silu_backward(
            *_rows(x), state.data_ptr(), taps.data_ptr(), bias.data_ptr(), native.ptr(offsets), grad.data_ptr(),
            gx.data_ptr(), gstate.data_ptr(), gtaps.data_ptr(), gbias.data_ptr(), scratch.data_ptr(), sums.data_ptr(),
            threads, b, t, c, k,
        )  # fmt: skip
        return gx, gstate, gtaps.t(), gbias, None, None


def conv_silu(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor | None = None) -> Tensor:
    """``silu(causal depthwise conv of [state; x] + bias)``: the SSM's convolution stage (``ops.conv``'s maths).

    Args:
        x: (B, T, C) the new tokens (may be a column slice of a wider tensor: read in place).
        state: (B, K - 1, C) the K - 1 inputs before them (the carried window).
        weight: (C, K) taps; tap K - 1 multiplies the current token.
        bias: (C,).
        offsets: (B, T) long, or None: each token's distance from its document's start; a tap reaching back past it
            reads zero (:func:`hydra_kit.ops.conv.causal_depthwise_conv`).

    Returns:
        (B, T, C).
    """
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"conv_silu: x must be (B, T, C) and weight (C, K), got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    b, t, c = x.shape
    taps = weight.shape[-1]
    dispatch.expect_shape("conv_silu", "state", state, (b, taps - 1, c))
    dispatch.expect_shape("conv_silu", "weight", weight, (c, taps))
    dispatch.expect_shape("conv_silu", "bias", bias, (c,))
    if offsets is not None:
        dispatch.expect_shape("conv_silu", "offsets", offsets, (b, t))
    long_offsets = offsets is None or (offsets.dtype is torch.int64 and offsets.is_cpu)
    if t and taps > 1 and long_offsets:
        library = dispatch.kernel(LIBRARY, state, weight, bias, strided=(x,), differentiable=True)
        if library is not None:
            return _ConvSiLU.apply(x, state, weight, bias, None if offsets is None else offsets.contiguous(), library)
    return conv_silu_reference(x, state, weight, bias, offsets)


def gated_norm_reference(y: Tensor, x: Tensor, d: Tensor, z: Tensor, weight: Tensor, eps: float, groups: int = 1) -> Tensor:
    """:func:`gated_norm` in PyTorch ops: any device, dtype and autograd."""
    g = torch.addcmul(y, x, d) * F.silu(z)
    if groups == 1:
        return F.rms_norm(g, (g.shape[-1],), weight, eps)
    g = g.unflatten(-1, (groups, g.shape[-1] // groups))  # Mamba-2 normalises each group alone
    return F.rms_norm(g, (g.shape[-1],), eps=eps).flatten(-2) * weight


class _GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: Tensor, x: Tensor, d: Tensor, z: Tensor, weight: Tensor, eps: float, groups: int, library: ctypes.CDLL) -> Tensor:
        b, t, n = y.shape
        out, rstd = y.new_empty(b, t, n), y.new_empty(b, t, groups)
        library.hk_gated_norm_forward(
            *_rows(y), *_rows(x), *_rows(z), d.data_ptr(), weight.data_ptr(), eps, groups, out.data_ptr(), rstd.data_ptr(), b, t, n
        )
        ctx.save_for_backward(y, x, d, z, weight, rstd)
        ctx.groups, ctx.library = groups, library
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, x, d, z, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        b, t, n = y.shape
        gy, gx, gz = y.new_empty(b, t, n), y.new_empty(b, t, n), y.new_empty(b, t, n)
        gd, gw = d.new_zeros(n), weight.new_zeros(n)
        threads = _threads()
        sums = torch.empty(threads * 2 * n, dtype=torch.float64)
        ctx.library.hk_gated_norm_backward(
            *_rows(y), *_rows(x), *_rows(z), d.data_ptr(), weight.data_ptr(), rstd.data_ptr(), ctx.groups,
            grad.data_ptr(), gy.data_ptr(), gx.data_ptr(), gz.data_ptr(), gd.data_ptr(), gw.data_ptr(), sums.data_ptr(),
            threads, b, t, n,
        )  # fmt: skip
        return gy, gx, gd, gz, gw, None, None, None


def gated_norm(y: Tensor, x: Tensor, d: Tensor, z: Tensor, weight: Tensor, eps: float, groups: int = 1) -> Tensor:
    """``rmsnorm((y + d * x) * silu(z)) * weight``, the RMS taken over each of ``groups`` equal groups of channels.

    The SSM's output stage: the scan's output y, its D skip, the SiLU gate of z and Mamba-2's gated RMSNorm.

    Args:
        y: (B, T, n) the scan's output.
        x: (B, T, n) the scan's input (may be a column slice of a wider tensor, as may z: read in place).
        d: (n,) the skip's weight per channel.
        z: (B, T, n) the gate's input.
        weight: (n,) the norm's gain.
        eps: added to each group's mean square.
        groups: equal groups of channels normalised alone (n must be a multiple).

    Returns:
        (B, T, n).
    """
    if y.dim() != 3:
        raise ValueError(f"gated_norm: y must be (B, T, n), got shape {tuple(y.shape)}")
    b, t, n = y.shape
    if groups <= 0 or n % groups:
        raise ValueError(f"gated_norm: groups={groups} must divide the {n} channels")
    for name, tensor in (("x", x), ("z", z)):
        dispatch.expect_shape("gated_norm", name, tensor, (b, t, n))
    dispatch.expect_shape("gated_norm", "d", d, (n,))
    dispatch.expect_shape("gated_norm", "weight", weight, (n,))
    if t and n:
        library = dispatch.kernel(LIBRARY, d, weight, strided=(y, x, z), differentiable=True)
        if library is not None:
            return _GatedNorm.apply(y, x, d, z, weight, eps, groups, library)
    return gated_norm_reference(y, x, d, z, weight, eps, groups)
