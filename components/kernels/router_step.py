"""The token router's gates and global score for a few tokens as one C call on CPU (``router_step.c``).

Used by :meth:`hydra_kit.components.router.TokenRouter.route` when the caller wants no losses (decoding); its
PyTorch path is the reference (``tests/kernels/test_native_decode.py``). Built on first use by
:mod:`hydra_kit.nn.native`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "MAX_ROWS", "router_step_cpu"]

MAX_ROWS = 8  # past a few tokens the PyTorch ops' fixed cost no longer matters

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("router_step.c"), {"hk_router_step": [_p] * 6 + [_l] * 3 + [_f]})


def router_step_cpu(
    u: Tensor, gate_weight: Tensor, gate_bias: Tensor, score_weight: Tensor, temperature: float, weights_checked: bool = False
) -> tuple[Tensor, Tensor] | None:
    """Gates (..., G) and score (...) of tokens u (..., D), or None when the kernel cannot take these tensors.

    Args:
        u: (..., D) normalised block inputs, at most ``MAX_ROWS`` tokens.
        gate_weight: (G, D); gate_bias: (G,); score_weight: (1, D).
        temperature: tau of R2.
        weights_checked: the caller has checked that the weights are contiguous float32 on the CPU
            (:class:`hydra_kit.nn.native.CachedParameters`); only u is checked here.
    """
    d_model = u.shape[-1]
    rows = u.numel() // d_model
    if not 0 < rows <= MAX_ROWS or not native.usable(u, *(() if weights_checked else (gate_weight, gate_bias, score_weight))):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    n_gates = gate_weight.shape[0]
    gates, score = u.new_empty(*u.shape[:-1], n_gates), u.new_empty(u.shape[:-1])
    library.hk_router_step(
        u.data_ptr(), gate_weight.data_ptr(), gate_bias.data_ptr(), score_weight.data_ptr(), gates.data_ptr(),
        score.data_ptr(), rows, d_model, n_gates, temperature,
    )  # fmt: skip
    return gates, score
