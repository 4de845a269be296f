"""The RMSNorm op: ``F.rms_norm``, with a C loop (``norm.c``) for the few rows of a decoding step, and its layer."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "RMSNorm", "rms_norm", "rms_norm_reference"]

LIBRARY = native.NativeLibrary(
    Path(__file__).with_name("norm.c"), {"hk_rms_norm": [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]}
)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`rms_norm` in PyTorch: ``F.rms_norm`` over the last dimension, any device, dtype and autograd."""
    return F.rms_norm(x, (x.shape[-1] if x.dim() else 0,), weight, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``F.rms_norm`` over the last dimension of x (..., dim) with gain weight (dim,); a C loop for a few rows."""
    dim = x.shape[-1] if x.dim() else 0
    # Only a gain of exactly (dim,) goes to C, which reads dim values of it; F.rms_norm raises for any other.
    if dim and weight is not None and weight.shape == (dim,):
        rows = x.numel() // dim
        library = dispatch.kernel(LIBRARY, x, weight, rows=rows)
        if library is not None:
            y = torch.empty_like(x)
            library.hk_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, dim, eps)
            return y
    return F.rms_norm(x, (dim,), weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain (Zhang & Sennrich 2019, arXiv 1910.07467).

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., dim)
        return rms_norm(x, self.weight, self.eps)
