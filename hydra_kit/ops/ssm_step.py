"""The SSD selective SSM's decoding step, projections included, as one C call on CPU (``ssm_step.c``).

:meth:`hydra_kit.components.ssm.SelectiveSSM.step` in PyTorch is about 30 small ops per token (the causal conv at
one position, dt, the decay, the state update, the read-out, the gated norm), each costing 5-10 us of fixed
overhead on our CPUs, plus the two projections; this kernel does them in one pass. :func:`ssm_step_reference` is
the same step in PyTorch ops, the reference it is tested against (as is the component's own step). Built on first use by :mod:`hydra_kit.ops.native`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "SSMStepWeights", "pack_ssm_step_weights", "ssm_step_cpu", "ssm_step_reference"]

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
_ARGUMENTS: list[type] = [_p, _p, _p, _f, *[_p] * 6, _l]  # token, weights, dims, eps; states, outputs, scratch; batch
LIBRARY = native.NativeLibrary(Path(__file__).with_name("ssm_step.c"), {"hk_ssm_step": _ARGUMENTS})


@dataclass(frozen=True)
class SSMStepWeights:
    """What the kernel reads on every token besides the token and the state, checked and packed once.

    Build it with :func:`pack_ssm_step_weights` (constructing it directly runs the same checks).

    Attributes:
        tensors: in_weight (d_inner + conv_dim + H, D), out_weight (D, d_inner), conv_weight (conv_dim, 1, d_conv),
            conv_bias (conv_dim,), dt_bias, a_log, d_skip (H,), norm_weight (d_inner,), detached: they hold the
            storage the addresses point into, and the shapes the dimensions were read from.
        headdim, d_state, groups: P, N and the groups of heads sharing B and C (and the gated RMSNorm's groups).
        addresses: their data pointers, in that order.
        dims: d_inner, conv_dim, H, P, N, groups, d_conv, norm groups, D.
        suits: whether every tensor is contiguous float32 on the CPU (else the kernel never runs).
    """

    tensors: tuple[Tensor, ...]
    headdim: int
    d_state: int
    groups: int
    addresses: ctypes.Array[ctypes.c_void_p] = field(init=False, repr=False)
    dims: ctypes.Array[ctypes.c_long] = field(init=False, repr=False)
    suits: bool = field(init=False)
    d_model: int = field(init=False)
    conv_state_shape: tuple[int, int] = field(init=False)  # (d_conv - 1, conv_dim) of each sequence
    ssm_state_shape: tuple[int, int, int] = field(init=False)  # (H, P, N) of each sequence

    def __post_init__(self) -> None:
        tensors = tuple(t.detach() for t in self.tensors)
        if len(tensors) != 8:
            raise ValueError(f"ssm_step: {len(tensors)} tensors, expected 8 (see SSMStepWeights)")
        out_weight, conv_weight, dt_bias = tensors[1], tensors[2], tensors[4]
        headdim, d_state, groups = self.headdim, self.d_state, self.groups
        if out_weight.dim() != 2 or dt_bias.dim() != 1 or conv_weight.dim() != 3 or min(headdim, d_state, groups) < 1:
            raise ValueError(
                f"ssm_step: expected out_weight (D, d_inner), dt_bias (H,), conv_weight (conv_dim, 1, d_conv) and positive "
                f"headdim, d_state, groups; got {tuple(out_weight.shape)}, {tuple(dt_bias.shape)}, {tuple(conv_weight.shape)}, "
                f"{headdim}, {d_state}, {groups}"
            )
        (d_model, d_inner), heads = out_weight.shape, dt_bias.shape[0]
        conv_dim, d_conv = conv_weight.shape[0], conv_weight.shape[-1]
        if heads < 1 or d_inner != heads * headdim or heads % groups or conv_dim != d_inner + 2 * groups * d_state or d_conv < 1:
            raise ValueError(
                f"ssm_step: d_inner {d_inner}, {heads} heads of {headdim}, {groups} groups, d_state {d_state}, conv width "
                f"{conv_dim} and d_conv {d_conv} do not fit (d_inner = H P, conv_dim = d_inner + 2 groups N, groups | H)"
            )
        names = ("in_weight", "out_weight", "conv_weight", "conv_bias", "dt_bias", "a_log", "d_skip", "norm_weight")
        shapes = (
            (d_inner + conv_dim + heads, d_model), (d_model, d_inner), (conv_dim, 1, d_conv), (conv_dim,),
            (heads,), (heads,), (heads,), (d_inner,),
        )  # fmt: skip
        for name, t, shape in zip(names, tensors, shapes, strict=True):
            dispatch.expect_shape("ssm_step", name, t, shape)
        dims = (d_inner, conv_dim, heads, headdim, d_state, groups, d_conv, groups, d_model)
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "addresses", native.addresses(tensors))
        object.__setattr__(self, "dims", (ctypes.c_long * len(dims))(*dims))
        object.__setattr__(self, "suits", dispatch.suits(*tensors))
        object.__setattr__(self, "d_model", d_model)
        object.__setattr__(self, "conv_state_shape", (d_conv - 1, conv_dim))
        object.__setattr__(self, "ssm_state_shape", (heads, headdim, d_state))


def pack_ssm_step_weights(
    in_weight: Tensor, out_weight: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, a_log: Tensor,
    d_skip: Tensor, norm_weight: Tensor, *, headdim: int, d_state: int, groups: int,
) -> SSMStepWeights:  # fmt: skip
    """Check and pack the SSM's parameters for :func:`ssm_step_cpu` (cache the result: it is rebuilt only when they
    change); raises a ValueError naming the tensor when the shapes do not fit together."""
    tensors = (in_weight, out_weight, conv_weight, conv_bias, dt_bias, a_log, d_skip, norm_weight)
    return SSMStepWeights(tensors, headdim, d_state, groups)


def ssm_step_cpu(u: Tensor, conv_state: Tensor, ssm_state: Tensor, weights: SSMStepWeights, eps: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """One SSD step, or None when the kernel cannot take these tensors.

    Args:
        u: (B, D) one token per sequence.
        conv_state: (B, d_conv - 1, conv_dim) last inputs of the causal conv.
        ssm_state: (B, H, P, N).
        weights: the packed parameters (:func:`pack_ssm_step_weights`), which say whether they suit the kernel.
        eps: of the gated RMSNorm.

    Returns:
        the update (B, D), the new conv state and the new SSM state (fresh tensors; the inputs are not modified).
        None when the kernel cannot take the tensors (not contiguous float32 on the CPU, autograd on); a token or
        state whose shape does not fit the weights raises a ValueError.
    """
    library = dispatch.kernel(LIBRARY, u, conv_state, ssm_state, weights_suit=weights.suits)
    if library is None:
        return None
    batch = u.shape[0] if u.dim() == 2 else -1
    if (
        u.dim() != 2 or u.shape[1] != weights.d_model or conv_state.shape[1:] != weights.conv_state_shape
        or ssm_state.shape[1:] != weights.ssm_state_shape or conv_state.shape[0] != batch or ssm_state.shape[0] != batch
    ):  # fmt: skip
        raise ValueError(
            f"ssm_step: token {tuple(u.shape)}, conv state {tuple(conv_state.shape)} and SSM state {tuple(ssm_state.shape)} "
            f"do not fit the weights: expected (B, {weights.d_model}), (B, *{weights.conv_state_shape}), (B, *{weights.ssm_state_shape})"
        )
    heads, headdim, _ = weights.ssm_state_shape
    conv_dim, d_inner = weights.conv_state_shape[1], heads * headdim
    out = u.new_empty(batch, weights.d_model)
    conv_out, ssm_out = torch.empty_like(conv_state), torch.empty_like(ssm_state)
    scratch = u.new_empty(2 * (d_inner + conv_dim) + heads)  # projection, gated output, conv output
    library.hk_ssm_step(
        u.data_ptr(), weights.addresses, weights.dims, eps, conv_state.data_ptr(), ssm_state.data_ptr(), out.data_ptr(),
        conv_out.data_ptr(), ssm_out.data_ptr(), scratch.data_ptr(), batch,
    )  # fmt: skip
    return out, conv_out, ssm_out


def ssm_step_reference(u: Tensor, conv_state: Tensor, ssm_state: Tensor, weights: SSMStepWeights, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`ssm_step_cpu` in PyTorch ops (any device and dtype): the update (B, D) and the new conv and SSM states."""
    in_weight, out_weight, conv_weight, conv_bias, dt_bias, a_log, d_skip, norm_weight = weights.tensors
    heads, headdim, d_state = weights.ssm_state_shape
    groups, conv_dim, d_inner, batch = weights.groups, weights.conv_state_shape[1], heads * headdim, u.shape[0]
    z, xbc, dt = F.linear(u, in_weight).split([d_inner, conv_dim, heads], dim=-1)
    window = torch.cat([conv_state, xbc[:, None]], dim=1)  # (B, d_conv, conv_dim)
    xbc = F.silu((window * conv_weight[:, 0].t()).sum(1) + conv_bias)  # the causal conv at the last position
    xs, B, C = xbc.split([d_inner, groups * d_state, groups * d_state], dim=-1)
    dt = F.softplus(dt + dt_bias)  # (B, H)
    decay = torch.exp(dt * -a_log.exp())  # (B, H)
    per_group = heads // groups
    x_h = xs.view(batch, groups, per_group, headdim, 1)
    ssm = ssm_state.view(batch, groups, per_group, headdim, d_state) * decay.view(batch, groups, per_group, 1, 1)
    ssm = ssm + x_h * dt.view(batch, groups, per_group, 1, 1) * B.view(batch, groups, 1, 1, d_state)  # + dt x B^T
    y = (ssm @ C.view(batch, groups, 1, d_state, 1)).view(batch, heads, headdim)  # C s
    y = (y + x_h.view(batch, heads, headdim) * d_skip[:, None]).flatten(1)  # + D x: (B, d_inner)
    gated = (y * F.silu(z)).unflatten(-1, (groups, d_inner // groups))  # the gated RMSNorm, one per group
    normed = F.rms_norm(gated, (d_inner // groups,), eps=eps).flatten(-2) * norm_weight
    return F.linear(normed, out_weight), window[:, 1:].clone(), ssm.reshape(ssm_state.shape)
