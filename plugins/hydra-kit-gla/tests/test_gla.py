"""GatedLinearAttention: hydra-kit's public conformance check, and the chunked pass against the recurrence."""

from __future__ import annotations

import pytest
import torch
from hydra_kit.testing import check_component
from torch import Tensor

from hydra_kit_gla import GatedLinearAttention
from hydra_kit_gla.gla import chunked_gla


def recurrent_gla(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """The oracle: the paper's recurrence one token at a time, S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
    state, outputs = initial, []
    for t in range(q.shape[2]):
        state = torch.exp(log_alpha[:, :, t])[..., None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, None, :] @ state)[..., 0, :])
    return torch.stack(outputs, dim=2), state


def random_inputs(seq_len: int, gate_shift: float, seed: int, d_k: int = 6, d_v: int = 5) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, seq_len)
    q, k = (torch.randn(*shape, d_k, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*shape, d_v, generator=gen, dtype=torch.float64)
    # gate_shift moves the gate logits: 0 is the usual regime, -30 forgets almost everything at every step,
    # where a naive exp(b_t) * exp(-b_s) factorisation overflows.
    log_alpha = torch.nn.functional.logsigmoid(torch.randn(*shape, d_k, generator=gen, dtype=torch.float64) * 3 + gate_shift)
    initial = torch.randn(2, 3, d_k, d_v, generator=gen, dtype=torch.float64)
    return [q, k, v, log_alpha, initial]


@pytest.mark.parametrize("variant", [{}, {"expand_k": 1.0, "gate_rank": 4, "chunk_size": 16, "sub_chunk": 16}, {"n_heads": 1, "chunk_size": 4, "sub_chunk": 1}])
def test_conforms_to_the_hydra_kit_contract(variant):
    check_component(GatedLinearAttention, init_args={**GatedLinearAttention.example_init_args, **variant})


@pytest.mark.parametrize("seq_len", [1, 7, 16, 37])
@pytest.mark.parametrize("gate_shift", [0.0, -30.0])
def test_chunked_forward_equals_the_recurrence(seq_len, gate_shift):
    q, k, v, log_alpha, initial = random_inputs(seq_len, gate_shift, seed=seq_len)
    want_o, want_state = recurrent_gla(q, k, v, log_alpha, initial)
    for chunk_size, sub_chunk in [(8, 4), (16, 16), (4, 1)]:
        o, state = chunked_gla(q, k, v, log_alpha, initial, chunk_size, sub_chunk)
        torch.testing.assert_close(o, want_o, rtol=0, atol=1e-10)
        torch.testing.assert_close(state, want_state, rtol=0, atol=1e-10)


def test_strong_forgetting_stays_finite_in_float32():
    q, k, v, log_alpha, initial = (t.float() for t in random_inputs(64, -60.0, seed=3))
    o, state = chunked_gla(q, k, v, log_alpha, initial, 32, 8)
    want_o, _ = recurrent_gla(q, k, v, log_alpha, initial)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    torch.testing.assert_close(o, want_o, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate_shift", [0.0, -30.0])
def test_chunked_gradients_equal_the_recurrence(gate_shift):
    inputs = [t.requires_grad_(True) for t in random_inputs(21, gate_shift, seed=7)]
    weights = torch.randn(2, 3, 21, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o, state = chunked_gla(*inputs, 8, 4)
    grads = torch.autograd.grad((o * weights).sum() + state.sum(), inputs)
    want_o, want_state = recurrent_gla(*inputs)
    want = torch.autograd.grad((want_o * weights).sum() + want_state.sum(), inputs)
    for name, got, expected in zip(("q", "k", "v", "log_alpha", "initial"), grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9, msg=f"gradient of {name}")


def test_layer_forward_equals_the_recurrence_and_gates_follow_the_paper():
    torch.manual_seed(0)
    layer = GatedLinearAttention(32, 0, n_heads=4, chunk_size=8, sub_chunk=4).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    q, k, v, log_alpha = layer.project(x)
    assert q.shape == k.shape == log_alpha.shape == (2, 4, 19, 4) and v.shape == (2, 4, 19, 8)
    # alpha = sigmoid(.) ** (1 / 16): every gate in (0, 1), and close to 1 at initialisation (slow forgetting).
    alpha = log_alpha.exp()
    assert (alpha > 0).all() and (alpha < 1).all() and alpha.min() > 0.9
    o, _ = recurrent_gla(q, k, v, log_alpha, layer.init_state(2, device=x.device, dtype=x.dtype).memory)
    torch.testing.assert_close(layer(x).update, layer.finish(o, x), rtol=0, atol=1e-10)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"gla: n_heads=3 must .*divide the key width 16"):
        GatedLinearAttention(32, 0, n_heads=3)
    with pytest.raises(ValueError, match=r"gla: sub_chunk=5 must be positive and divide chunk_size=64"):
        GatedLinearAttention(32, 0, sub_chunk=5)
    with pytest.raises(ValueError, match=r"gla: expand_k=0.3"):
        GatedLinearAttention(32, 0, expand_k=0.3)
