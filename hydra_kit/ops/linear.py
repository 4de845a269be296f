"""``nn.Linear`` whose few-row products on CPU (one-token decoding) run as a streaming C kernel.

A decoding step multiplies one row per sequence by every weight matrix, so its speed is the speed of reading the
weights from memory: MKL's matrix-vector product reads an (out, in) weight at 9-10 GB/s on our 2-core CPUs, the
two-thread dot-product loop of ``decode_linear.c`` at 34-42 GB/s (:mod:`hydra_kit.nn.native`). Everything else (more
rows, autograd, other dtypes or devices, kernels switched off or unbuildable) is ``F.linear``, unchanged.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.nn import native

__all__ = ["MAX_KERNEL_ROWS", "Linear", "linear"]

# Past a handful of rows the product is no longer bound by reading the weight, and MKL's matrix product wins.
MAX_KERNEL_ROWS = 8

_c_long, _ptr = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(
    Path(__file__).with_name("decode_linear.c"), {"hk_linear": [_ptr, _ptr, _ptr, _ptr, _c_long, _c_long, _c_long]}
)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; with at most ``MAX_KERNEL_ROWS`` rows on CPU, through the C kernel.

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
        if 0 < rows <= MAX_KERNEL_ROWS and (bias is None or bias.shape == (n_out,)):
            if native.usable(x, weight, *(() if bias is None else (bias,))):
                library = LIBRARY.load()
                if library is not None:
                    y = x.new_empty(*shape[:-1], n_out)
                    library.hk_linear(x.data_ptr(), weight.data_ptr(), native.ptr(bias), y.data_ptr(), rows, n_in, n_out)
                    return y
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and checkpoints) with the decoding kernel of :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return linear(x, self.weight, self.bias)
