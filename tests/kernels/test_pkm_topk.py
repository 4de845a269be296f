"""Parity of the product-key top-k Triton kernel with the PyTorch path, forward and backward (HYDRA.md 3.7).

On a GPU these run the compiled kernel. Without one they need triton's CPU interpreter, which must be switched on
before triton is first imported (``@triton.jit`` decides at definition time, triton's own library included, and
importing lightning imports triton): ``test_kernels_interpreted.py`` runs this file in a fresh process with
TRITON_INTERPRET=1, at small float32 shapes (~1 s per test); in a process without it these tests skip.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

from hydra_kit.components.pkm import ProductKeyMemory
from hydra_kit.ops.pkm_topk import candidate_pairs, pkm_topk_triton, product_topk, triton_unavailable_reason

pytest.importorskip("triton", reason="triton is not installed (pip install 'hydra-kit[kernels]')")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not INTERPRETED,
    reason="no GPU: run in a fresh process with TRITON_INTERPRET=1 by test_kernels_interpreted.py",
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_topk(q: Tensor, sub_keys: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The PyTorch path of ProductKeyMemory.lookup on explicit tensors: two score tables, product_topk."""
    q1, q2 = q.chunk(2, dim=-1)
    scores1 = torch.einsum("...hd,hnd->...hn", q1, sub_keys[:, 0])
    scores2 = torch.einsum("...hd,hnd->...hn", q2, sub_keys[:, 1])
    rows, cols = (t.to(q.device) for t in candidate_pairs(top_k))
    return product_topk(scores1, scores2, top_k, rows, cols)


def random_inputs(shape: tuple[int, ...], heads: int, n_keys: int, half: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, heads, 2 * half, generator=gen)
    sub_keys = torch.randn(heads, 2, n_keys, half, generator=gen)
    return q.to(DEVICE).requires_grad_(), sub_keys.to(DEVICE).requires_grad_()


def test_kernel_can_run_here() -> None:
    assert triton_unavailable_reason(DEVICE) is None  # interpreter on CPU, compiled kernels on a GPU


# Shapes chosen to hit every masking path: n_keys and d_key/2 not powers of two nor multiples of 16, k = n_keys,
# k = 1, token counts not multiples of the 16-token block, leading batch dimensions.
@pytest.mark.parametrize(
    ("shape", "heads", "n_keys", "half", "top_k"),
    [
        ((2, 9), 2, 8, 8, 4),
        ((37,), 3, 13, 6, 7),
        ((20,), 2, 32, 16, 32),
        ((3, 5), 1, 24, 20, 1),
        ((16,), 4, 128, 64, 32),  # the recipe-sized memory: 16,384 slots, k = 32, d_key = 128
    ],
)
def test_forward_and_backward_match_torch(
    shape: tuple[int, ...], heads: int, n_keys: int, half: int, top_k: int
) -> None:
    q, sub_keys = random_inputs(shape, heads, n_keys, half, seed=n_keys + top_k)
    rows, cols = (t.to(DEVICE) for t in candidate_pairs(top_k))
    scores, slots = pkm_topk_triton(q, sub_keys, top_k, rows, cols)
    ref_scores, ref_slots = torch_topk(q, sub_keys, top_k)
    assert scores.shape == slots.shape == (*shape, heads, top_k)
    assert scores.dtype == q.dtype and slots.dtype == torch.long
    # Continuous random inputs: no ties, so even the order of the slots must agree.
    assert torch.equal(slots, ref_slots)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad((scores * weights).sum(), (q, sub_keys))
    ref_grads = torch.autograd.grad((ref_scores * weights).sum(), (q, sub_keys))
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)
    assert grads[1].abs().sum() > 0  # the check above compares something


def test_shared_sub_keys_accumulate_gradient() -> None:
    # One query against a table whose first half has a single dominant sub-key: all k slots share i1, so the
    # backward must sum k gradients into that sub-key (a scatter that overwrote instead would fail here).
    q, sub_keys = random_inputs((4,), 1, 16, 8, seed=3)
    with torch.no_grad():
        sub_keys[0, 0, 5] = 50 * q[:, 0, :8].mean(0)
    rows, cols = (t.to(DEVICE) for t in candidate_pairs(4))
    scores, slots = pkm_topk_triton(q, sub_keys, 4, rows, cols)
    assert (slots // 16 == 5).all()
    ref_scores, _ = torch_topk(q, sub_keys, 4)
    grad = torch.autograd.grad(scores.sum(), sub_keys)[0]
    ref = torch.autograd.grad(ref_scores.sum(), sub_keys)[0]
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[0, 0, 5], 4 * q[:, 0, :8].sum(0).detach(), rtol=1e-5, atol=1e-5)


def test_no_tokens() -> None:
    q, sub_keys = random_inputs((0,), 2, 8, 8, seed=4)
    rows, cols = (t.to(DEVICE) for t in candidate_pairs(4))
    scores, slots = pkm_topk_triton(q, sub_keys, 4, rows, cols)
    assert scores.shape == slots.shape == (0, 2, 4)
    scores.sum().backward()
    assert sub_keys.grad is not None and not sub_keys.grad.any()


def test_bad_shapes_are_named() -> None:
    q, sub_keys = random_inputs((3,), 2, 8, 8, seed=5)
    rows, cols = candidate_pairs(4)
    with pytest.raises(ValueError, match=r"sub_keys must be \(heads=2, 2, n_keys, d_key/2=8\), got \(2, 2, 8, 4\)"):
        pkm_topk_triton(q, sub_keys[..., :4], 4, rows, cols)
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, n_keys=8\], got 9"):
        pkm_topk_triton(q, sub_keys, 9, rows, cols)


def test_layer_with_triton_backend_matches_torch_backend() -> None:
    """The whole ProductKeyMemory: same weights, backend triton vs torch, output and every gradient."""
    torch.manual_seed(6)
    args = {"n_keys": 12, "top_k": 5, "heads": 2, "d_key": 20, "d_value": 10}
    fast = ProductKeyMemory(16, 0, **args, backend="triton").to(DEVICE)
    slow = ProductKeyMemory(16, 0, **args, backend="torch").to(DEVICE)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 19, 16, device=DEVICE)
    outs = [module(x) for module in (fast, slow)]
    torch.testing.assert_close(outs[0].update, outs[1].update, rtol=1e-5, atol=1e-6)
    for key in outs[1].stats:
        torch.testing.assert_close(outs[0].stats[key], outs[1].stats[key])
    for out in outs:
        out.update.square().sum().backward()
    for (name, p_fast), p_slow in zip(fast.named_parameters(), slow.parameters(), strict=True):
        assert p_fast.grad is not None, name
        torch.testing.assert_close(p_fast.grad, p_slow.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_recipe_scale(dtype: torch.dtype) -> None:
    """Compiled kernel at the recipe's size (4 heads, 16,384 slots, k = 32) on 8K tokens, against torch."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(2, 4096, 4, 128, device="cuda", generator=gen).to(dtype)
    sub_keys = (torch.rand(4, 2, 128, 64, device="cuda", generator=gen) * 2 - 1).div(8).to(dtype)
    rows, cols = (t.cuda() for t in candidate_pairs(32))
    scores, slots = pkm_topk_triton(q, sub_keys, 32, rows, cols)
    ref_scores, ref_slots = torch_topk(q.float(), sub_keys.float(), 32)
    torch.testing.assert_close(scores.float(), ref_scores, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-4)
    # Near-ties may legitimately swap; nearly every selected slot must agree.
    agree = (slots.sort(-1).values == ref_slots.sort(-1).values).float().mean().item()
    assert agree > 0.99
