"""SelectiveSSM: conformance, and both chunked scans and the whole layer against sequential references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from recompute_check import assert_recompute_keeps_gradients
from ssm_reference import diagonal_reference, layer_reference, ssd_reference

from hydra_kit.components.ssm import SelectiveSSM
from hydra_kit.ops.conv import causal_depthwise_conv
from hydra_kit.ops.scan import diagonal_chunked_scan, ssd_chunked_scan
from hydra_kit.testing import check_component


def _ssd_inputs(length: int, *, heads: int = 4, groups: int = 2, seed: int = 0, dt_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    b, p, n = 2, 3, 5
    f64 = torch.float64
    return {
        "x": torch.randn(b, length, heads, p, generator=gen, dtype=f64),
        "dt": torch.rand(b, length, heads, generator=gen, dtype=f64) * dt_scale,
        "A": -torch.rand(heads, generator=gen, dtype=f64) * 2 - 0.1,
        "B": torch.randn(b, length, groups, n, generator=gen, dtype=f64),
        "C": torch.randn(b, length, groups, n, generator=gen, dtype=f64),
        "initial_state": torch.randn(b, heads, p, n, generator=gen, dtype=f64),
    }


@pytest.mark.parametrize("length", [0, 1, 7, 16, 37])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_scan_equals_reference(length, chunk, groups):
    i = _ssd_inputs(length, groups=groups, seed=length * 31 + chunk)
    y, s = ssd_chunked_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk, i["initial_state"])
    y_ref, s_ref = ssd_reference(**i)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


def test_ssd_scan_strong_decay_takes_the_exact_path():
    # dt * |A| summed over a chunk far beyond what the factored form can hold in float32: the exact fallback runs.
    i = _ssd_inputs(24, seed=5, dt_scale=200.0)
    i32 = {k: v.float() for k, v in i.items()}
    y, s = ssd_chunked_scan(i32["x"], i32["dt"], i32["A"], i32["B"], i32["C"], 8, i32["initial_state"])
    y_ref, s_ref = ssd_reference(**i)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-4, atol=1e-4)


def test_ssd_scan_gradients_match_reference():
    inputs = _ssd_inputs(11, seed=1)
    grads = []
    for fn in (
        lambda i: ssd_chunked_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], 4, i["initial_state"])[0],
        lambda i: ssd_reference(**i)[0],
    ):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        fn(leaves).square().sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in inputs:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=1e-9, msg=f"gradient of {k}")


@pytest.mark.parametrize("length", [0, 1, 9, 23])
@pytest.mark.parametrize("log_alpha_scale", [1.0, 300.0])  # 300: chunks decay past the factored form's range
def test_diagonal_scan_equals_reference(length, log_alpha_scale):
    gen = torch.Generator().manual_seed(length)
    b, d = 2, 5
    f64 = torch.float64
    u, B, C = (torch.randn(b, length, d, generator=gen, dtype=f64) for _ in range(3))
    log_alpha = -torch.rand(b, length, d, generator=gen, dtype=f64) * log_alpha_scale
    s0 = torch.randn(b, d, generator=gen, dtype=f64)
    y, s = diagonal_chunked_scan(u, log_alpha, B, C, 4, s0)
    y_ref, s_ref = diagonal_reference(u, log_alpha, B, C, s0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "args",
    [
        {"d_state": 8, "headdim": 8, "chunk_size": 4, "segment_len": 8, "ngroups": 2},
        {"variant": "diagonal", "chunk_size": 4, "segment_len": 8, "expand": 1},
    ],
)
def test_layer_equals_sequential_reference(args):
    torch.manual_seed(0)
    layer = SelectiveSSM(16, 0, **args).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)  # 19: crosses segments and ends mid-chunk
    torch.testing.assert_close(layer(x).update, layer_reference(layer, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "args",
    [
        SelectiveSSM.example_init_args,
        {"d_state": 4, "headdim": 8, "chunk_size": 7, "segment_len": 14, "expand": 1},
        {"d_state": 4, "headdim": 8, "chunk_size": 4, "segment_len": 8, "ngroups": 2},
        {"variant": "diagonal", "chunk_size": 4, "segment_len": 8, "expand": 1},
        {"variant": "diagonal", "chunk_size": 7, "segment_len": 7},
    ],
)
@pytest.mark.slow
def test_conformance(args):
    check_component(SelectiveSSM, init_args=args)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="headdim=48 must divide"):
        SelectiveSSM(64, 0, headdim=48)
    with pytest.raises(ValueError, match="backend must be one of"):
        SelectiveSSM(64, 0, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="segment_len must be a positive multiple of chunk_size=64"):
        SelectiveSSM(64, 0, segment_len=100)
    with pytest.raises(ValueError, match="ngroups=3 must divide"):
        SelectiveSSM(64, 0, headdim=32, ngroups=3)
    with pytest.raises(ValueError, match="'mamba_ssm' implements the ssd variant only"):
        SelectiveSSM(64, 0, variant="diagonal", backend="mamba_ssm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_mamba_backend_without_gpu_says_why_and_auto_falls_back():
    with pytest.raises(ValueError, match=r"backend 'mamba_ssm' is not available: (mamba-ssm is not installed|no CUDA GPU)"):
        SelectiveSSM(32, 0, backend="mamba_ssm")
    torch.manual_seed(0)
    auto, plain = SelectiveSSM(32, 0, headdim=16, d_state=8), SelectiveSSM(32, 0, headdim=16, d_state=8, backend="torch")
    plain.load_state_dict(auto.state_dict())
    x = torch.randn(1, 10, 32)
    torch.testing.assert_close(auto(x).update, plain(x).update, rtol=0, atol=0)


@pytest.mark.parametrize("taps", [1, 4])
def test_causal_depthwise_conv_equals_conv1d(taps):
    gen = torch.Generator().manual_seed(taps)
    padded = torch.randn(2, taps - 1 + 13, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, taps, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = causal_depthwise_conv(padded, weight, bias)
    ref = F.conv1d(padded.transpose(1, 2), weight[:, None], bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(ours.square().sum(), (padded, weight, bias))
    ref_grads = torch.autograd.grad(ref.square().sum(), (padded, weight, bias))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ssd", "diagonal"])
def test_recompute_in_backward_gives_the_same_gradients(variant):
    args = {"d_state": 8, "headdim": 8, "chunk_size": 4, "segment_len": 8, "variant": variant}
    assert_recompute_keeps_gradients(SelectiveSSM, args)
