"""Document boundaries inside a packed window: the masks every component derives from ``segment_ids``.

A packed training window holds several documents back to back. The data marks them with ``segment_ids`` (B, L):
ids matter only by change, so token t starts a new document when its id differs from token t - 1's. The first
token of a window starts nothing: it continues whatever came before it (with no carried state, nothing).

These helpers turn the ids into the few masks the components need; none of them builds anything of size L x L.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_segment_ids", "document_offsets", "document_starts", "same_document"]


def check_segment_ids(segment_ids: Tensor, batch: int, seq_len: int, where: str) -> None:
    """Raise ValueError, in one line naming ``where``, unless ``segment_ids`` is an integer (batch, seq_len) tensor."""
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool or segment_ids.dim() != 2:
        raise ValueError(f"{where}: segment_ids must be an integer (B, L) tensor, got {segment_ids.dtype} of shape {tuple(segment_ids.shape)}")
    if tuple(segment_ids.shape) != (batch, seq_len):
        raise ValueError(f"{where}: segment_ids has shape {tuple(segment_ids.shape)}, the input (B, L) = {(batch, seq_len)}")


def document_starts(segment_ids: Tensor) -> Tensor:
    """(B, L) bool: True where a token starts a new document (its id differs from the previous token's).

    Position 0 is always False: it continues what came before the window.

    Args:
        segment_ids: (B, L) integer document ids.
    """
    starts = torch.zeros(segment_ids.shape, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def document_offsets(starts: Tensor) -> Tensor:
    """(B, L) long: each token's distance from the start of its document (from position 0 for the first one).

    Token t may mix with token t - j (j >= 0) of the same document exactly when ``offsets[t] >= j``.

    Args:
        starts: (B, L) bool, from :func:`document_starts`.
    """
    pos = torch.arange(starts.shape[1], device=starts.device).expand(starts.shape)
    last_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # (B, L)
    return pos - last_start


def same_document(segment_ids: Tensor) -> Tensor:
    """(B, L, L) bool: query i and key j lie in the same document (dense attention's mask, causality apart).

    Compares document indices (the number of starts so far), so ids that recur later still split documents.
    """
    doc = document_starts(segment_ids).cumsum(dim=1)  # (B, L) index of each token's document
    return doc[:, :, None] == doc[:, None, :]
