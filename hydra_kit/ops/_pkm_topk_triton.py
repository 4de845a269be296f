"""The Triton kernel of the product-key top-k; imported only by :mod:`.pkm_topk`, on first use.

This module imports triton at its top on purpose: whether ``@triton.jit`` builds a compiled or an interpreted
function (``TRITON_INTERPRET=1``) is decided when the decorator runs, so the decorator must run at the first
launch, not when ``hydra_kit.components`` is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["launch_pkm_topk"]

BLOCK_T = 16  # tokens per program: tl.dot needs every block dimension >= 16


@triton.jit
def _pkm_topk_fwd_kernel(
    q_ptr,  # (T, H, dk) queries, contiguous
    keys_ptr,  # (H, 2, n, dk/2) sub-keys, contiguous
    rows_ptr,  # (P,) int32 candidate positions in the first half's sorted list
    cols_ptr,  # (P,) int32 ... and in the second half's
    best_ptr,  # (T, H, 2, BLOCK_K) float32 scratch: sorted per-half top-k scores
    best_idx_ptr,  # (T, H, 2, BLOCK_K) int32 scratch: their sub-key indices
    scores_ptr,  # (T, H, k) float32 output, decreasing
    slots_ptr,  # (T, H, k) int64 output, slot = i1 * n + i2
    n_tokens,
    HEADS: tl.constexpr,
    N_KEYS: tl.constexpr,
    HALF: tl.constexpr,
    TOP_K: tl.constexpr,
    N_CAND: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    tok_ok = tok < n_tokens
    key = tl.arange(0, BLOCK_N)
    dim = tl.arange(0, BLOCK_D)
    # int64 offsets: T * H * dk overflows int32 at long contexts times batch.
    tok64 = tok.to(tl.int64)
    scratch = (tok64 * HEADS + head) * 2 * BLOCK_K  # (BT,) start of this (token, head) in the scratch

    # Stage 1, per half: (BT, d/2) @ (d/2, n) scores, then the k best by repeated arg-max. The (BT, n) score tile
    # lives only in registers; its top-k goes to a small scratch that stage 2 reads back.
    for half in tl.static_range(2):
        q = tl.load(
            q_ptr + (tok64[:, None] * HEADS + head) * (2 * HALF) + half * HALF + dim[None, :],
            mask=tok_ok[:, None] & (dim[None, :] < HALF),
            other=0.0,
        ).to(tl.float32)  # (BT, BD)
        k = tl.load(
            keys_ptr + ((head * 2 + half) * N_KEYS + key[:, None]) * HALF + dim[None, :],
            mask=(key[:, None] < N_KEYS) & (dim[None, :] < HALF),
            other=0.0,
        ).to(tl.float32)  # (BN, BD)
        # ieee, not tf32: the selected set must match the float32 PyTorch path, not just come close to it.
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BT, BN)
        s = tl.where(key[None, :] < N_KEYS, s, float("-inf"))
        for i in range(TOP_K):
            j = tl.argmax(s, axis=1)  # (BT,) first index of the maximum
            m = tl.max(s, axis=1)
            tl.store(best_ptr + scratch + half * BLOCK_K + i, m, mask=tok_ok)
            tl.store(best_idx_ptr + scratch + half * BLOCK_K + i, j.to(tl.int32), mask=tok_ok)
            s = tl.where(key[None, :] == j[:, None], float("-inf"), s)
    tl.debug_barrier()  # stage 2 reads what other threads of this program wrote

    # Stage 2: only the pairs (a, b) with (a + 1)(b + 1) <= k of the two sorted lists can enter the product top-k
    # (see hydra_kit.ops.pkm_topk.candidate_pairs): score those, and take their k best the same way.
    p = tl.arange(0, BLOCK_P)
    p_ok = p < N_CAND
    ra = tl.load(rows_ptr + p, mask=p_ok, other=0)
    cb = tl.load(cols_ptr + p, mask=p_ok, other=0)
    both = tok_ok[:, None] & p_ok[None, :]
    cand = tl.load(best_ptr + scratch[:, None] + ra[None, :], mask=both, other=0.0) + tl.load(
        best_ptr + scratch[:, None] + BLOCK_K + cb[None, :], mask=both, other=0.0
    )  # (BT, BP)
    cand = tl.where(p_ok[None, :], cand, float("-inf"))
    out = tok64 * HEADS * TOP_K + head * TOP_K  # (BT,)
    for i in range(TOP_K):
        j = tl.argmax(cand, axis=1)  # (BT,)
        m = tl.max(cand, axis=1)
        a = tl.load(rows_ptr + j, mask=tok_ok, other=0)
        b = tl.load(cols_ptr + j, mask=tok_ok, other=0)
        i1 = tl.load(best_idx_ptr + scratch + a, mask=tok_ok, other=0).to(tl.int64)
        i2 = tl.load(best_idx_ptr + scratch + BLOCK_K + b, mask=tok_ok, other=0).to(tl.int64)
        tl.store(scores_ptr + out + i, m, mask=tok_ok)
        tl.store(slots_ptr + out + i, i1 * N_KEYS + i2, mask=tok_ok)
        cand = tl.where(p[None, :] == j[:, None], float("-inf"), cand)


def launch_pkm_topk(q: Tensor, sub_keys: Tensor, rows: Tensor, cols: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Run the kernel on contiguous tensors.

    Args:
        q: (T, H, dk) contiguous queries.
        sub_keys: (H, 2, n, dk/2) contiguous sub-keys.
        rows, cols: (P,) int32 candidate positions on q's device.
        top_k: k.

    Returns:
        scores: (T, H, k) float32, decreasing; slots: (T, H, k) int64.
    """
    n_tokens, heads = q.shape[:2]
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    block_k = triton.next_power_of_2(top_k)
    best = q.new_empty(n_tokens, heads, 2, block_k, dtype=torch.float32)
    best_idx = q.new_empty(n_tokens, heads, 2, block_k, dtype=torch.int32)
    scores = q.new_empty(n_tokens, heads, top_k, dtype=torch.float32)
    slots = q.new_empty(n_tokens, heads, top_k, dtype=torch.int64)
    grid = (triton.cdiv(n_tokens, BLOCK_T), heads)
    _pkm_topk_fwd_kernel[grid](
        q,
        sub_keys,
        rows,
        cols,
        best,
        best_idx,
        scores,
        slots,
        n_tokens,
        HEADS=heads,
        N_KEYS=n_keys,
        HALF=half,
        TOP_K=top_k,
        N_CAND=rows.numel(),
        BLOCK_T=BLOCK_T,
        BLOCK_N=max(16, triton.next_power_of_2(n_keys)),
        BLOCK_D=max(16, triton.next_power_of_2(half)),
        BLOCK_K=block_k,
        BLOCK_P=max(16, triton.next_power_of_2(rows.numel())),
    )
    return scores, slots
