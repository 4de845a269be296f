"""The SwiGLU feed-forward used by the dense MLP and by every expert of the MoE (its products are :mod:`.linear`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.ops.linear import Linear

__all__ = ["SwiGLU"]


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
