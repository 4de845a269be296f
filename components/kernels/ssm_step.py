"""The SSD selective SSM's decoding step, projections included, as one C call on CPU (``ssm_step.c``).

:meth:`hydra_kit.components.ssm.SelectiveSSM.step` in PyTorch is about 30 small ops per token (the causal conv at
one position, dt, the decay, the state update, the read-out, the gated norm), each costing 5-10 us of fixed
overhead on our CPUs, plus the two projections; this kernel does them in one pass. The PyTorch step is the reference it is tested against
(``tests/components/test_ssm.py``). Built on first use by :mod:`hydra_kit.nn.native`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "ssm_step_cpu"]

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("ssm_step.c"), {"hk_ssm_step": [_p] * 13 + [_f] + [_p] * 4 + [_l] * 10})


def ssm_step_cpu(
    u: Tensor,
    in_weight: Tensor,
    out_weight: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor,
    dt_bias: Tensor,
    a_log: Tensor,
    d_skip: Tensor,
    norm_weight: Tensor,
    eps: float,
    *,
    d_inner: int,
    groups: int,
    d_state: int,
    weights_checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """One SSD step, or None when the kernel cannot take these tensors.

    Args:
        u: (B, D) one token per sequence.
        in_weight: (d_inner + conv_dim + H, D) the input projection (to z, x B C, dt); out_weight: (D, d_inner).
        conv_state: (B, d_conv - 1, conv_dim) last inputs of the causal conv.
        ssm_state: (B, H, P, N).
        conv_weight: (conv_dim, 1, d_conv), the depthwise Conv1d weight; conv_bias (conv_dim,); dt_bias, a_log, d_skip: (H,).
        norm_weight: (d_inner,) gain of the gated RMSNorm (normalised per group of d_inner / groups channels).
        weights_checked: the caller has checked that every parameter is contiguous float32 on the CPU
            (:class:`hydra_kit.nn.native.CachedParameters`); only the token and the state are checked here.

    Returns:
        the update (B, D), the new conv state and the new SSM state (fresh tensors; the inputs are not modified).
    """
    checked = (u, conv_state, ssm_state) if weights_checked else (u, in_weight, out_weight, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, a_log, d_skip, norm_weight)
    if not native.usable(*checked):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    batch, heads, headdim, _ = ssm_state.shape
    conv_dim, d_conv = conv_weight.shape[0], conv_weight.shape[-1]
    d_model = u.shape[1]
    out = u.new_empty(batch, d_model)
    conv_out, ssm_out = torch.empty_like(conv_state), torch.empty_like(ssm_state)
    scratch = u.new_empty(2 * (d_inner + conv_dim) + heads)  # projection, gated output, conv output
    proj, gated, act = scratch.split([d_inner + conv_dim + heads, d_inner, conv_dim])
    library.hk_ssm_step(
        u.data_ptr(), in_weight.data_ptr(), out_weight.data_ptr(), proj.data_ptr(), gated.data_ptr(),
        conv_state.data_ptr(), conv_weight.data_ptr(), conv_bias.data_ptr(), dt_bias.data_ptr(), a_log.data_ptr(),
        d_skip.data_ptr(), ssm_state.data_ptr(), norm_weight.data_ptr(), eps, out.data_ptr(), conv_out.data_ptr(),
        ssm_out.data_ptr(), act.data_ptr(), batch, d_inner, conv_dim, heads, headdim, d_state, groups, d_conv, groups,
        d_model,
    )  # fmt: skip
    return out, conv_out, ssm_out
