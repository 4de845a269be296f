"""The token router's gates and global score for a few tokens as one C call on CPU (``router_step.c``).

Used by :meth:`hydra_kit.components.router.TokenRouter.route` when the caller wants no losses (decoding);
:func:`router_step_reference` is the same in PyTorch ops, the reference the kernel is tested against (as is the
router's own PyTorch path). Built on first use by
:mod:`hydra_kit.ops.native`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "RouterStepWeights", "router_step_cpu", "router_step_reference"]

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("router_step.c"), {"hk_router_step": [_p] * 6 + [_l] * 3 + [_f]})


@dataclass(frozen=True)
class RouterStepWeights:
    """The router's weights as the kernel reads them, checked once (cache it; constructing it runs the checks).

    Attributes:
        gate_weight: (G, D); gate_bias: (G,); score_weight: (1, D). Detached: the shapes the checks saw stay.
        n_gates, d_model: G, D.
        suits: whether every tensor is contiguous float32 on the CPU (else the kernel never runs).
    """

    gate_weight: Tensor
    gate_bias: Tensor
    score_weight: Tensor
    n_gates: int = field(init=False)
    d_model: int = field(init=False)
    suits: bool = field(init=False)

    def __post_init__(self) -> None:
        gate_weight, gate_bias, score_weight = (t.detach() for t in (self.gate_weight, self.gate_bias, self.score_weight))
        if gate_weight.dim() != 2:
            raise ValueError(f"router_step: gate_weight has shape {tuple(gate_weight.shape)}, expected (G, D)")
        n_gates, d_model = gate_weight.shape
        dispatch.expect_shape("router_step", "gate_bias", gate_bias, (n_gates,))
        dispatch.expect_shape("router_step", "score_weight", score_weight, (1, d_model))
        fields = {
            "gate_weight": gate_weight, "gate_bias": gate_bias, "score_weight": score_weight, "n_gates": n_gates,
            "d_model": d_model, "suits": dispatch.suits(gate_weight, gate_bias, score_weight),
        }  # fmt: skip
        for name, value in fields.items():
            object.__setattr__(self, name, value)


def router_step_cpu(u: Tensor, weights: RouterStepWeights, temperature: float) -> tuple[Tensor, Tensor] | None:
    """Gates (..., G) and score (...) of tokens u (..., D), or None when the kernel cannot take these tensors.

    Args:
        u: (..., D) normalised block inputs, at most ``dispatch.MAX_ROWS`` tokens.
        weights: the router's weights (:class:`RouterStepWeights`), which say whether they suit the kernel.
        temperature: tau of R2.

    Returns:
        None when the kernel cannot take the tensors (not contiguous float32 on the CPU, autograd on, more than
        ``dispatch.MAX_ROWS`` tokens); tokens of another width than the weights' raise a ValueError.
    """
    d_model = weights.d_model
    rows = u.numel() // d_model if d_model else 0
    library = dispatch.kernel(LIBRARY, u, rows=rows, weights_suit=weights.suits)
    if library is None:
        return None
    if u.dim() == 0 or u.shape[-1] != d_model:
        raise ValueError(f"router_step: tokens {tuple(u.shape)} for weights of width {d_model}: expected (..., {d_model})")
    n_gates = weights.n_gates
    gates, score = u.new_empty(*u.shape[:-1], n_gates), u.new_empty(u.shape[:-1])
    library.hk_router_step(
        u.data_ptr(), weights.gate_weight.data_ptr(), weights.gate_bias.data_ptr(), weights.score_weight.data_ptr(),
        gates.data_ptr(), score.data_ptr(), rows, d_model, n_gates, temperature,
    )  # fmt: skip
    return gates, score


def router_step_reference(u: Tensor, weights: RouterStepWeights, temperature: float) -> tuple[Tensor, Tensor]:
    """:func:`router_step_cpu` in PyTorch ops (what the router's ``route`` computes): gates (..., G), score (...)."""
    gates = torch.sigmoid(F.linear(u, weights.gate_weight, weights.gate_bias) / temperature)
    return gates, F.linear(u, weights.score_weight).squeeze(-1)
