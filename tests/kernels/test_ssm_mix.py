"""The SSM's fused stages (``ops.ssm_mix``, ``ops.chunk_carry``): C forward and backward against PyTorch.

Each test counts the calls into C (``kernel_calls``), so a comparison that silently ran PyTorch twice fails.
Inputs are column slices of a wider tensor, as in the SSM (the kernels read them in place through their strides).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from hydra_kit.components.ssm import SelectiveSSM
from hydra_kit.ops import chunk_carry, native, ssm_mix
from hydra_kit.ops.segments import document_offsets, document_starts
from hydra_kit.protocol import ComponentContext


def _both(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], *rest: Any) -> list[tuple[torch.Tensor, ...]]:
    """Output and input gradients of ``fn`` with the C kernels on, then off, for one fixed upstream gradient."""
    results = []
    for flag in (True, False):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        with native.native_kernels(flag):
            out = fn(*leaves, *rest)
            upstream = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
            grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], upstream)
        results.append((out.detach(), *grads))
    return results


def _strided(b: int, t: int, c: int, left: int = 5, right: int = 3) -> torch.Tensor:
    """A (b, t, c) column slice of a wider tensor, as the SSM's input projection is split."""
    return torch.randn(b, t, left + c + right)[:, :, left : left + c]


def _assert_close(kernel: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> None:
    for got, want in zip(kernel, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length", [1, 2, 3, 40])
@pytest.mark.parametrize("with_documents", [False, True])
def test_conv_silu_values_and_gradients_match_pytorch(kernel_calls: Any, length: int, with_documents: bool) -> None:
    calls = kernel_calls(ssm_mix.LIBRARY)
    torch.manual_seed(length)
    b, c, taps = 3, 24, 4
    x, state = _strided(b, length, c) * 3, torch.randn(b, taps - 1, c)
    weight, bias = torch.randn(c, taps), torch.randn(c)
    offsets = None
    if with_documents:
        segment_ids = torch.randint(0, 2, (b, length)).cumsum(1)
        offsets = document_offsets(document_starts(segment_ids))
    kernel, reference = _both(ssm_mix.conv_silu, [x, state, weight, bias], offsets)
    _assert_close(kernel, reference)
    assert calls["hk_conv_silu_forward"] == 1 and calls["hk_conv_silu_backward"] == 1


@pytest.mark.parametrize("groups", [1, 4])
def test_gated_norm_values_and_gradients_match_pytorch(kernel_calls: Any, groups: int) -> None:
    calls = kernel_calls(ssm_mix.LIBRARY)
    torch.manual_seed(groups)
    b, t, n = 2, 33, 32
    y, x, z = torch.randn(b, t, n), _strided(b, t, n), _strided(b, t, n) * 4
    d, weight = torch.randn(n), torch.rand(n) + 0.5
    kernel, reference = _both(ssm_mix.gated_norm, [y, x, d, z, weight], 1e-5, groups)
    _assert_close(kernel, reference)
    assert calls["hk_gated_norm_forward"] == 1 and calls["hk_gated_norm_backward"] == 1


@pytest.mark.parametrize("zero_decays", [False, True])
def test_chunk_carry_values_and_gradients_match_pytorch(kernel_calls: Any, zero_decays: bool) -> None:
    """Two sequences, two groups of two heads; a zero decay is a chunk holding a document start."""
    calls = kernel_calls(chunk_carry.LIBRARY)
    torch.manual_seed(int(zero_decays))
    b, c, g, n, hg, p = 2, 5, 2, 3, 2, 4
    local, initial = torch.randn(b, c, g, n, hg, p), torch.randn(b, g, n, hg, p)
    scale_in, decay, scale_out = torch.rand(b, c, g * hg) * 3, torch.rand(b, c, g * hg), torch.rand(b, c, g * hg) + 0.1
    if zero_decays:
        decay[0, 1], decay[1, 3, 2] = 0.0, 0.0
    results = []
    for flag in (True, False):
        leaves = [t.clone().requires_grad_() for t in (local, scale_in, decay, scale_out, initial)]
        with native.native_kernels(flag):
            starts, final = chunk_carry.chunk_carry(*leaves)
            loss = (starts * torch.linspace(-1.0, 1.0, starts.numel()).view_as(starts)).sum() + (final * final).sum()
            results.append((starts.detach(), final.detach(), *torch.autograd.grad(loss, leaves)))
    _assert_close(results[0], results[1])
    assert calls["hk_chunk_carry_forward"] == 1 and calls["hk_chunk_carry_backward"] == 1


def test_the_kernels_keep_extreme_and_missing_values_as_pytorch_does(kernel_calls: Any) -> None:
    """SiLU of large pre-activations (the kernel's exp is its own, clamped) and NaN, which must not vanish."""
    kernel_calls(ssm_mix.LIBRARY)
    c = 8
    x = torch.tensor([-200.0, -90.0, -20.0, -1e-3, 0.0, 30.0, 95.0, float("nan")]).view(1, c, 1).expand(1, c, c).contiguous()
    state, weight, bias = torch.zeros(1, 3, c), torch.zeros(c, 4), torch.zeros(c)
    weight[:, 3] = 1.0  # the current token only: silu(x)
    with torch.no_grad():
        got = ssm_mix.conv_silu(x, state, weight, bias)
    torch.testing.assert_close(got, torch.nn.functional.silu(x), rtol=1e-6, atol=1e-30, equal_nan=True)
    assert got[0, 7].isnan().all()


@pytest.mark.parametrize("variant", ["ssd", "diagonal"])
def test_the_ssm_trains_the_same_with_and_without_the_kernels(kernel_calls: Any, variant: str) -> None:
    """The component end to end, pieces and document starts included: outputs and every parameter's gradient."""
    calls = kernel_calls(ssm_mix.LIBRARY, chunk_carry.LIBRARY)
    torch.manual_seed(0)
    ssm = SelectiveSSM(32, 0, d_state=8, headdim=16, chunk_size=8, segment_len=16, ngroups=2 if variant == "ssd" else 1, variant=variant)
    with torch.no_grad():
        ssm.D.uniform_(-1.0, 1.0)
        ssm.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 37, 32)
    context = ComponentContext(segment_ids=torch.tensor([[0] * 10 + [1] * 27, [0] * 3 + [1] * 30 + [2] * 4]))
    results = []
    for flag in (True, False):
        ssm.zero_grad()
        with native.native_kernels(flag):
            out = ssm(x, context).update
            (out * torch.linspace(-1.0, 1.0, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), *(p.grad.clone() for p in ssm.parameters() if p.grad is not None)))
    _assert_close(results[0], results[1])
    assert calls["hk_conv_silu_backward"] == 3 and calls["hk_gated_norm_backward"] == 3  # three pieces of 16
    assert calls["hk_chunk_carry_backward"] == (3 if variant == "ssd" else 0)  # the diagonal scan carries (b, D) states


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="conv_silu: state has shape"):
        ssm_mix.conv_silu(torch.randn(1, 4, 8), torch.randn(1, 2, 8), torch.randn(8, 4), torch.randn(8))
    with pytest.raises(ValueError, match="gated_norm: groups=3 must divide"):
        ssm_mix.gated_norm(*(torch.randn(1, 4, 8),) * 2, torch.randn(8), torch.randn(1, 4, 8), torch.randn(8), 1e-5, 3)
