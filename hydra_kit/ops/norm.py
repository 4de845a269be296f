"""RMSNorm and the SwiGLU feed-forward used by the MLP and by every expert of the MoE."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.nn import native
from hydra_kit.nn.decode_linear import Linear


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


# Past a few rows F.rms_norm's fixed cost no longer matters.
MAX_KERNEL_ROWS = 8
_NORM_LIBRARY = native.NativeLibrary(
    Path(__file__).with_name("decode_norm.c"),
    {"hk_rms_norm": [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]},
)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``F.rms_norm`` over the last dimension of x (..., dim) with gain weight (dim,); a C loop for a few rows."""
    dim = x.shape[-1] if x.dim() else 0
    # Only a gain of exactly (dim,) goes to C, which reads dim values of it; F.rms_norm raises for any other.
    if dim and weight is not None and weight.shape == (dim,):
        rows = x.numel() // dim
        if 0 < rows <= MAX_KERNEL_ROWS and native.usable(x, weight):
            library = _NORM_LIBRARY.load()
            if library is not None:
                y = torch.empty_like(x)
                library.hk_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, dim, eps)
                return y
    return F.rms_norm(x, (dim,), weight, eps)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward, ``W_down(silu(W_gate x) * W_up x)`` (Shazeer 2020, arXiv 2002.05202).

    Gate and up projections share one matrix so a single matmul computes both.

    Args:
        d_model: input and output width.
        d_hidden: hidden width.
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.d_hidden = d_hidden
        self.gate_up = Linear(d_model, 2 * d_hidden, bias=False)
        self.down = Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor, row_scale: Tensor | None = None) -> Tensor:
        """(..., d_model) -> (..., d_model); ``row_scale`` (..., 1) multiplies each row's output.

        The scale is applied to the hidden activation, where the tensor is narrowest (``down`` is linear, so
        the result is the same): a mixture of experts weights its outputs this way for free.
        """
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        if row_scale is not None:
            hidden = hidden * row_scale
        return self.down(hidden)
