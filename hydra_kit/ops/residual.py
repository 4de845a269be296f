"""The gated residual sum of a tri-path block for a decoding step, as one C call on CPU (``residual.c``).

:func:`gated_residual_reference` is the same sum in PyTorch ops, the reference the kernel is tested against.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "ResidualPlan", "gated_residual", "gated_residual_reference"]

_l, _p = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("residual.c"), {"hk_gated_residual": [_p, _p, _l, _l, _l, _p, _p, _l, _p, _p]})


class ResidualPlan:
    """Which gate column scales each update, and each update's LayerScale g, packed once for the kernel.

    Args:
        columns: per update, its column in the router's gates, or None for an ungated component.
        scales: per update, its LayerScale parameter (0-dim).
    """

    def __init__(self, columns: Sequence[int | None], scales: Sequence[Tensor]) -> None:
        if len(columns) != len(scales):
            raise ValueError(f"ResidualPlan: {len(columns)} gate columns for {len(scales)} LayerScales")
        if any(c is not None and c < 0 for c in columns):
            raise ValueError(f"ResidualPlan: gate columns must be None or >= 0, got {list(columns)}")
        self.columns = tuple(columns)
        self.scales = tuple(scales)
        self.gates_needed = 1 + max((c for c in columns if c is not None), default=-1)  # the gates' width must reach it
        # Detached views hold the storages the addresses point into (see hydra_kit.ops.native.addresses).
        held = tuple(s.detach() for s in scales)
        self.suits = all(s.dtype is torch.float32 and s.is_cpu and s.numel() == 1 for s in held)
        self._held = held
        self.scale_addresses = native.addresses(held)
        self.column_array = (ctypes.c_long * len(columns))(*(-1 if c is None else c for c in columns))
        self.gated = any(c is not None for c in columns)
        self.update_array = ctypes.c_int64 * len(columns)


def gated_residual(x: Tensor, updates: Sequence[Tensor], gates: Tensor | None, plan: ResidualPlan) -> Tensor:
    """``x + sum_c g_c * r[:, column_c] * update_c`` for x (B, D), updates (B, D) and gates (B, G) (or None).

    Args:
        x: (B, D) the block input.
        updates: the components' updates, in the order of ``plan``.
        gates: (B, G) the router's gates, needed when any plan column is not None.
        plan: the columns and LayerScales (:class:`ResidualPlan`).
    """
    if len(updates) != len(plan.columns) or (plan.gated and gates is None):
        raise ValueError(f"gated_residual: {len(updates)} updates for a plan of {len(plan.columns)} (gated: {plan.gated}, gates given: {gates is not None})")
    if gates is not None and plan.gated and (gates.dim() != 2 or gates.shape[-1] < plan.gates_needed):
        raise ValueError(f"gated_residual: gates of shape {tuple(gates.shape)} for a plan reading gate column {plan.gates_needed - 1}")
    batch = x.shape[0] if x.dim() == 2 else 0
    # C reads B x D floats of x and of every update, and B x G of the gates: other shapes take the PyTorch sum.
    if plan.suits and _fit(x, updates, gates, plan):
        library = dispatch.kernel(LIBRARY, x, *updates, *((gates,) if plan.gated and gates is not None else ()), rows=batch)
        if library is not None:
            y = torch.empty_like(x)
            library.hk_gated_residual(
                x.data_ptr(), y.data_ptr(), batch, x.shape[1], len(updates), plan.update_array(*(u.data_ptr() for u in updates)),
                gates.data_ptr() if plan.gated and gates is not None else None, 0 if gates is None else gates.shape[-1],
                plan.column_array, plan.scale_addresses,
            )  # fmt: skip
            return y
    return gated_residual_reference(x, updates, gates, plan)


def gated_residual_reference(x: Tensor, updates: Sequence[Tensor], gates: Tensor | None, plan: ResidualPlan) -> Tensor:
    """:func:`gated_residual` in PyTorch ops: any device, dtype and autograd."""
    y = x
    for update, column, scale in zip(updates, plan.columns, plan.scales, strict=True):
        if column is not None:
            assert gates is not None
            scale = gates[:, column : column + 1] * scale  # (B, 1): g_c * r_t^c
        y = torch.addcmul(y, update, scale)
    return y


def _fit(x: Tensor, updates: Sequence[Tensor], gates: Tensor | None, plan: ResidualPlan) -> bool:
    shape = x.shape
    for update in updates:
        if update.shape != shape:
            return False
    return not plan.gated or (gates is not None and gates.shape[0] == shape[0])
