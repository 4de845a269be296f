"""The SSD selective SSM's decoding step, projections included, as one C call on CPU (``ssm_step.c``).

:meth:`hydra_kit.components.ssm.SelectiveSSM.step` in PyTorch is about 30 small ops per token (the causal conv at
one position, dt, the decay, the state update, the read-out, the gated norm), each costing 5-10 us of fixed
overhead on our CPUs, plus the two projections; this kernel does them in one pass. The PyTorch step is the reference it is tested against
(``tests/components/test_ssm.py``). Built on first use by :mod:`hydra_kit.nn.native`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "SSMStepWeights", "pack_ssm_step_weights", "ssm_step_cpu"]

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("ssm_step.c"), {"hk_ssm_step": [_p, _p, _p, _f] + [_p] * 6 + [_l]})


@dataclass(frozen=True)
class SSMStepWeights:
    """What the kernel reads on every token besides the token and the state, packed once per set of weights.

    Attributes:
        tensors: in_weight (d_inner + conv_dim + H, D), out_weight (D, d_inner), conv_weight (conv_dim, 1, d_conv),
            conv_bias (conv_dim,), dt_bias, a_log, d_skip (H,), norm_weight (d_inner,), detached: they hold the
            storage the addresses point into.
        addresses: their data pointers, in that order.
        dims: d_inner, conv_dim, H, P, N, groups, d_conv, norm groups (the gated RMSNorm's), D.
    """

    tensors: tuple[Tensor, ...]
    addresses: ctypes.Array[ctypes.c_void_p]
    dims: ctypes.Array[ctypes.c_long]


def pack_ssm_step_weights(
    in_weight: Tensor, out_weight: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, a_log: Tensor,
    d_skip: Tensor, norm_weight: Tensor, *, headdim: int, d_state: int, groups: int,
) -> SSMStepWeights:  # fmt: skip
    """Pack the SSM's parameters for :func:`ssm_step_cpu` (cache the result: it is rebuilt only when they move)."""
    # Detached views hold the storages the addresses point into, whatever later happens to the Parameters.
    tensors = tuple(t.detach() for t in (in_weight, out_weight, conv_weight, conv_bias, dt_bias, a_log, d_skip, norm_weight))
    d_inner, heads = out_weight.shape[1], dt_bias.shape[0]
    dims = (d_inner, conv_weight.shape[0], heads, headdim, d_state, groups, conv_weight.shape[-1], groups, out_weight.shape[0])
    return SSMStepWeights(tensors, native.addresses(tensors), (ctypes.c_long * len(dims))(*dims))


def ssm_step_cpu(u: Tensor, conv_state: Tensor, ssm_state: Tensor, weights: SSMStepWeights, eps: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """One SSD step, or None when the kernel cannot take these tensors.

    Args:
        u: (B, D) one token per sequence.
        conv_state: (B, d_conv - 1, conv_dim) last inputs of the causal conv.
        ssm_state: (B, H, P, N).
        weights: the packed parameters; the caller has checked that each is contiguous float32 on the CPU
            (:class:`hydra_kit.nn.native.CachedParameters`). Only the token and the state are checked here.
        eps: of the gated RMSNorm.

    Returns:
        the update (B, D), the new conv state and the new SSM state (fresh tensors; the inputs are not modified).
    """
    if not native.usable(u, conv_state, ssm_state):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    batch, heads, headdim, _ = ssm_state.shape
    conv_dim, d_inner = conv_state.shape[2], heads * headdim
    out = u.new_empty(batch, u.shape[1])
    conv_out, ssm_out = torch.empty_like(conv_state), torch.empty_like(ssm_state)
    scratch = u.new_empty(2 * (d_inner + conv_dim) + heads)  # projection, gated output, conv output
    library.hk_ssm_step(
        u.data_ptr(), weights.addresses, weights.dims, eps, conv_state.data_ptr(), ssm_state.data_ptr(), out.data_ptr(),
        conv_out.data_ptr(), ssm_out.data_ptr(), scratch.data_ptr(), batch,
    )  # fmt: skip
    return out, conv_out, ssm_out
