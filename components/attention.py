"""Dense causal multi-head self-attention with rotary embeddings: the transformer baseline's mixer.

Vaswani et al. 2017 (arXiv 1706.03762) with RoPE (Su et al. 2021, arXiv 2104.09864). Uses PyTorch's
``scaled_dot_product_attention``, whose CPU flash kernel never materialises the L x L score matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from hydra_kit.nn import Linear, RotaryEmbedding, apply_rotary
from hydra_kit.nn.decode_attention import decode_attention
from hydra_kit.nn.decode_rotary import qkv_rotary
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

    def append(self, k: Tensor, v: Tensor) -> KVCache:
        """The cache after appending k, v (B, H, L, hd); writes in place when autograd is off."""
        need = self.length + k.shape[2]
        if torch.is_grad_enabled():
            return KVCache(torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2), need)
        keys, values = self.key_buffer, self.value_buffer
        if keys.shape[2] < need:  # grow to the next whole block with at least `growth` free slots
            capacity = -(-(need + self.growth) // self.growth) * self.growth
            keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
            values = values.new_empty(keys.shape)
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        keys[:, :, self.length : need] = k
        values[:, :, self.length : need] = v
        return KVCache(keys, values, need)


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
        fused = qkv_rotary(x[:, 0], self.qkv.weight, None, self.rotary.inv_freq, self.n_heads, past) if seq_len == 1 else None
        if fused is not None:  # one decoding token: projection and rotation in one C call (CPU, float32, no autograd)
            q, k, v = fused[:, :, :, None].unbind(1)  # (B, H, 1, hd)
        else:
            q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            cos, sin = self.rotary(torch.arange(past, past + seq_len, device=x.device))  # (L, hd/2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, L, hd)
        cache = None if state is None else state.append(k, v)
        if cache is not None and past > 0:
            # Query i sits at absolute position past + i and sees keys 0 .. past + i.
            if seq_len == 1:  # one decoding step sees every cached key: no mask needed
                y = decode_attention(q[:, :, 0], [(cache.keys, cache.values, None)], self.head_dim**-0.5)[:, :, None]
            else:
                visible = torch.ones(seq_len, past + seq_len, dtype=torch.bool, device=x.device).tril(past)
                y = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=visible)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, seq_len, self.d_model)  # (B, L, D)
        return ComponentOutput(update=self.out(y), state=cache if cache is not None else KVCache(k, v, seq_len))
