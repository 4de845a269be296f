"""SelectiveSSM: conformance, and the chunked SSD scan against a sequential reference recurrence."""

from __future__ import annotations

import pytest
import torch

from hydra_kit.components.ssm import SelectiveSSM, diagonal_chunked_scan, ssd_chunked_scan
from hydra_kit.testing import check_component


def reference_scan(x, dt, A, B, C, state):
    """The recurrence the scan must equal: s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T, y_t = s_t C_t."""
    ys = []
    for t in range(x.shape[1]):
        state = state * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append((state @ C[:, t, None, :, None])[..., 0])
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("length", [1, 7, 16, 37])
@pytest.mark.parametrize("chunk", [4, 16])
def test_chunked_scan_equals_reference(length, chunk):
    gen = torch.Generator().manual_seed(length * 31 + chunk)
    b, h, p, n = 2, 3, 4, 5
    x = torch.randn(b, length, h, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, length, h, generator=gen, dtype=torch.float64)
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 2
    B = torch.randn(b, length, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, length, n, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    y, s = ssd_chunked_scan(x, dt, A, B, C, chunk, s0)
    y_ref, s_ref = reference_scan(x, dt, A, B, C, s0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


def test_scan_gradients_match_reference():
    gen = torch.Generator().manual_seed(0)
    shapes = {"x": (1, 11, 2, 3), "dt": (1, 11, 2), "B": (1, 11, 4), "C": (1, 11, 4)}
    inputs = {k: torch.randn(*v, generator=gen, dtype=torch.float64) for k, v in shapes.items()}
    inputs["dt"] = inputs["dt"].abs()
    A = -torch.rand(2, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (lambda i: ssd_chunked_scan(i["x"], i["dt"], A, i["B"], i["C"], 4)[0], lambda i: reference_scan(i["x"], i["dt"], A, i["B"], i["C"], torch.zeros(1, 2, 3, 4, dtype=torch.float64))[0]):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        fn(leaves).square().sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in inputs:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=1e-9)


@pytest.mark.parametrize("args", [SelectiveSSM.example_init_args, {"d_state": 4, "headdim": 8, "chunk_size": 7, "expand": 1}])
def test_conformance(args):
    check_component(SelectiveSSM, init_args=args)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="headdim=48 must divide"):
        SelectiveSSM(64, 0, headdim=48)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        SelectiveSSM(64, 0, backend="cuda")


def test_diagonal_scan_equals_reference():
    gen = torch.Generator().manual_seed(3)
    b, length, d = 2, 23, 5
    log_alpha = -torch.rand(b, length, d, generator=gen, dtype=torch.float64)
    inputs = torch.randn(b, length, d, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, d, generator=gen, dtype=torch.float64)
    states, final = diagonal_chunked_scan(log_alpha, inputs, 4, s0)
    s, ref = s0, []
    for t in range(length):
        s = torch.exp(log_alpha[:, t]) * s + inputs[:, t]
        ref.append(s)
    torch.testing.assert_close(states, torch.stack(ref, 1), rtol=0, atol=1e-10)
    torch.testing.assert_close(final, s, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [4, 7])
def test_diagonal_variant_conforms(chunk):
    check_component(SelectiveSSM, init_args={"variant": "diagonal", "chunk_size": chunk, "expand": 1})
