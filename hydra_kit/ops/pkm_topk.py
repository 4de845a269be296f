"""Product-key scoring and top-k as one Triton kernel, with a PyTorch backward (docs/design.md 3.7).

The PyTorch path of :class:`hydra_kit.components.pkm.ProductKeyMemory` runs two sub-key score matmuls, two
``topk`` calls, a gather of the ~k ln k candidate pairs and a third ``topk``: six launches and (T, H, n_keys)
score tensors written to and read back from memory. The kernel does all of it per (block of 16 tokens, head)
in registers and writes only the k scores and slot indices.

The backward needs no kernel: the score of a selected slot is q1 . K1[i1] + q2 . K2[i2], linear in the query
and the two sub-keys, so its gradient is a scatter of the incoming gradient into (T, H, 2, n_keys) followed by
two dense matmuls, the same work as the PyTorch path's backward. The selection itself is piecewise constant
and has no gradient, as with ``torch.topk``.

:func:`product_topk` (with :func:`candidate_pairs`) is the PyTorch reference the kernel is tested against, and the
path every device runs without triton. Triton is imported on first use only; :func:`triton_unavailable_reason`
says why the kernel cannot run here.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch
from torch import Tensor

__all__ = ["INSTALL_HINT", "candidate_pairs", "pkm_topk_triton", "product_topk", "triton_installed", "triton_unavailable_reason"]

INSTALL_HINT = "pip install 'hydra-kit[kernels]' (or: pip install triton)"


def candidate_pairs(top_k: int) -> tuple[Tensor, Tensor]:
    """Positions (a, b) in the two sorted per-half top-k lists that can belong to the product top-k.

    With both lists sorted in decreasing order, every pair (a', b') with a' <= a and b' <= b scores at least as
    high as (a, b), so (a, b) ranks no better than (a + 1) * (b + 1) and only pairs with (a + 1)(b + 1) <= k
    can enter the top-k (ties broken by position). That is about k ln k candidates instead of k^2 (119 instead
    of 1024 at k = 32), with the same exact result.

    Returns:
        rows, cols: (P,) long positions in the first and second list.
    """
    pairs = [(a, b) for a in range(top_k) for b in range(top_k) if (a + 1) * (b + 1) <= top_k]
    rows, cols = zip(*pairs, strict=True)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def product_topk(scores1: Tensor, scores2: Tensor, top_k: int, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Exact top-k over all sub-key pairs, from the two half-score tables.

    Args:
        scores1, scores2: (..., n_keys) scores of each query half against its sub-key table.
        top_k: k, at most n_keys.
        rows, cols: (P,) candidate positions from :func:`candidate_pairs` (all k x k pairs also work).

    Returns:
        scores: (..., k) full-key scores, decreasing.
        slots: (..., k) long slot indices, slot = i1 * n_keys + i2.
    """
    n_keys = scores1.shape[-1]
    best1, idx1 = scores1.topk(top_k, dim=-1)  # (..., k) each, sorted decreasing
    best2, idx2 = scores2.topk(top_k, dim=-1)
    candidates = best1[..., rows] + best2[..., cols]  # (..., P)
    scores, pos = candidates.topk(top_k, dim=-1)  # (..., k)
    slots = idx1.gather(-1, rows[pos]) * n_keys + idx2.gather(-1, cols[pos])  # (..., k)
    return scores, slots


def triton_installed() -> bool:
    """Whether the triton package is installed, found without importing it (importing it takes about a second)."""
    return importlib.util.find_spec("triton") is not None


def _triton_interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), as triton itself reads it."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases have no public switch to read
    return bool(knobs is not None and knobs.runtime.interpret)


def triton_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the Triton kernels cannot run, in words, or None when they can.

    Args:
        device: the device the tensors live on; None asks whether a CUDA device is visible at all.
    """
    if not triton_installed():
        return f"triton is not installed; install it with {INSTALL_HINT}"
    try:
        interpreting = _triton_interpreting()
    except ImportError as err:  # installed but broken (for instance built for another Python)
        return f"triton is installed but fails to import ({err}); reinstall it with {INSTALL_HINT}"
    if interpreting:
        return None  # the interpreter runs kernels on CPU tensors (slowly): this is how CI tests them
    if device is None:
        if not torch.cuda.is_available():
            return (
                f"no CUDA GPU is visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); Triton kernels "
                "need one (TRITON_INTERPRET=1 runs them on CPU in triton's slow interpreter, for tests only)"
            )
        return None
    if device.type != "cuda":
        return (
            f"the tensors are on {device.type}, and Triton kernels run on CUDA devices (TRITON_INTERPRET=1 runs "
            "them on CPU in triton's slow interpreter, for tests only)"
        )
    return None


class _PKMTopK(torch.autograd.Function):
    """Fused forward from the kernel; backward by scatter and matmuls from the selected indices."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, sub_keys: Tensor, rows: Tensor, cols: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        kernel = importlib.import_module("hydra_kit.ops._pkm_topk_triton")
        scores, slots = kernel.launch_pkm_topk(q, sub_keys, rows, cols, top_k)  # (T, H, k) each
        ctx.save_for_backward(q, sub_keys, slots)
        ctx.mark_non_differentiable(slots)
        return scores.to(q.dtype), slots

    @staticmethod
    def backward(ctx: Any, grad_scores: Tensor, grad_slots: Tensor | None) -> tuple[Tensor | None, ...]:
        q, sub_keys, slots = ctx.saved_tensors
        n_tokens, heads, d_key = q.shape
        n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
        # Gradient on the per-half score tables: slot s = i1 * n + i2 received grad g, so score1[i1] and
        # score2[i2] each receive g (summed when several selected slots share a sub-key).
        grad_tables = grad_scores.new_zeros(n_tokens, heads, 2, n_keys)  # (T, H, 2, n)
        grad_tables[:, :, 0].scatter_add_(-1, slots // n_keys, grad_scores)
        grad_tables[:, :, 1].scatter_add_(-1, slots % n_keys, grad_scores)
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.einsum("thjn,hjnd->thjd", grad_tables, sub_keys).reshape(n_tokens, heads, d_key)
        if ctx.needs_input_grad[1]:
            grad_keys = torch.einsum("thjn,thjd->hjnd", grad_tables, q.view(n_tokens, heads, 2, half))
        return grad_q, grad_keys, None, None, None


def pkm_topk_triton(q: Tensor, sub_keys: Tensor, top_k: int, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Exact top-k of the n_keys^2 product keys for every query, with the Triton kernel.

    Same result as scoring both halves and calling :func:`product_topk` (up to the order
    of exactly tied scores), differentiable in ``q`` and ``sub_keys``.

    Args:
        q: (..., H, dk) normalised queries, dk even.
        sub_keys: (H, 2, n_keys, dk / 2) sub-key tables of both halves.
        top_k: k, at most n_keys.
        rows, cols: (P,) candidate positions from :func:`candidate_pairs` (top_k).

    Returns:
        scores: (..., H, k) full-key scores in q's dtype, decreasing.
        slots: (..., H, k) long slot indices, slot = i1 * n_keys + i2.
    """
    heads, d_key = q.shape[-2:]
    if sub_keys.shape[0] != heads or sub_keys.shape[1] != 2 or 2 * sub_keys.shape[3] != d_key:
        raise ValueError(
            f"pkm_topk_triton: sub_keys must be (heads={heads}, 2, n_keys, d_key/2={d_key // 2}), "
            f"got {tuple(sub_keys.shape)}"
        )
    if not 0 < top_k <= sub_keys.shape[2]:
        raise ValueError(f"pkm_topk_triton: top_k must lie in [1, n_keys={sub_keys.shape[2]}], got {top_k}")
    reason = triton_unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"pkm_topk_triton cannot run: {reason}")
    lead = q.shape[:-2]
    flat = q.reshape(-1, heads, d_key)
    if flat.shape[0] == 0:  # no tokens (e.g. the router skipped them all): nothing to launch
        # Still built from q and sub_keys, so that backward gives zero gradients as the PyTorch path does.
        empty = torch.einsum("thd,hnd->thn", flat[..., : d_key // 2], sub_keys[:, 0])[..., :top_k]
        return empty.view(*lead, heads, top_k), empty.detach().long().view(*lead, heads, top_k)
    scores, slots = _PKMTopK.apply(
        flat.contiguous(), sub_keys.contiguous(), rows.to(torch.int32), cols.to(torch.int32), top_k
    )
    return scores.view(*lead, heads, top_k), slots.view(*lead, heads, top_k)
