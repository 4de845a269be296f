"""Dense causal multi-head self-attention with rotary embeddings: the transformer baseline's mixer.

Vaswani et al. 2017 (arXiv 1706.03762) with RoPE (Su et al. 2021, arXiv 2104.09864). Uses PyTorch's
``scaled_dot_product_attention``, whose CPU flash kernel never materialises the L x L score matrix.

With document boundaries (``context.segment_ids``, docs/design.md 3.10) a query sees the keys of its own document
only, through a (B, 1, L, L) mask: the one L x L tensor of the baseline, which is quadratic anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.ops import Linear, RotaryEmbedding, apply_rotary
from hydra_kit.ops.decode_attention import decode_attention
from hydra_kit.ops.rotary import qkv_rotary
from hydra_kit.ops.segments import same_document
from hydra_kit.protocol import ComponentContext, ComponentOutput, ComponentPath, TriPathComponent


@dataclass
class KVCache:
    """Keys and values of every past token, in a buffer with room to grow.

    At inference (no autograd) new keys are written in place, so decoding one token costs O(1) copies plus
    the attention itself; the buffer grows by whole blocks of ``KVCache.growth`` tokens when it is full,
    as a serving system's preallocated cache would. A cache is append-only: continue from the state a call
    returned, never from an older one (its buffer may have been written since). Under autograd every call
    builds fresh tensors instead, because in-place writes would corrupt saved activations.

    Attributes:
        key_buffer: (B, H, capacity, hd) rotated keys; slots at and after ``length`` are unused.
        value_buffer: (B, H, capacity, hd) values.
        length: number of cached tokens.
    """

    key_buffer: Tensor
    value_buffer: Tensor
    length: int = 0

    growth: ClassVar[int] = 256

    @property
    def keys(self) -> Tensor:  # (B, H, length, hd)
        return self.key_buffer[:, :, : self.length]

    @property
    def values(self) -> Tensor:  # (B, H, length, hd)
        return self.value_buffer[:, :, : self.length]

    def _buffers(self, need: int) -> tuple[Tensor, Tensor]:
        """Key and value buffers with room for ``need`` tokens: these, or larger copies of them."""
        keys, values = self.key_buffer, self.value_buffer
        if keys.shape[2] < need:  # grow to the next whole block with at least `growth` free slots
            capacity = -(-(need + self.growth) // self.growth) * self.growth
            keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
            values = values.new_empty(keys.shape)
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        return keys, values

    def append(self, k: Tensor, v: Tensor) -> KVCache:
        """The cache after appending k, v (B, H, L, hd); writes in place when autograd is off."""
        need = self.length + k.shape[2]
        if torch.is_grad_enabled():
            return KVCache(torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2), need)
        keys, values = self._buffers(need)
        keys[:, :, self.length : need] = k
        values[:, :, self.length : need] = v
        return KVCache(keys, values, need)

    def next_slot(self) -> tuple[KVCache, Tensor, Tensor]:
        """At inference: the cache with one more token, and (B, H, hd) views of that token's key and value slots.

        The caller writes the new key and value into the slots (a decoding kernel can write them there directly).
        """
        keys, values = self._buffers(self.length + 1)
        return KVCache(keys, values, self.length + 1), keys[:, :, self.length], values[:, :, self.length]


class CausalSelfAttention(TriPathComponent):
    """Dense causal self-attention with RoPE; its state is a key/value cache of the whole past.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        n_heads: number of heads; must divide d_model.
        rope_base: rotary frequency base.
    """

    path: ClassVar[ComponentPath] = ComponentPath.SEQUENCE
    gated_by_router: ClassVar[bool] = True
    layerscale_init: ClassVar[float] = 1.0
    example_init_args: ClassVar[dict[str, Any]] = {"n_heads": 4}
    supports_resets: ClassVar[bool] = True  # masked by document; see forward

    def __init__(self, d_model: int, layer_idx: int, *, n_heads: int = 8, rope_base: float = 10000.0) -> None:
        super().__init__(d_model, layer_idx)
        if n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"attention: n_heads={n_heads} must be positive and divide d_model={d_model}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = Linear(d_model, 3 * d_model, bias=False)
        self.out = Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)

    def flops_per_token(self, seq_len: int) -> float:
        # Projections, plus QK^T and AV over the causal prefix (on average seq_len / 2 keys per query).
        return 2.0 * self.active_parameters() + 2 * 2 * self.d_model * (seq_len + 1) / 2

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> KVCache:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone(), 0)

    def forward(
        self, x: Tensor, context: ComponentContext | None = None, state: KVCache | None = None
    ) -> ComponentOutput:
        batch, seq_len, _ = x.shape
        past = 0 if state is None else state.length
        if seq_len == 1 and state is not None and not torch.is_grad_enabled():
            return self._decode(x, state)
        segment_ids = None if context is None else context.segment_ids
        if segment_ids is not None and state is not None:
            raise ValueError("attention: segment_ids mark documents from the start of a sequence; they cannot continue a state")
        q, k, v = self._qkv(x, past)  # (B, H, L, hd)
        cache = None if state is None else state.append(k, v)
        if segment_ids is not None:
            # A query sees the earlier keys of its own document only. The dense baseline is O(L^2) anyway, so a
            # (B, 1, L, L) mask per batch costs no more than the scores; RoPE depends on relative positions only,
            # so a document's scores do not depend on where in the window it starts.
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
            visible = (same_document(segment_ids) & causal)[:, None]  # (B, 1, L, L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        elif cache is not None and past > 0:
            # Query i sits at absolute position past + i and sees keys 0 .. past + i.
            visible = torch.ones(seq_len, past + seq_len, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=visible)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, seq_len, self.d_model)  # (B, L, D)
        return ComponentOutput(update=self.out(y), state=cache if cache is not None else KVCache(k, v, seq_len))

    def _qkv(self, x: Tensor, past: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries and keys, and values, (B, H, L, hd) each, of x (B, L, D) at positions past, past + 1, ..."""
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self.rotary(torch.arange(past, past + seq_len, device=x.device))  # (L, hd/2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _decode(self, x: Tensor, state: KVCache) -> ComponentOutput:
        """One token per sequence, x (B, 1, D), at inference: its key and value go straight into the cache."""
        past = state.length
        cache, key_slot, value_slot = state.next_slot()  # (B, H, hd) views of the new token's slot
        # One C call (CPU, float32): projection, rotation, and the write of key and value into their slots.
        fused = qkv_rotary(x[:, 0], self.qkv.weight, None, self.rotary.inv_freq, self.n_heads, past, key_slot, value_slot)
        if fused is not None:
            q = fused[:, 0]  # (B, H, hd)
        else:
            q, k, v = (t[:, :, 0] for t in self._qkv(x, past))
            key_slot.copy_(k)
            value_slot.copy_(v)
        y = decode_attention(q, [(cache.keys, cache.values, None)], self.head_dim**-0.5)  # (B, H, hd): sees every key
        return ComponentOutput(update=self.out(y.reshape(x.shape[0], 1, self.d_model)), state=cache)
