"""Tests of the product-key memory (docs/design.md 3.7)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hydra_kit.components.pkm import ProductKeyMemory, slot_usage_stats
from hydra_kit.ops.pkm_topk import candidate_pairs, product_topk
from hydra_kit.protocol import ComponentPath
from hydra_kit.testing import check_component

SMALL = {"n_keys": 8, "top_k": 4, "heads": 2, "d_key": 16}


def brute_force_topk(module: ProductKeyMemory, x: Tensor) -> tuple[Tensor, Tensor]:
    """Score every one of the n_keys^2 full keys (sub-key pairs concatenated) and take the top-k: the oracle."""
    n, half = module.n_keys, module.d_key // 2
    k1 = module.sub_keys[:, 0, :, None, :].expand(-1, n, n, half)  # (H, n, n, dk/2): first half from i1
    k2 = module.sub_keys[:, 1, None, :, :].expand(-1, n, n, half)  # second half from i2
    full_keys = torch.cat([k1, k2], dim=-1).reshape(module.heads, n * n, module.d_key)  # slot = i1 * n + i2
    scores = torch.einsum("...hd,hsd->...hs", module.queries(x), full_keys)  # (..., H, n^2)
    return scores.topk(module.top_k, dim=-1)


@pytest.mark.slow
def test_conforms() -> None:
    check_component(ProductKeyMemory)


@pytest.mark.parametrize(
    "extra",
    [
        {"sparse_values": True},
        {"d_value": 24},  # output projection
        {"query_dropout": 0.2},
        {"top_k": 8},  # k = n_keys: every sub-key kept
        {"heads": 1, "top_k": 1},
    ],
)
@pytest.mark.slow
def test_conforms_variants(extra: dict) -> None:
    check_component(ProductKeyMemory, init_args={**SMALL, **extra})


def test_class_attributes() -> None:
    assert ProductKeyMemory.path is ComponentPath.MEMORY
    assert ProductKeyMemory.gated_by_router
    assert ProductKeyMemory.layerscale_init == 0.1
    assert ProductKeyMemory(16, 0, **SMALL).pointwise


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"heads": 0}, "heads"),
        ({"n_keys": 0}, "n_keys"),
        ({"d_key": 15}, "d_key"),
        ({"top_k": 9}, "top_k"),
        ({"d_value": 0}, "d_value"),
        ({"value_lr_scale": 0.0}, "value_lr_scale"),
        ({"query_dropout": 1.0}, "query_dropout"),
    ],
)
def test_validation(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"pkm: {argument}"):
        ProductKeyMemory(16, 0, **{**SMALL, **kwargs})


@pytest.mark.parametrize(("n_keys", "top_k", "heads"), [(8, 4, 2), (16, 1, 1), (13, 7, 3), (32, 32, 2), (24, 10, 4)])
def test_product_topk_equals_brute_force(n_keys: int, top_k: int, heads: int) -> None:
    torch.manual_seed(n_keys * 100 + top_k)
    module = ProductKeyMemory(16, 0, n_keys=n_keys, top_k=top_k, heads=heads, d_key=12).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)  # continuous float64 inputs: ties have probability zero
    with torch.no_grad():
        slots, scores = module.lookup(x)
        best_scores, best_slots = brute_force_topk(module, x)
    torch.testing.assert_close(scores, best_scores, rtol=0, atol=1e-12)  # both sorted decreasing
    assert torch.equal(slots.sort(dim=-1).values, best_slots.sort(dim=-1).values)  # same sets


def test_forward_equals_dense_reference() -> None:
    """The whole layer against a dense oracle: softmax over brute-force top-k, weighted value sum, out proj."""
    torch.manual_seed(1)
    module = ProductKeyMemory(16, 0, **SMALL, d_value=10).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        scores, slots = brute_force_topk(module, x)  # (B, L, H, k)
        read = torch.einsum("blhk,blhkd->bld", scores.softmax(-1), module.values.weight[slots])
        expected = module.out(read)
        torch.testing.assert_close(module(x).update, expected, rtol=0, atol=1e-12)


def test_candidate_pairs_are_pruned_and_broken_pruning_is_caught() -> None:
    rows, cols = candidate_pairs(32)
    assert rows.numel() == 119  # sum_a floor(32 / a), vs 1024 for the full k x k grid
    assert ((rows + 1) * (cols + 1) <= 32).all()
    # A candidate set missing admissible pairs (here: only the first row and column) must fail the oracle check.
    gen = torch.Generator().manual_seed(0)
    n, k = 16, 8
    s1, s2 = (
        torch.randn(200, n, generator=gen, dtype=torch.float64),
        torch.randn(200, n, generator=gen, dtype=torch.float64),
    )
    brute = (s1[:, :, None] + s2[:, None, :]).reshape(200, n * n).topk(k).values
    good = product_topk(s1, s2, k, *candidate_pairs(k))[0]
    torch.testing.assert_close(good, brute, rtol=0, atol=1e-12)
    cross = torch.tensor([(a, 0) for a in range(k)] + [(0, b) for b in range(1, k)])
    broken = product_topk(s1, s2, k, cross[:, 0], cross[:, 1])[0]
    assert (broken - brute).abs().max() > 1e-3


def test_usage_stats_on_constructed_case() -> None:
    # 4 slots. Token 1 reads slots 0 and 1 with 0.5 each; token 2 reads slot 0 with 1 and slot 2 with 0.
    slots = torch.tensor([[0, 1], [0, 2]])
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    stats = slot_usage_stats(slots, weights, n_slots=4)
    assert stats["usage_frac"].item() == pytest.approx(0.5)  # slots 0 and 1; slot 2 got zero weight
    # p = (1.5, 0.5, 0, 0) / 2 = (0.75, 0.25, 0, 0); KL(p || 1/4) = 0.75 ln 3 + 0.25 ln 1.
    assert stats["usage_kl"].item() == pytest.approx(0.75 * math.log(3.0), abs=1e-12)
    uniform = slot_usage_stats(torch.arange(4)[None], torch.full((1, 4), 0.25), n_slots=4)
    assert uniform["usage_frac"].item() == 1.0 and uniform["usage_kl"].item() == pytest.approx(0.0, abs=1e-6)
    single = slot_usage_stats(torch.tensor([[3, 3]]), torch.tensor([[0.3, 0.7]]), n_slots=4)
    assert single["usage_frac"].item() == 0.25 and single["usage_kl"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_forward_stats_come_from_the_reads() -> None:
    torch.manual_seed(2)
    module = ProductKeyMemory(16, 0, **SMALL)
    x = torch.randn(2, 9, 16)
    out = module(x)
    slots, scores = module.lookup(x)
    expected = slot_usage_stats(slots, scores.softmax(-1), module.n_slots)
    assert set(out.stats) == {"usage_frac", "usage_kl"}
    for key, value in expected.items():
        torch.testing.assert_close(out.stats[key], value)
        assert not out.stats[key].requires_grad
    assert 0.0 < out.stats["usage_frac"].item() <= 1.0


def test_sparse_values_give_sparse_gradient_equal_to_dense() -> None:
    torch.manual_seed(3)
    dense = ProductKeyMemory(16, 0, **SMALL)
    sparse = ProductKeyMemory(16, 0, **SMALL, sparse_values=True)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 11, 16)
    for module in (dense, sparse):
        (module(x).update ** 2).sum().backward()
    assert not dense.values.weight.grad.is_sparse
    assert sparse.values.weight.grad.is_sparse
    torch.testing.assert_close(sparse.values.weight.grad.to_dense(), dense.values.weight.grad)
    for (name, p_dense), p_sparse in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        if name != "values.weight":
            torch.testing.assert_close(p_sparse.grad, p_dense.grad)


def test_optimiser_hints_on_parameters() -> None:
    module = ProductKeyMemory(16, 0, **SMALL, value_lr_scale=7.5).double()  # hints survive dtype conversion
    assert module.values.weight._hydra_lr_scale == 7.5
    assert module.values.weight._hydra_no_weight_decay is True
    assert not hasattr(module.query.weight, "_hydra_lr_scale")
    assert ProductKeyMemory(16, 0, **SMALL).values.weight._hydra_lr_scale == 10.0  # the default


def test_value_init_and_parameter_accounting() -> None:
    torch.manual_seed(4)
    module = ProductKeyMemory(64, 0, n_keys=32, top_k=8, heads=2, d_key=16, d_value=48)
    assert module.values.weight.shape == (32 * 32, 48)
    assert module.values.weight.std().item() == pytest.approx(48**-0.5, rel=0.05)
    dense = 64 * 2 * 16 + 2 * 2 * 16 + 2 * 2 * 32 * 8 + 48 * 64  # query, norm affine, sub-keys, out proj
    assert module.active_parameters() == dense + 2 * 8 * 48
    assert sum(p.numel() for p in module.parameters()) == dense + 32 * 32 * 48
    pairs = candidate_pairs(8)[0].numel()
    assert module.flops_per_token(100) == 2 * 64 * 32 + 2 * 2 * 32 * 16 + 2 * pairs + 2 * 2 * 8 * 48 + 2 * 48 * 64


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, Tensor) and not t.is_sparse]
        self.largest = max([self.largest, *sizes])
        return out


def test_no_tokens_by_slots_tensor_is_built() -> None:
    # 262,144 slots, 128 tokens: a (tokens, slots) score tensor would hold 33.5M elements per head; the value
    # table (and its gradient) holds 262,144 x 8 = 2.1M, the largest tensor the layer should ever touch.
    torch.manual_seed(5)
    module = ProductKeyMemory(8, 0, n_keys=512, top_k=8, heads=2, d_key=16)
    x = torch.randn(2, 64, 8, requires_grad=True)
    with _LargestOutput() as recorder:
        module(x).update.square().sum().backward()
    assert module.values.weight.grad is not None
    assert recorder.largest <= module.n_slots * module.d_value < 2 * 64 * module.n_slots
    # The recorder does catch dense scoring: the brute-force oracle builds (B, L, H, n_slots).
    small = ProductKeyMemory(8, 0, **SMALL)
    with _LargestOutput() as recorder, torch.no_grad():
        brute_force_topk(small, torch.randn(2, 64, 8))
    assert recorder.largest >= 2 * 64 * small.n_slots


# Backend selection (the kernel's parity with the torch path is tested in tests/kernels/test_pkm_topk.py).


def test_backend_name_is_validated() -> None:
    with pytest.raises(ValueError, match=r"pkm: backend must be one of \['auto', 'torch', 'triton'\], got 'cuda'"):
        ProductKeyMemory(16, 0, **SMALL, backend="cuda")  # type: ignore[arg-type]


def test_triton_backend_without_triton_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # what an environment without triton looks like to imports
    with pytest.raises(ValueError, match=r"pkm: backend 'triton' is unavailable: triton is not installed.*kernels"):
        ProductKeyMemory(16, 0, **SMALL, backend="triton")
    auto = ProductKeyMemory(16, 0, **SMALL, backend="auto")  # falls back to torch without a word
    assert auto.backend == "auto" and auto(torch.randn(1, 3, 16)).update.shape == (1, 3, 16)


def test_triton_backend_without_gpu_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter would make triton usable on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"pkm: backend 'triton' is unavailable: no CUDA GPU is visible"):
        ProductKeyMemory(16, 0, **SMALL, backend="triton")
    # "auto" on CPU tensors takes the torch path: bit-identical to backend "torch".
    torch.manual_seed(7)
    auto = ProductKeyMemory(16, 0, **SMALL, backend="auto")
    plain = ProductKeyMemory(16, 0, **SMALL, backend="torch")
    plain.load_state_dict(auto.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.equal(auto(x).update, plain(x).update)
    assert "backend=auto" in repr(auto)


def test_triton_backend_on_cpu_tensors_fails_at_call(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = ProductKeyMemory(16, 0, **SMALL, backend="triton")  # the interpreter makes it constructible on CPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"pkm_topk_triton cannot run: the tensors are on cpu.*CUDA"):
        module(torch.randn(1, 2, 16))
