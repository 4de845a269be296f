"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864), shared by dense and sparse attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
