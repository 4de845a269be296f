"""The workspace memory's multi-hop read of one token per sequence as one C call on CPU (``workspace_step.c``).

:meth:`hydra_kit.components.workspace.WorkspaceMemory.step` in PyTorch is the query product, then per hop an
attention over the slots, a product and an addition, then the output product: about ten ops of fixed cost each
for about a megabyte of weights. The kernel does the same; :func:`workspace_read_reference` is the same read in
PyTorch ops, the reference it is tested against (as is the component's own step). Built on first use by :mod:`hydra_kit.ops.native`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "WorkspaceReadWeights", "workspace_read_cpu", "workspace_read_reference"]

_l, _p = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("workspace_step.c"), {"hk_workspace_read": [_p] * 7 + [_l] * 5})


@dataclass(frozen=True)
class WorkspaceReadWeights:
    """The read's weights as the kernel reads them, checked once (cache it; constructing it runs the checks).

    Attributes:
        query_weight: (Ds, D); hop_weight: (Ds, Ds); out_weight: (D, Ds) (no biases). Detached: the shapes the
            checks saw stay.
        d_model, d_slot: D, Ds.
        suits: whether every tensor is contiguous float32 on the CPU (else the kernel never runs).
    """

    query_weight: Tensor
    hop_weight: Tensor
    out_weight: Tensor
    d_model: int = field(init=False)
    d_slot: int = field(init=False)
    suits: bool = field(init=False)

    def __post_init__(self) -> None:
        query_weight, hop_weight, out_weight = (t.detach() for t in (self.query_weight, self.hop_weight, self.out_weight))
        if query_weight.dim() != 2:
            raise ValueError(f"workspace_read: query_weight has shape {tuple(query_weight.shape)}, expected (Ds, D)")
        d_slot, d_model = query_weight.shape
        dispatch.expect_shape("workspace_read", "hop_weight", hop_weight, (d_slot, d_slot))
        dispatch.expect_shape("workspace_read", "out_weight", out_weight, (d_model, d_slot))
        fields = {
            "query_weight": query_weight, "hop_weight": hop_weight, "out_weight": out_weight, "d_model": d_model,
            "d_slot": d_slot, "suits": dispatch.suits(query_weight, hop_weight, out_weight),
        }  # fmt: skip
        for name, value in fields.items():
            object.__setattr__(self, name, value)


def workspace_read_cpu(x_t: Tensor, read_kv: Tensor, weights: WorkspaceReadWeights, hops: int) -> Tensor | None:
    """The read's update (B, D) of tokens x_t (B, D), or None when the kernel cannot take these tensors.

    Args:
        x_t: (B, D) one token per sequence.
        read_kv: (B, S, 2 Ds) the slots' read keys then values.
        weights: the read's weights (:class:`WorkspaceReadWeights`), which say whether they suit the kernel.
        hops: read iterations.

    Returns:
        None when the kernel cannot take the tensors (not contiguous float32 on the CPU, autograd on, no slot or
        no hop); a token or slots whose shapes do not fit the weights raise a ValueError.
    """
    library = dispatch.kernel(LIBRARY, x_t, read_kv, weights_suit=weights.suits)
    if library is None:
        return None
    d_model, d_slot = weights.d_model, weights.d_slot
    if x_t.dim() != 2 or x_t.shape[1] != d_model or read_kv.dim() != 3 or read_kv.shape[0] != x_t.shape[0] or read_kv.shape[2] != 2 * d_slot:
        raise ValueError(
            f"workspace_read: token {tuple(x_t.shape)} and slots {tuple(read_kv.shape)} do not fit the weights: "
            f"expected (B, {d_model}) and (B, S, {2 * d_slot})"
        )
    n_slots = read_kv.shape[1]
    if n_slots < 1 or hops < 1:
        return None
    batch = x_t.shape[0]
    out = x_t.new_empty(batch, d_model)
    scratch = x_t.new_empty(2 * d_slot + n_slots)
    library.hk_workspace_read(
        x_t.data_ptr(), weights.query_weight.data_ptr(), read_kv.data_ptr(), weights.hop_weight.data_ptr(),
        weights.out_weight.data_ptr(), out.data_ptr(), scratch.data_ptr(), batch, d_model, d_slot, n_slots, hops,
    )  # fmt: skip
    return out


def workspace_read_reference(x_t: Tensor, read_kv: Tensor, weights: WorkspaceReadWeights, hops: int) -> Tensor:
    """:func:`workspace_read_cpu` in PyTorch ops: the update (B, D) of x_t (B, D) reading slots read_kv (B, S, 2 Ds)."""
    keys, values = read_kv.chunk(2, dim=-1)  # (B, S, Ds) each
    query = F.linear(x_t, weights.query_weight)  # (B, Ds)
    read = query
    for _ in range(hops):
        attention = torch.softmax((keys @ query[..., None]).squeeze(-1) * weights.d_slot**-0.5, dim=-1)  # (B, S)
        read = (attention[..., None] * values).sum(1)  # (B, Ds)
        query = query + F.linear(read, weights.hop_weight)
    return F.linear(read, weights.out_weight)
