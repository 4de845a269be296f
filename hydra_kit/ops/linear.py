"""The linear op: ``F.linear``, with a streaming C kernel (``linear.c``) for the few rows of a decoding step.

A decoding step multiplies one row per sequence by every weight matrix, so its speed is the speed of reading the
weights from memory, and MKL's matrix-vector product reads them several times slower than the two-thread
dot-product loop of ``linear.c`` on small CPUs (``docs/benchmarks.md``). :func:`hydra_kit.ops.dispatch.kernel`
decides per call; everything it refuses (more rows, autograd, other dtypes or devices, kernels switched off or
unbuildable) is ``F.linear``, the reference, unchanged.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "Linear", "linear", "linear_reference"]

_c_long, _ptr = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("linear.c"), {"hk_linear": [_ptr, _ptr, _ptr, _ptr, _c_long, _c_long, _c_long]})


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`linear` in PyTorch: ``F.linear``, on any device and dtype, with autograd."""
    return F.linear(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; with at most ``dispatch.MAX_ROWS`` rows on CPU, through the C kernel.

    Args:
        x: (..., in).
        weight: (out, in).
        bias: (out,) or None.

    Returns:
        (..., out).
    """
    # Only a 2-D weight whose width is x's, and a bias of one value per output, go to C (it reads exactly those
    # sizes); F.linear takes anything else and raises PyTorch's own error where the shapes do not fit.
    shape = x.shape
    if weight.dim() == 2 and len(shape) > 0 and shape[-1] == weight.shape[1] > 0:
        n_out, n_in = weight.shape
        rows = x.numel() // n_in
        if bias is None or bias.shape == (n_out,):
            library = dispatch.kernel(LIBRARY, x, weight, *(() if bias is None else (bias,)), rows=rows)
            if library is not None:
                y = x.new_empty(*shape[:-1], n_out)
                library.hk_linear(x.data_ptr(), weight.data_ptr(), native.ptr(bias), y.data_ptr(), rows, n_in, n_out)
                return y
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and checkpoints) with the decoding kernel of :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return linear(x, self.weight, self.bias)
