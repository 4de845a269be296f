"""The causal depthwise convolution of the selective SSM, channels last, in PyTorch (docs/design.md 3.3)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["causal_depthwise_conv"]


def causal_depthwise_conv(padded: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Causal depthwise convolution as K shifted multiply-adds, channels last.

    Same result as ``F.conv1d(..., groups=channels)`` on the transposed input, but its backward runs at memory
    speed, where PyTorch's depthwise ``convolution_backward`` on CPU is many times slower (``docs/benchmarks.md``).

    Args:
        padded: (B, K - 1 + T, C) the previous K - 1 inputs followed by the T new ones.
        weight: (C, K) taps; tap K - 1 multiplies the current token.
        bias: (C,).
        offsets: (B, T) long, or None: each new token's distance from the start of its document
            (:func:`hydra_kit.ops.segments.document_offsets`); a tap that reaches back past it reads zero, so
            no token mixes with an earlier document's, as if the document started with a zero-padded state.

    Returns:
        (B, T, C).
    """
    taps = weight.shape[1]
    length = padded.shape[1] - (taps - 1)
    y = torch.addcmul(bias, padded[:, taps - 1 :], weight[:, taps - 1])
    for k in range(taps - 1):
        shifted = padded[:, k : k + length]
        if offsets is not None:
            # Tap k reads the token taps - 1 - k steps back. A dense mask, not a recomputation of the few rows near
            # a start: it costs about as much on CPU and needs no host sync to find the rows on a GPU.
            shifted = shifted * (offsets >= taps - 1 - k)[..., None].to(shifted.dtype)
        y = torch.addcmul(y, shifted, weight[:, k])
    return y
