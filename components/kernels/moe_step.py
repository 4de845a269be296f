"""One token through the mixture of experts, routing included, as one C call on CPU (``moe_step.c``).

The single-sequence path of :meth:`hydra_kit.components.moe.MixtureOfExperts.step` in PyTorch is the router
product, softmax, top-k, a host sync to pick the experts, and per expert two products and three element-wise ops:
about 15 ops of 5-10 us fixed cost each, for about 40 us of weights to read. The kernel does all of it in one call;
the PyTorch path is the reference it is tested against (``tests/components/test_moe.py``). Built on first use by
:mod:`hydra_kit.nn.native`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "MAX_TOP_K", "moe_step_cpu"]

MAX_TOP_K = 64  # the kernel keeps the picks' weights on its stack

_l, _p = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("moe_step.c"), {"hk_moe_step": [_p] * 7 + [_l] * 4})


def moe_step_cpu(
    x_t: Tensor,
    router_weight: Tensor,
    gate_up: Sequence[Tensor],
    down: Sequence[Tensor],
    top_k: int,
    weights_checked: bool = False,
    expert_addresses: tuple[ctypes.Array[ctypes.c_void_p], ctypes.Array[ctypes.c_void_p]] | None = None,
) -> tuple[Tensor, Tensor] | None:
    """The MoE update of one token, or None when the kernel cannot take these tensors.

    Args:
        x_t: (1, D) one token of one sequence.
        router_weight: (E, D).
        gate_up: E weights (2F, D) (gate rows first, then up rows, as :class:`hydra_kit.nn.SwiGLU` stores them).
        down: E weights (D, F).
        top_k: experts per token.
        weights_checked: the caller has checked that every weight is contiguous float32 on the CPU
            (:class:`hydra_kit.nn.native.CachedParameters`); only x_t is checked here.
        expert_addresses: ``native.addresses`` of gate_up and of down, when the caller caches them.

    Returns:
        the update (1, D) and the chosen experts (k,) long, in decreasing probability.
    """
    weights = () if weights_checked else (router_weight, *gate_up, *down)
    if x_t.shape[0] != 1 or top_k > MAX_TOP_K or not native.usable(x_t, *weights):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    n_experts, d_model = router_weight.shape
    hidden = down[0].shape[1]
    y = x_t.new_empty(1, d_model)
    chosen = torch.empty(top_k, dtype=torch.long)
    scratch = x_t.new_empty(n_experts + top_k * hidden)  # probabilities, the picks' hidden units
    gate_up_at, down_at = expert_addresses or (native.addresses(gate_up), native.addresses(down))
    library.hk_moe_step(
        x_t.data_ptr(), router_weight.data_ptr(), gate_up_at, down_at, y.data_ptr(), chosen.data_ptr(),
        scratch.data_ptr(), n_experts, d_model, hidden, top_k,
    )  # fmt: skip
    return y, chosen
