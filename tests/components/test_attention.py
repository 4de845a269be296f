"""CausalSelfAttention: conformance, and its preallocated key/value cache at inference."""

from __future__ import annotations

import pytest
import torch

from hydra_kit.components.attention import CausalSelfAttention, KVCache
from hydra_kit.testing import check_component


@pytest.mark.slow
def test_conformance():
    check_component(CausalSelfAttention)


def test_inference_cache_is_written_in_place_and_grows_by_blocks(monkeypatch):
    monkeypatch.setattr(KVCache, "growth", 8)
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 0, n_heads=2).eval()
    x = torch.randn(2, 30, 16)
    with torch.inference_mode():
        full = layer(x).update
        state = layer.init_state(2, device=x.device, dtype=x.dtype)
        outs, capacities = [], []
        for start, stop in [(0, 5), *((t, t + 1) for t in range(5, 30))]:  # a prefill, then one token at a time
            out = layer(x[:, start:stop], None, state)
            outs.append(out.update)
            state = out.state
            capacities.append(state.key_buffer.shape[2])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)
    assert state.length == 30 and state.keys.shape == (2, 2, 30, 8)
    # Capacity: whole blocks of 8 with at least 8 free slots after each growth, regrown only when full:
    # 5 tokens -> 16 slots; the 17th token -> 32 slots, enough for the rest.
    assert capacities[:12] == [16] * 12 and capacities[12:] == [32] * 14


def test_cache_under_autograd_builds_fresh_tensors():
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 0, n_heads=2)
    x = torch.randn(1, 12, 16, requires_grad=True)
    state = layer.init_state(1, device=x.device, dtype=x.dtype)
    first = layer(x[:, :6], None, state)
    second = layer(x[:, 6:], None, first.state)
    (first.update.sum() + second.update.sum()).backward()  # no in-place write corrupted a saved tensor
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert second.state.key_buffer.shape[2] == 12
