"""The chunked SSD scan's pass across chunks: each chunk's entering state, in one C pass forward and backward.

Per sequence and head, with scalars per chunk (``in``, ``decay``, ``out``; (B, C, H)) and states per head,

    S_0 = initial,    starts[k] = S_k * out[k],    S_{k+1} = S_k * decay[k] + local[k] * in[k],    final = S_C.

The SSD scan (:func:`hydra_kit.ops.scan.ssd_chunked_scan`) builds each chunk's own end state ``local`` with the
decay factored out, and reads each entering state scaled back: ``in`` and ``out`` are those factors. As PyTorch
ops the pass is a loop over chunks of small ops, a stack and two scalings of every state, each a pass over
memory; ``chunk_carry.c`` streams each head's states through once, and its backward is one reverse pass.
:func:`chunk_carry_reference` is the same in PyTorch ops: what runs on other devices and dtypes, under
torch.compile or without a C compiler, and what the tests hold the kernel to, values and gradients.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "carry_states", "chunk_carry", "chunk_carry_reference"]

_DIMS: list[type] = [ctypes.c_long] * 6  # B, C, G, N, Hg, P
_FORWARD: list[type] = [ctypes.c_void_p] * 7  # local, in, decay, out, initial; starts, final
_BACKWARD: list[type] = [ctypes.c_void_p] * 13  # the five inputs, the two output gradients, six gradients, scratch
LIBRARY = native.NativeLibrary(
    Path(__file__).with_name("chunk_carry.c"),
    {"hk_chunk_carry_forward": _FORWARD + _DIMS, "hk_chunk_carry_backward": _BACKWARD + _DIMS},
)


def carry_states(local: Tensor, decay: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """Pass states across chunks in PyTorch: S_in[k+1] = decay[k] * S_in[k] + local[k], S_in[0] = initial.

    Any state shape: the diagonal scan's (b, c, D) states use it directly, the SSD scan through
    :func:`chunk_carry_reference`.

    Args:
        local: (b, c, *S) state each chunk builds from its own inputs, at its end.
        decay: (b, c, *S-broadcastable) total decay of each chunk.
        initial: (b, *S) state before the first chunk.

    Returns:
        starts: (b, c, *S) state entering each chunk; final: (b, *S) state after the last chunk.
    """
    # A loop over chunks (not time steps) on small tensors; unbind keeps its backward linear in the chunk count.
    state, starts = initial, []
    for loc, dec in zip(local.unbind(1), decay.unbind(1), strict=True):
        starts.append(state)
        state = state * dec + loc
    return torch.stack(starts, dim=1), state


def chunk_carry_reference(local: Tensor, scale_in: Tensor, decay: Tensor, scale_out: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`chunk_carry` in PyTorch ops: any device, dtype and autograd."""
    b, c, g, _, hg, _ = local.shape
    heads = (b, c, g, 1, hg, 1)  # a (B, C, H) scalar broadcast over its head's state
    starts, final = carry_states(local * scale_in.view(heads), decay.view(heads), initial)
    return starts * scale_out.view(heads), final


class _ChunkCarry(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: Tensor, scale_in: Tensor, decay: Tensor, scale_out: Tensor, initial: Tensor, library: ctypes.CDLL) -> tuple[Tensor, Tensor]:
        starts, final = torch.empty_like(local), torch.empty_like(initial)
        ptrs = (t.data_ptr() for t in (local, scale_in, decay, scale_out, initial, starts, final))
        library.hk_chunk_carry_forward(*ptrs, *local.shape)
        ctx.save_for_backward(local, scale_in, decay, scale_out, initial)
        ctx.library = library
        return starts, final

    @staticmethod
    def backward(ctx: Any, g_starts: Tensor, g_final: Tensor) -> tuple[Tensor | None, ...]:
        local, scale_in, decay, scale_out, initial = ctx.saved_tensors
        g_starts, g_final = g_starts.contiguous(), g_final.contiguous()
        g_local, g_initial, states = torch.empty_like(local), torch.empty_like(initial), torch.empty_like(local)
        g_in, g_decay, g_out = torch.empty_like(scale_in), torch.empty_like(decay), torch.empty_like(scale_out)
        tensors = (local, scale_in, decay, scale_out, initial, g_starts, g_final, g_local, g_initial, g_in, g_decay, g_out, states)
        ctx.library.hk_chunk_carry_backward(*(t.data_ptr() for t in tensors), *local.shape)
        return g_local, g_in, g_decay, g_out, g_initial, None


def chunk_carry(local: Tensor, scale_in: Tensor, decay: Tensor, scale_out: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """The states entering each chunk, scaled, and the state after the last chunk.

    Args:
        local: (B, C, G, N, Hg, P) each chunk's own end state (head h = g * Hg + hg), before ``scale_in``.
        scale_in: (B, C, H) factor on each chunk's ``local``.
        decay: (B, C, H) total decay of each chunk.
        scale_out: (B, C, H) factor on each entering state as returned.
        initial: (B, G, N, Hg, P) state before the first chunk.

    Returns:
        starts: (B, C, G, N, Hg, P) the state entering each chunk times ``scale_out``; final: (B, G, N, Hg, P).
    """
    if local.dim() != 6:
        raise ValueError(f"chunk_carry: local must be (B, C, G, N, Hg, P), got shape {tuple(local.shape)}")
    b, c, g, n, hg, p = local.shape
    for name, tensor in (("scale_in", scale_in), ("decay", decay), ("scale_out", scale_out)):
        dispatch.expect_shape("chunk_carry", name, tensor, (b, c, g * hg))
    dispatch.expect_shape("chunk_carry", "initial", initial, (b, g, n, hg, p))
    if local.numel():
        library = dispatch.kernel(LIBRARY, local, scale_in, decay, scale_out, initial, differentiable=True)
        if library is not None:
            return _ChunkCarry.apply(local, scale_in, decay, scale_out, initial, library)
    return chunk_carry_reference(local, scale_in, decay, scale_out, initial)
