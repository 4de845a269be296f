"""Workspace memory: a per-sequence slot scratchpad written chunk by chunk and read in several hops (docs/design.md 3.6).

The paper describes a "latent reasoning workspace" but not its equations; its public code is non-causal and
updates shared slots with ``.data`` writes. This one is causal, differentiable and per example:

* state: ``n_slots`` vectors per example, initialised from learned parameters;
* write: at the end of every chunk of ``chunk_size`` tokens, each slot attends over that chunk's tokens and
  moves towards what it read by a learned sigmoid gate, ``s <- (1 - g) * s + g * read``;
* read: every token reads the slots as they stood at the end of the previous chunk (so nothing of its own
  chunk, or later, leaks in), by attention over slots, ``read_hops`` times, each hop refining the query with
  what the previous hop returned, so a lookup chain (a -> b -> c) can be followed inside one layer.

Time and memory are linear in L: one small write per chunk, reads batched over all chunks at once.

``context.keep`` (a router's gate threshold) is honoured in one-token steps only (a step no sequence keeps reads
nothing). A whole-sequence forward reads for every token and the block zeroes the skipped ones: gathering the kept
tokens' reads cost more than the reads it saved (docs/benchmarks.md, 2026-12-07).

Document boundaries (``context.segment_ids``): the slots are per document. A token whose document started inside
its own chunk reads the initial slots (nothing of its document is written yet), and a chunk that holds a start
writes only its last document's tokens, into the initial slots; so no slot written by one document is ever read
by the next. The chunk grid stays aligned to the window's position 0, so a document that starts mid-chunk is
first written at the end of that chunk (alone, after ``chunk_size`` of its tokens): the same as alone exactly
when it starts on a chunk boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.ops import Linear
from hydra_kit.ops.decode_attention import decode_attention
from hydra_kit.ops.packed import PackedWeights, Reader
from hydra_kit.ops.segments import document_starts
from hydra_kit.ops.workspace_step import WorkspaceReadWeights, workspace_read_cpu
from hydra_kit.protocol import (
    ComponentContext,
    ComponentOutput,
    ComponentPath,
    TriPathComponent,
    collects_aux,
    wants_diagnostics,
)


@dataclass
class WorkspaceState:
    """The slots after the last complete chunk and the inputs of the incomplete one.

    Attributes:
        slots: (B, S, D_ws).
        pending: (B, n, D) inputs of the incomplete chunk, n < chunk_size.
        read_kv: (B, S, 2 D_ws) the read keys and values of ``slots``, cached by ``step`` (they change only when
            a chunk is written, so a decoded token need not recompute them); None when not computed yet.
    """

    slots: Tensor
    pending: Tensor
    read_kv: Tensor | None = None


@dataclass
class _ChunkDocuments:
    """Document starts seen by the chunk grid of one forward.

    Attributes:
        fresh: (B, C, Q) bool, the token's document started inside its chunk (it reads the initial slots).
        in_last: (B, C, Q) bool, the token belongs to its chunk's last document (the chunk's write takes it).
        restart: (B, C) bool, the chunk holds a start (its write starts from the initial slots).
    """

    fresh: Tensor
    in_last: Tensor
    restart: Tensor


@torch.no_grad()
def read_statistics(probs: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """How the reads spread over the slots (detached scalars, in ``dtype``).

    Args:
        probs: (hops, B, L, S) each token's read attention over the S slots, per hop.

    Returns:
        read_entropy: mean entropy of one read's distribution over the slots, in nats (0: every read takes one
            slot; log S: spread over all).
        slot_usage: exp(entropy of the mean read distribution) / S, the effective share of slots read at all
            (1: all slots equally, 1 / S: one slot takes every read).
    """
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (hops, B, L)
    mean = probs.flatten(0, 2).mean(0)  # (S,)
    usage = (-torch.special.xlogy(mean, mean).sum()).exp() / probs.shape[-1]
    return {"read_entropy": entropy.mean().to(dtype), "slot_usage": usage.to(dtype)}


class WorkspaceMemory(TriPathComponent):
    """Per-sequence slot memory with chunk-wise gated writes and multi-hop reads; state = slots + pending chunk.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        n_slots: number of slots S.
        d_slot: slot width (default d_model).
        chunk_size: tokens per write; a token reads the state as of the end of the previous chunk.
        read_hops: read iterations per token.
    """

    path: ClassVar[ComponentPath] = ComponentPath.MEMORY
    layerscale_init: ClassVar[float] = 0.1
    example_init_args: ClassVar[dict[str, Any]] = {"n_slots": 4, "chunk_size": 8, "read_hops": 2}
    supports_resets: ClassVar[bool] = True  # slots re-initialised at every document start (module docstring)

    def __init__(self, d_model: int, layer_idx: int, *, n_slots: int = 16, d_slot: int | None = None, chunk_size: int = 64, read_hops: int = 2) -> None:
        super().__init__(d_model, layer_idx)
        if n_slots <= 0 or chunk_size <= 0 or read_hops <= 0:
            raise ValueError(f"workspace: n_slots ({n_slots}), chunk_size ({chunk_size}) and read_hops ({read_hops}) must be positive")
        d_slot = d_slot or d_model
        self.n_slots, self.d_slot, self.chunk_size, self.read_hops = n_slots, d_slot, chunk_size, read_hops
        self.initial_slots = nn.Parameter(torch.randn(n_slots, d_slot) * d_slot**-0.5)
        # write: slots query the chunk's tokens
        self.write_query = Linear(d_slot, d_slot, bias=False)
        self.write_kv = Linear(d_model, 2 * d_slot, bias=False)
        self.write_gate = Linear(2 * d_slot, d_slot)
        nn.init.constant_(self.write_gate.bias, -1.0)  # start conservative: slots change slowly
        # read: tokens query the slots, several hops
        self.read_query = Linear(d_model, d_slot, bias=False)
        self.read_kv = Linear(d_slot, 2 * d_slot, bias=False)
        self.hop = Linear(d_slot, d_slot, bias=False)
        self.out = Linear(d_slot, d_model, bias=False)
        self._step_pack: PackedWeights[WorkspaceReadWeights] = PackedWeights()  # what the C read takes, checked once

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> WorkspaceState:
        slots = self.initial_slots.to(device=device, dtype=dtype).expand(batch_size, -1, -1)
        return WorkspaceState(slots, torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype))

    def _write(self, slots: Tensor, chunk: Tensor, written: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """slots (B, S, Ds), chunk (B, Q, D) -> new slots and the mean gate; ``written`` (B, Q) bool: the tokens
        the slots may read (None: all)."""
        keys, values = self.write_kv(chunk).chunk(2, dim=-1)  # (B, Q, Ds) each
        mask = None if written is None else written[:, None, :]  # (B, 1, Q): the same tokens for every slot
        read = F.scaled_dot_product_attention(self.write_query(slots), keys, values, attn_mask=mask)  # (B, S, Ds)
        gate = torch.sigmoid(self.write_gate(torch.cat([slots, read], dim=-1)))
        return slots + gate * (read - slots), gate.mean()

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: WorkspaceState | None = None) -> ComponentOutput:
        batch, length, _ = x.shape
        segment_ids = None if context is None else context.segment_ids
        if segment_ids is not None and state is not None:
            raise ValueError("workspace: segment_ids mark documents from the start of a sequence; they cannot continue a state")
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        q = self.chunk_size
        done = state.pending.shape[1]  # tokens of the current chunk seen before this call
        tokens = torch.cat([state.pending, x], dim=1)  # (B, done + L, D)
        n_full = tokens.shape[1] // q
        n_chunks = -(-tokens.shape[1] // q)
        docs = None if segment_ids is None else self._documents(segment_ids, n_chunks)
        slots, gates = state.slots, []
        per_chunk = []
        for c in range(n_chunks):  # sequential over chunks only: the write recurrence
            per_chunk.append(slots)
            if c < n_full:
                if docs is None:
                    slots, gate = self._write(slots, tokens[:, c * q : (c + 1) * q])
                else:  # a chunk holding a start writes its last document into fresh slots
                    fresh = docs.restart[:, c, None, None]  # (B, 1, 1)
                    slots, gate = self._write(torch.where(fresh, state.slots, slots), tokens[:, c * q : (c + 1) * q], docs.in_last[:, c])
                gates.append(gate)
        slot_states = torch.stack(per_chunk, dim=1)  # (B, C, S, Ds): the state each chunk's tokens read
        keys, values = self.read_kv(slot_states).chunk(2, dim=-1)  # (B, C, S, Ds)
        visible = None
        if docs is not None:
            # Each token reads either its chunk's slots or, when its document started inside the chunk, the initial
            # ones: both sets as keys, one masked (B, C, Q, 2S).
            init_keys, init_values = self.read_kv(state.slots).chunk(2, dim=-1)  # (B, S, Ds)
            keys = torch.cat([keys, init_keys[:, None].expand_as(keys)], dim=2)  # (B, C, 2S, Ds)
            values = torch.cat([values, init_values[:, None].expand_as(values)], dim=2)
            own = docs.fresh[..., None].expand(-1, -1, -1, self.n_slots)  # (B, C, Q, S)
            visible = torch.cat([~own, own], dim=-1)
        diagnose = wants_diagnostics(context)
        padded = F.pad(x, (0, 0, done, n_chunks * q - done - length))  # align x to chunk boundaries
        query = self.read_query(padded).view(batch, n_chunks, q, self.d_slot)  # (B, C, Q, Ds)
        read, read_probs = self._read(query, keys, values, visible, diagnose)
        update = self.out(read.reshape(batch, n_chunks * q, self.d_slot)[:, done : done + length])
        probs = torch.stack(read_probs).flatten(2, 3)[:, :, done : done + length] if diagnose else None  # (hops, B, L, S)
        stats = {"write_gate": torch.stack(gates).mean().detach()} if gates and collects_aux(context) else {}
        if probs is not None and probs.shape[2] > 0:
            stats.update(read_statistics(probs, x.dtype))
        new_state = WorkspaceState(slots, tokens[:, n_full * q :].clone())  # clone: a slice would pin all of tokens
        return ComponentOutput(update=update, stats=stats, state=new_state)

    def _read(self, query: Tensor, keys: Tensor, values: Tensor, visible: Tensor | None, diagnose: bool) -> tuple[Tensor, list[Tensor]]:
        """``read_hops`` reads of the slots, each hop refining the query with what the last one returned.

        Args:
            query: (..., Q, Ds) the tokens' first queries.
            keys, values: (..., S, Ds) the slots each group of queries reads (2S with a document's initial slots).
            visible: (..., Q, 2S) bool, which of the 2S slots each query reads; None when all S are.
            diagnose: also return each hop's read distribution over the S slots.

        Returns:
            The last hop's read (..., Q, Ds), and per hop (diagnose only) the read distribution (..., Q, S).
        """
        read = query.new_zeros(())
        read_probs = []
        for _ in range(self.read_hops):
            if diagnose:  # the weights scaled_dot_product_attention does not return, recomputed for the stats
                logits = (query @ keys.transpose(-1, -2) * self.d_slot**-0.5).detach().float()  # (..., Q, S or 2S)
                if visible is None:
                    read_probs.append(logits.softmax(-1))
                else:  # exactly one half is visible: fold it onto the S slots
                    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
                    read_probs.append(probs[..., : self.n_slots] + probs[..., self.n_slots :])
            read = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)  # (..., Q, Ds)
            query = query + self.hop(read)
        return read, read_probs

    def _documents(self, segment_ids: Tensor, n_chunks: int) -> _ChunkDocuments:
        """Where documents start relative to the chunk grid, for ``segment_ids`` (B, L) of a call from position 0."""
        starts = document_starts(segment_ids)  # (B, L)
        starts = F.pad(starts, (0, n_chunks * self.chunk_size - starts.shape[1]))  # padding starts nothing
        doc = starts.view(starts.shape[0], n_chunks, self.chunk_size).cumsum(-1)  # (B, C, Q) document within chunk
        return _ChunkDocuments(fresh=doc > 0, in_last=doc == doc[..., -1:], restart=doc[..., -1] > 0)

    def step(self, x_t: Tensor, state: WorkspaceState, context: ComponentContext | None = None) -> ComponentOutput:
        """One token x_t (B, D): read the slots in ``read_hops`` hops, then add x_t to the pending chunk.

        Same result as ``forward`` on a length-1 input; the slots' read keys and values are cached in the state.
        """
        read_kv = self.read_kv(state.slots) if state.read_kv is None else state.read_kv  # (B, S, 2 Ds)
        keep = None if context is None else context.keep  # (B,) bool
        skipped = keep is not None and not bool(keep.any())  # no example reads: the block adds nothing
        weights = self._step_pack.get(self, self._pack_step)
        update = x_t.new_zeros(x_t.shape) if skipped else workspace_read_cpu(x_t, read_kv, weights, self.read_hops)
        if update is None:  # else: the same read as below, in one C call (CPU, float32, no autograd)
            keys, values = (t[:, None] for t in read_kv.chunk(2, dim=-1))  # (B, 1, S, Ds): one head of width Ds
            query = self.read_query(x_t)[:, None]  # (B, 1, Ds)
            read = query
            for _ in range(self.read_hops):
                # One query: the decoding op costs a fraction of scaled_dot_product_attention's fixed cost.
                read = decode_attention(query, [(keys, values, None)], self.d_slot**-0.5)  # (B, 1, Ds)
                query = query + self.hop(read)
            update = self.out(read[:, 0])  # (B, D)
        pending = torch.cat([state.pending, x_t[:, None]], dim=1)  # (B, n + 1, D)
        stats: dict[str, Tensor] = {}
        if pending.shape[1] < self.chunk_size:
            return ComponentOutput(update=update, state=WorkspaceState(state.slots, pending, read_kv))
        slots, gate = self._write(state.slots, pending)  # the chunk is complete: write it
        if collects_aux(context):
            stats["write_gate"] = gate.detach()
        return ComponentOutput(update=update, stats=stats, state=WorkspaceState(slots, pending[:, :0]))

    def _pack_step(self, read: Reader) -> WorkspaceReadWeights:
        """The weights the C read kernel takes, checked (cached by ``self._step_pack``, which watches what ``read`` reads)."""
        return WorkspaceReadWeights(read("read_query.weight"), read("hop.weight"), read("out.weight"))

    def flops_per_token(self, seq_len: int) -> float:
        d, ds, s, q = self.d_model, self.d_slot, self.n_slots, self.chunk_size
        read = 2 * d * ds + self.read_hops * (4 * s * ds + 2 * ds * ds) + 2 * ds * d + 4 * s * ds * ds / q
        write = 4 * d * ds + (2 * s * ds * ds + 4 * s * q * ds + 4 * s * ds * ds) / q  # kv per token; query, attention, gate per chunk
        return float(read + write)
