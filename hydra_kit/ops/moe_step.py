"""One token through the mixture of experts, routing included, as one C call on CPU (``moe_step.c``).

The single-sequence path of :meth:`hydra_kit.components.moe.MixtureOfExperts.step` in PyTorch is the router
product, softmax, top-k, a host sync to pick the experts, and per expert two products and three element-wise ops:
about 15 ops of 5-10 us fixed cost each, for about 40 us of weights to read. The kernel does all of it in one call;
:func:`moe_step_reference` is the same in PyTorch ops, the reference it is tested against (as is the component's
own step). Built on first use by
:mod:`hydra_kit.ops.native`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "MAX_TOP_K", "MoEStepWeights", "moe_step_cpu", "moe_step_reference", "pack_moe_step_weights"]

MAX_TOP_K = 64  # the kernel keeps the picks' weights on its stack

_l, _p = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("moe_step.c"), {"hk_moe_step": [_p] * 7 + [_l] * 4})


@dataclass(frozen=True)
class MoEStepWeights:
    """The router and expert weights the kernel reads on every token, checked and packed once.

    Build it with :func:`pack_moe_step_weights` (constructing it directly runs the same checks).

    Attributes:
        router_weight: (E, D); gate_up: E weights (2F, D) (gate rows first, then up rows, as
            :class:`hydra_kit.ops.SwiGLU` stores them); down: E weights (D, F). Detached: they hold the storage the
            addresses point into, and the shapes the dimensions were read from.
        gate_up_addresses, down_addresses: the experts' data pointers.
        n_experts, d_model, hidden: E, D, F.
        suits: whether every tensor is contiguous float32 on the CPU (else the kernel never runs).
    """

    router_weight: Tensor
    gate_up: tuple[Tensor, ...]
    down: tuple[Tensor, ...]
    gate_up_addresses: ctypes.Array[ctypes.c_void_p] = field(init=False, repr=False)
    down_addresses: ctypes.Array[ctypes.c_void_p] = field(init=False, repr=False)
    n_experts: int = field(init=False)
    d_model: int = field(init=False)
    hidden: int = field(init=False)
    suits: bool = field(init=False)

    def __post_init__(self) -> None:
        router = self.router_weight.detach()
        gate_up, down = tuple(w.detach() for w in self.gate_up), tuple(w.detach() for w in self.down)
        if router.dim() != 2 or not gate_up or len(gate_up) != router.shape[0] or len(down) != router.shape[0] or down[0].dim() != 2:
            raise ValueError(
                f"moe_step: router weight {tuple(router.shape)} with {len(gate_up)} gate_up and {len(down)} down weights: "
                "expected (E, D) and E of each"
            )
        (n_experts, d_model), hidden = router.shape, down[0].shape[1]
        for e in range(n_experts):
            dispatch.expect_shape("moe_step", f"gate_up[{e}]", gate_up[e], (2 * hidden, d_model))
            dispatch.expect_shape("moe_step", f"down[{e}]", down[e], (d_model, hidden))
        fields = {
            "router_weight": router, "gate_up": gate_up, "down": down, "gate_up_addresses": native.addresses(gate_up),
            "down_addresses": native.addresses(down), "n_experts": n_experts, "d_model": d_model, "hidden": hidden,
            "suits": dispatch.suits(router, *gate_up, *down),
        }  # fmt: skip
        for name, value in fields.items():
            object.__setattr__(self, name, value)


def pack_moe_step_weights(router_weight: Tensor, gate_up: Sequence[Tensor], down: Sequence[Tensor]) -> MoEStepWeights:
    """Check and pack the MoE's weights for :func:`moe_step_cpu` (cache the result: it is rebuilt only when they
    change); raises a ValueError naming the weight when the shapes do not fit together."""
    return MoEStepWeights(router_weight, tuple(gate_up), tuple(down))


def moe_step_cpu(x_t: Tensor, weights: MoEStepWeights, top_k: int) -> tuple[Tensor, Tensor] | None:
    """The MoE update of one token, or None when the kernel cannot take these tensors.

    Args:
        x_t: (1, D) one token of one sequence.
        weights: the packed weights (:func:`pack_moe_step_weights`), which say whether they suit the kernel.
        top_k: experts per token, 1 to E.

    Returns:
        the update (1, D) and the chosen experts (k,) long, in decreasing probability. None when the kernel cannot
        take the tensors (not contiguous float32 on the CPU, autograd on, more than one sequence, top_k above
        ``MAX_TOP_K``); a token of another width, or a top_k outside 1..E, raises a ValueError.
    """
    library = dispatch.kernel(LIBRARY, x_t, weights_suit=weights.suits)
    if library is None:
        return None
    if x_t.dim() != 2 or x_t.shape[1] != weights.d_model or not 0 < top_k <= weights.n_experts:
        raise ValueError(
            f"moe_step: token {tuple(x_t.shape)} and top_k {top_k} for {weights.n_experts} experts of width "
            f"{weights.d_model}: expected (1, {weights.d_model}) and 1 <= top_k <= {weights.n_experts}"
        )
    if x_t.shape[0] != 1 or top_k > MAX_TOP_K:  # the kernel decodes one sequence; a batch takes the sorted dispatch
        return None
    n_experts, d_model, hidden = weights.n_experts, weights.d_model, weights.hidden
    y = x_t.new_empty(1, d_model)
    chosen = torch.empty(top_k, dtype=torch.long)
    scratch = x_t.new_empty(n_experts + top_k * hidden)  # probabilities, the picks' hidden units
    library.hk_moe_step(
        x_t.data_ptr(), weights.router_weight.data_ptr(), weights.gate_up_addresses, weights.down_addresses, y.data_ptr(),
        chosen.data_ptr(), scratch.data_ptr(), n_experts, d_model, hidden, top_k,
    )  # fmt: skip
    return y, chosen


def moe_step_reference(x_t: Tensor, weights: MoEStepWeights, top_k: int) -> tuple[Tensor, Tensor]:
    """:func:`moe_step_cpu` in PyTorch ops: the update (1, D) of one token x_t (1, D) and its experts (k,) long."""
    top_p, chosen = F.linear(x_t, weights.router_weight)[0].float().softmax(-1).topk(top_k)  # (k,) most probable first
    weight = (top_p / top_p.sum()).to(x_t.dtype)
    update = x_t.new_zeros(x_t.shape)
    for j, e in enumerate(chosen.tolist()):
        gate, up = F.linear(x_t, weights.gate_up[e]).chunk(2, dim=-1)  # (1, F) each
        update = update + F.linear(F.silu(gate) * up * weight[j], weights.down[e])
    return update, chosen
