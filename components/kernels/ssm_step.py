"""The SSD selective SSM's decoding step between its projections as one C call on CPU (``ssm_step.c``).

:meth:`hydra_kit.components.ssm.SelectiveSSM.step` in PyTorch is about 30 small ops per token (the causal conv at
one position, dt, the decay, the state update, the read-out, the gated norm), each costing 5-10 us of fixed
overhead on our CPUs; this kernel does them in one pass. The PyTorch step is the reference it is tested against
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
LIBRARY = native.NativeLibrary(Path(__file__).with_name("ssm_step.c"), {"hk_ssm_step": [_p] * 9 + [_f] + [_p] * 4 + [_l] * 9})


def ssm_step_cpu(
    proj: Tensor,
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
) -> tuple[Tensor, Tensor, Tensor] | None:
    """One SSD step after the input projection, or None when the kernel cannot take these tensors.

    Args:
        proj: (B, d_inner + conv_dim + H) the input projection of one token (z, x B C, dt).
        conv_state: (B, d_conv - 1, conv_dim) last inputs of the causal conv.
        ssm_state: (B, H, P, N).
        conv_weight: (conv_dim, d_conv); conv_bias (conv_dim,); dt_bias, a_log, d_skip: (H,).
        norm_weight: (d_inner,) gain of the gated RMSNorm (normalised per group of d_inner / groups channels).

    Returns:
        the gated, normalised output (B, d_inner) for the output projection, the new conv state and the new SSM
        state (fresh tensors; the inputs are not modified).
    """
    tensors = (proj, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, a_log, d_skip, norm_weight)
    if not native.usable(*tensors):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    batch, heads, headdim, _ = ssm_state.shape
    conv_dim, d_conv = conv_weight.shape
    out = proj.new_empty(batch, d_inner)
    conv_out, ssm_out = torch.empty_like(conv_state), torch.empty_like(ssm_state)
    scratch = proj.new_empty(conv_dim)
    library.hk_ssm_step(
        *(t.data_ptr() for t in (proj, conv_state, conv_weight, conv_bias, dt_bias, a_log, d_skip, ssm_state, norm_weight)),
        eps,
        *(t.data_ptr() for t in (out, conv_out, ssm_out, scratch)),
        batch, d_inner, conv_dim, heads, headdim, d_state, groups, d_conv, groups,
    )
    return out, conv_out, ssm_out
