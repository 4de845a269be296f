"""The workspace memory's multi-hop read of one token per sequence as one C call on CPU (``workspace_step.c``).

:meth:`hydra_kit.components.workspace.WorkspaceMemory.step` in PyTorch is the query product, then per hop an
attention over the slots, a product and an addition, then the output product: about ten ops of fixed cost each
for about a megabyte of weights. The kernel does the same; the PyTorch step is the reference it is tested against
(``tests/kernels/test_native_decode.py``). Built on first use by :mod:`hydra_kit.nn.native`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from torch import Tensor

from hydra_kit.nn import native

__all__ = ["LIBRARY", "workspace_read_cpu"]

_l, _p = ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(Path(__file__).with_name("workspace_step.c"), {"hk_workspace_read": [_p] * 7 + [_l] * 5})


def workspace_read_cpu(
    x_t: Tensor, query_weight: Tensor, read_kv: Tensor, hop_weight: Tensor, out_weight: Tensor, hops: int, weights_checked: bool = False
) -> Tensor | None:
    """The read's update (B, D) of tokens x_t (B, D), or None when the kernel cannot take these tensors.

    Args:
        x_t: (B, D) one token per sequence.
        query_weight: (Ds, D); hop_weight: (Ds, Ds); out_weight: (D, Ds) (no biases).
        read_kv: (B, S, 2 Ds) the slots' read keys then values.
        hops: read iterations.
        weights_checked: the caller has checked that the weights are contiguous float32 on the CPU
            (:class:`hydra_kit.nn.native.CachedParameters`); only x_t and read_kv are checked here.
    """
    if not native.usable(x_t, read_kv, *(() if weights_checked else (query_weight, hop_weight, out_weight))):
        return None
    library = LIBRARY.load()
    if library is None:
        return None
    batch, d_model = x_t.shape
    n_slots, d_slot = read_kv.shape[1], query_weight.shape[0]
    out = x_t.new_empty(batch, d_model)
    scratch = x_t.new_empty(2 * d_slot + n_slots)
    library.hk_workspace_read(
        x_t.data_ptr(), query_weight.data_ptr(), read_kv.data_ptr(), hop_weight.data_ptr(), out_weight.data_ptr(),
        out.data_ptr(), scratch.data_ptr(), batch, d_model, d_slot, n_slots, hops,
    )  # fmt: skip
    return out
