"""The attention of a decoding step: one query per sequence and head against sets of cached keys, in C on CPU.

Dense attention decoding one token reads its whole key/value cache; sparse global attention reads its window, the
new token and its globals. ``decode_attention.c`` streams each set's keys once and values once (scores, a
vectorised softmax, the weighted sum), with no copy of the cache into one tensor and no per-set launch; its threads
split a head-major cache (dense attention's) by heads and a key-major one (SGA's) by tiles of keys, and read it
faster than PyTorch's single-query ``scaled_dot_product_attention`` (``docs/benchmarks.md``). Both models use this same kernel when
it can run, so the comparison stays like for like; otherwise :func:`decode_attention` computes the same in
PyTorch (:func:`decode_attention_reference`, the reference the tests hold the kernel to).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hydra_kit.ops import dispatch, native

__all__ = ["LIBRARY", "decode_attention", "decode_attention_reference"]

_f, _l, _p = ctypes.c_float, ctypes.c_long, ctypes.c_void_p
LIBRARY = native.NativeLibrary(
    Path(__file__).with_name("decode_attention.c"),
    {
        "hk_attention_by_head": [_p, _p, _p, _l, _l, _l, _f, _l, _p, _l],
        "hk_attention_by_key": [_p, _p, _p, _l, _l, _l, _f, _l, _p, _l, _l],
    },
)

KeySet = tuple[Tensor, Tensor, Tensor | None]
MIN_TILE, MAX_TILE = 64, 2048


def decode_attention_reference(q: Tensor, sets: Sequence[KeySet], scale: float) -> Tensor:
    """:func:`decode_attention` in PyTorch ops: any device, dtype and autograd (a head that sees no key gets NaN)."""
    logits = []
    for keys, _, mask in sets:
        scores = torch.einsum("bhd,bhnd->bhn", q, keys) * scale  # (B, H, n)
        logits.append(scores if mask is None else scores.masked_fill(~mask[:, None], float("-inf")))
    probs = torch.cat(logits, -1).softmax(-1).split([k.shape[2] for k, _, _ in sets], -1)
    return sum((torch.einsum("bhn,bhnd->bhd", p, v) for p, (_, v, _) in zip(probs, sets, strict=True)), q.new_zeros(q.shape))


def decode_attention(q: Tensor, sets: Sequence[KeySet], scale: float) -> Tensor:
    """softmax(scale * q k^T) v over the visible keys of all sets: the C kernel where it can run, else PyTorch.

    Args:
        q: (B, H, hd) one query per sequence and head.
        sets: (keys, values, mask) triples. keys and values: (B, H, n, hd) views with the same strides and a
            contiguous last dimension (e.g. a transposed (B, n, H, hd) buffer, or a slice of a preallocated
            cache); mask: (B, n) bool of visible keys, or None when all are.
        scale: multiplies the scores (usually hd ** -0.5).

    Returns:
        (B, H, hd); the kernel gives zeros for a (sequence, head) that sees no key.
    """
    if not sets:
        raise ValueError(f"decode_attention: no key sets for the query of shape {tuple(q.shape)}")
    q = q.contiguous()  # a view of a fused q/k/v tensor when a batch decodes
    library = dispatch.kernel(LIBRARY, q) if q.dim() == 3 else None
    fields: list[int] = []  # per set, as decode_attention.c reads it (SET_FIELDS): addresses, length, strides, mask
    head_major = True
    for keys, values, mask in sets:
        # C reads each set through its strides, for q's batch, heads and width: anything else is the reference's
        # (which raises where the shapes do not fit).
        stride = keys.stride()
        if library is None or not (
            keys.dtype is torch.float32 and keys.is_cpu and keys.dim() == 4 and stride[3] == 1 and keys.shape == values.shape
            and keys.shape[:2] == q.shape[:2] and keys.shape[3] == q.shape[2]
            and values.dtype is torch.float32 and values.is_cpu and values.stride() == stride
            and (mask is None or (
                mask.dtype is torch.bool and mask.is_cpu and mask.is_contiguous() and mask.shape == (keys.shape[0], keys.shape[2])
            ))
        ):  # fmt: skip
            return decode_attention_reference(q, sets, scale)
        head_major = head_major and stride[1] >= stride[2]
        fields += (keys.data_ptr(), values.data_ptr(), keys.shape[2], *stride[:3], 0 if mask is None else mask.data_ptr())
    assert library is not None
    batch, heads, head_dim = q.shape
    total = sum(k.shape[2] for k, _, _ in sets)
    layout = (ctypes.c_int64 * len(fields))(*fields)
    out = q.new_empty(batch, heads, head_dim)
    if head_major:  # each thread streams whole heads
        scores = q.new_empty(max(1, batch * heads * total))
        library.hk_attention_by_head(q.data_ptr(), out.data_ptr(), scores.data_ptr(), batch, heads, head_dim, scale, len(sets), layout, total)
        return out
    # Key-major: tiles of keys. About eight per sequence keep both threads busy; longer ones cost nothing.
    tile = min(MAX_TILE, max(MIN_TILE, -(-total // 8)))
    tiles = sum(-(-k.shape[2] // tile) for k, _, _ in sets)  # work items per sequence
    scratch = q.new_empty(max(1, batch * tiles * heads * (2 + head_dim + tile)))  # per item: maxima, sums, outputs, scores
    library.hk_attention_by_key(q.data_ptr(), out.data_ptr(), scratch.data_ptr(), batch, heads, head_dim, scale, len(sets), layout, tile, tiles)
    return out
