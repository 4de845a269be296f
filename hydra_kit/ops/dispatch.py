"""The one policy that decides, per call, whether an op runs its C kernel or its PyTorch reference.

Every op in :mod:`hydra_kit.ops` that has a C kernel asks :func:`kernel` before calling it, so the rule lives here
and nowhere else:

1. the C tier is switched on (:func:`hydra_kit.ops.native.set_enabled`, on by default), and torch.compile is not
   tracing the call (a compiled graph fuses the PyTorch path itself, and cannot trace a C call);
2. autograd is off, unless the op has a backward of its own (:mod:`.ssm_mix`: an autograd function whose
   backward is C too); the decoding kernels have none, so training takes their PyTorch paths;
3. every tensor the kernel reads is contiguous float32 on the CPU (its only layout), or, for the tensors a kernel
   reads row by row with strides, float32 on the CPU with contiguous channels (:func:`suits_rows`);
4. the call has at most :data:`MAX_ROWS` rows, for the ops whose PyTorch path wins on more rows;
5. the library was built and loaded (:class:`hydra_kit.ops.native.NativeLibrary`; without a C compiler it never is).

Anything else runs the PyTorch path, which computes the same thing. Arguments that do not fit together are not a
policy matter: each wrapper raises for them, naming the op and the argument (:func:`expect_shape`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from hydra_kit.ops import native

__all__ = ["MAX_ROWS", "expect_shape", "kernel", "suits", "suits_rows", "usable"]

# Rows (tokens) per call up to which the row-limited kernels run. Past a handful of rows a product is no longer
# bound by reading its weight, and the fixed cost of a few PyTorch ops no longer matters: MKL and PyTorch win.
MAX_ROWS = 8


def suits(*tensors: Tensor) -> bool:
    """Whether every tensor is contiguous float32 on the CPU: the only layout a kernel reads."""
    for t in tensors:  # a plain loop: this check runs on every decoding step, for every tensor a kernel reads
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def suits_rows(*tensors: Tensor) -> bool:
    """Whether every tensor is float32 on the CPU, 3-D (B, T, C) with contiguous channels: read row by row with strides."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu or t.dim() != 3 or (t.shape[2] > 1 and t.stride(2) != 1):
            return False
        if t.stride(0) < 0 or t.stride(1) < 0:
            return False
    return True


def usable(*tensors: Tensor) -> bool:
    """Whether a kernel may take these tensors: C tier on, autograd off, all contiguous float32 on the CPU.

    Only the layout: each wrapper also checks that the shapes fit together before it calls C.
    """
    return native.enabled() and not torch.is_grad_enabled() and suits(*tensors)


def kernel(
    library: native.NativeLibrary,
    *tensors: Tensor,
    rows: int | None = None,
    weights_suit: bool = True,
    strided: Sequence[Tensor] = (),
    differentiable: bool = False,
) -> ctypes.CDLL | None:
    """The loaded library when its kernel may take this call, else None (the caller then runs its PyTorch path).

    Args:
        library: the op's C library.
        tensors: the per-call tensors the kernel reads (tokens, states, weights not packed beforehand).
        rows: tokens in the call, for an op whose kernel only pays for few rows (at most :data:`MAX_ROWS`);
            None for an op whose kernel takes any number.
        weights_suit: whether the weights packed beforehand suit the kernel (their layout is checked once, when
            they are packed: :class:`hydra_kit.ops.packed.PackedWeights`).
        strided: the tensors the kernel reads row by row with strides (:func:`suits_rows`).
        differentiable: the op has a backward of its own, so the kernel may run under autograd.
    """
    if not weights_suit or (rows is not None and not 0 < rows <= MAX_ROWS):
        return None
    if not native.enabled() or torch.compiler.is_compiling() or (torch.is_grad_enabled() and not differentiable):
        return None
    if not suits(*tensors) or not suits_rows(*strided):
        return None
    return library.load()


def expect_shape(op: str, name: str, t: Tensor, shape: Sequence[int]) -> None:
    """Raise a ValueError naming the op, the argument and both shapes unless ``t`` has exactly ``shape``."""
    if t.shape != tuple(shape):  # torch.Size is a tuple
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
