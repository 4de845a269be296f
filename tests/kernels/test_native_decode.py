"""The C kernels of hydra_kit.ops (the decoding ops and the components' step kernels) against their PyTorch paths.

Every kernel has a PyTorch path computing the same thing; here each is run both ways on the same inputs
(``native_kernels(False)`` forces the PyTorch path), and each test counts the calls into C (the ``kernel_calls``
fixture of ``conftest.py``) to prove that its kernel ran: without that, a test whose inputs the kernel refuses
compares PyTorch with PyTorch and passes. Without a C compiler these tests are skipped, saying why. CI machines
have a C compiler, so a kernel that fails to build fails here rather than silently decoding on the slow path.
"""

from __future__ import annotations

import copy
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hydra_kit.components.moe import MixtureOfExperts
from hydra_kit.components.ssm import SelectiveSSM
from hydra_kit.ops import (
    Linear,
    chunk_carry,
    decode_attention,
    dispatch,
    moe_step,
    native,
    norm,
    pkm_step,
    residual,
    rotary,
    router_step,
    ssm_mix,
    ssm_step,
    workspace_step,
)
from hydra_kit.ops.linear import LIBRARY as LINEAR_LIBRARY
from hydra_kit.protocol import ComponentContext

LIBRARIES = [
    LINEAR_LIBRARY, decode_attention.LIBRARY, residual.LIBRARY, rotary.LIBRARY, norm.LIBRARY,
    ssm_step.LIBRARY, moe_step.LIBRARY, router_step.LIBRARY, pkm_step.LIBRARY, workspace_step.LIBRARY, ssm_mix.LIBRARY,
    chunk_carry.LIBRARY,
]  # fmt: skip
needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on PATH")
Calls = Callable[..., Counter[str]]  # the kernel_calls fixture


@needs_compiler
@pytest.mark.parametrize("library", LIBRARIES, ids=lambda lib: lib.source.name)
def test_every_kernel_builds_on_a_machine_with_a_compiler(library: native.NativeLibrary) -> None:
    assert library.unavailable_reason() is None


def test_a_kernel_that_does_not_build_says_why_and_callers_fall_back(tmp_path: Path) -> None:
    source = tmp_path / "broken.c"
    source.write_text("void hk_broken(void) { this is not C }\n")
    library = native.NativeLibrary(source, {"hk_broken": []})
    assert library.load() is None
    reason = library.unavailable_reason()
    assert reason is not None and "broken.c" in reason
    assert native._compiler() is None or "error" in reason


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_kernel_equals_f_linear(rows: int, bias: bool, kernel_calls: Calls) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(200, 77, bias=bias)
    x = torch.randn(rows, 1, 200, generator=gen)
    calls = kernel_calls(LINEAR_LIBRARY)
    with torch.no_grad():
        fast = layer(x)
        assert calls["hk_linear"] == 1
        with native.native_kernels(False):
            reference = layer(x)
    assert calls["hk_linear"] == 1
    assert fast.shape == (rows, 1, 77)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_linear_takes_the_pytorch_path_under_autograd_and_for_many_rows(kernel_calls: Calls) -> None:
    layer = Linear(16, 8)
    x = torch.randn(1, 16)
    calls = kernel_calls(LINEAR_LIBRARY)
    assert layer(x).grad_fn is not None  # autograd: F.linear, differentiable
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.randn(dispatch.MAX_ROWS + 1, 16)).shape, torch.Size([9, 8]))
        assert not calls
        layer(x)
        assert calls["hk_linear"] == 1  # and one row does go to C
        assert not dispatch.usable(torch.randn(4, 16).t())  # non-contiguous
        assert not dispatch.usable(x.double())
    with torch.no_grad(), native.native_kernels(False):
        assert not dispatch.usable(x)
    assert native.enabled()


def _attention_by_sdpa(q: torch.Tensor, sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    keys, values = torch.cat([k for k, _, _ in sets], 2), torch.cat([v for _, v, _ in sets], 2)
    mask = torch.cat([torch.ones(k.shape[0], k.shape[2], dtype=torch.bool) if m is None else m for k, _, m in sets], 1)
    return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None])[:, :, 0]


@pytest.mark.parametrize("lengths", [(10, 25), (300, 150)], ids=["short", "many-tiles"])
def test_decode_attention_equals_sdpa_over_masked_strided_sets(lengths: tuple[int, int], kernel_calls: Calls) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, heads, hd = 2, 3, 16
    n_window, n_cache = lengths
    window_k, window_v = torch.randn(2, batch, n_window + 7, heads, hd, generator=gen)  # (B, n, H, hd) buffers
    cache_k, cache_v = torch.randn(2, batch, heads, n_cache + 15, hd, generator=gen)  # (B, H, capacity, hd)
    window_mask = torch.rand(batch, n_window, generator=gen) > 0.4
    window_mask[0, : n_window // 2] = False  # whole tiles of keys that nobody sees
    q = torch.randn(batch, heads, hd, generator=gen)
    window = (window_k[:, 3 : 3 + n_window].transpose(1, 2), window_v[:, 3 : 3 + n_window].transpose(1, 2), window_mask)
    cache = (cache_k[:, :, :n_cache], cache_v[:, :, :n_cache], None)
    calls = kernel_calls(decode_attention.LIBRARY)
    # key-major and head-major sets together (split by keys), and a head-major cache alone (split by heads)
    for sets, split in (([window, cache], "hk_attention_by_key"), ([cache], "hk_attention_by_head"), ([window], "hk_attention_by_key")):
        before = calls[split]
        with torch.no_grad():
            fast = decode_attention.decode_attention(q, sets, hd**-0.5)
        assert calls[split] == before + 1
        torch.testing.assert_close(fast, _attention_by_sdpa(q, sets), rtol=1e-5, atol=1e-5)
    # A (sequence, head) that sees no key gets zeros, not NaN, in either split.
    hidden_window = (window[0], window[1], torch.zeros(batch, n_window, dtype=torch.bool))
    hidden_cache = (cache_k[:, :, :4], cache_v[:, :, :4], torch.zeros(batch, 4, dtype=torch.bool))
    for sets in ([hidden_window], [hidden_cache]):
        with torch.no_grad():
            hidden = decode_attention.decode_attention(q, sets, 1.0)
        assert torch.equal(hidden, torch.zeros_like(q))
    assert sum(calls.values()) == 5


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


@pytest.mark.parametrize("args", [{}, {"ngroups": 2}, {"d_conv": 2}, {"d_conv": 1}], ids=["default", "two-groups", "short-conv", "no-conv"])
def test_ssm_step_kernel_equals_the_pytorch_step(args: dict[str, int], kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(64, 0, d_state=16, headdim=16, **args), 0)
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    calls = kernel_calls(ssm_step.LIBRARY)
    runs = {}
    for flag in (True, False):
        with torch.no_grad(), native.native_kernels(flag):
            state, updates = ssm.init_state(2, device=x.device, dtype=x.dtype), []
            for t in range(24):
                x_t = x[:, t].contiguous()  # as in decoding; a strided slice would send the step to PyTorch
                out = ssm.step(x_t, state)
                updates.append(out.update)
                state = out.state
        runs[flag] = torch.stack(updates, 1), state
        assert calls["hk_ssm_step"] == 24  # every step of the first run, none of the second
    (fast, fast_state), (reference, reference_state) = runs[True], runs[False]
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(fast_state.ssm, reference_state.ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_state.conv, reference_state.conv, rtol=1e-5, atol=1e-5)  # projections: summation order differs


def test_ssm_step_kernel_leaves_the_state_it_was_given_unchanged(kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 2)
    calls = kernel_calls(ssm_step.LIBRARY)
    with torch.no_grad():
        state = ssm.step(torch.randn(1, 32), ssm.init_state(1, device=torch.device("cpu"), dtype=torch.float32)).state
        before = copy.deepcopy(state)
        ssm.step(torch.randn(1, 32), state)
    assert calls["hk_ssm_step"] == 2
    assert torch.equal(state.ssm, before.ssm) and torch.equal(state.conv, before.conv)


@pytest.mark.parametrize(("n_experts", "top_k"), [(8, 2), (4, 1), (6, 3)])
def test_moe_step_kernel_equals_the_pytorch_step(n_experts: int, top_k: int, kernel_calls: Calls) -> None:
    moe = _perturbed(MixtureOfExperts(48, 0, n_experts=n_experts, top_k=top_k, expert_hidden=20), 3)
    lean = ComponentContext(collect_aux=False)
    x = torch.randn(1, 30, 48, generator=torch.Generator().manual_seed(4))
    calls = kernel_calls(moe_step.LIBRARY)
    with torch.no_grad():
        fast = torch.stack([moe.step(x[:, t], None, lean).update for t in range(30)], 1)
        assert calls["hk_moe_step"] == 30
        with native.native_kernels(False):
            reference = torch.stack([moe.step(x[:, t], None, lean).update for t in range(30)], 1)
        assert calls["hk_moe_step"] == 30
        weights = moe_step.pack_moe_step_weights(moe.router.weight, *moe.expert_weights())
        picks = [moe_step.moe_step_cpu(x[:, t], weights, top_k) for t in range(30)]
        expected = torch.stack([moe.router(x[0, t]).softmax(-1).topk(top_k).indices for t in range(30)])
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert all(p is not None for p in picks)
    assert torch.equal(torch.stack([p[1] for p in picks if p is not None]), expected)


def test_moe_kernel_reads_the_weights_after_a_state_dict_is_assigned(kernel_calls: Calls) -> None:
    moe = _perturbed(MixtureOfExperts(32, 0, n_experts=4, top_k=2, expert_hidden=16), 5)
    other = _perturbed(MixtureOfExperts(32, 0, n_experts=4, top_k=2, expert_hidden=16), 6)
    lean = ComponentContext(collect_aux=False)
    x = torch.randn(1, 32)
    calls = kernel_calls(moe_step.LIBRARY)
    with torch.no_grad():
        moe.step(x, None, lean)  # fills the cached weight lists
        moe.load_state_dict(other.state_dict(), assign=True)  # replaces the Parameter objects
        after = moe.step(x, None, lean).update
        assert calls["hk_moe_step"] == 2
        with native.native_kernels(False):
            expected = other.step(x, None, lean).update
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


# The kernels each recipe's decoding step must reach (MoE: one sequence at a time only).
RECIPE_KERNELS = {
    "recipes/full.yaml": ["hk_linear", "hk_rms_norm", "hk_gated_residual", "hk_qkv_rotary", "hk_attention_by_key", "hk_ssm_step", "hk_router_step", "hk_pkm_step", "hk_workspace_read"],
    "recipes/transformer.yaml": ["hk_linear", "hk_rms_norm", "hk_gated_residual", "hk_qkv_rotary", "hk_attention_by_head"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["recipes/full.yaml", "recipes/transformer.yaml"])
@pytest.mark.parametrize("batch", [1, 2])
def test_whole_model_decoding_is_the_same_with_and_without_kernels(recipe: str, batch: int, kernel_calls: Calls) -> None:
    from hydra_kit.bench import build_model

    model = _perturbed(build_model(str(Path(__file__).resolve().parents[2] / recipe)), 15)
    calls = kernel_calls(*LIBRARIES)
    ids = torch.randint(0, model.hparams["vocab_size"], (batch, 72), generator=torch.Generator().manual_seed(7))
    logits, prefill = {}, {}
    for flag in (True, False):
        with torch.inference_mode(), native.native_kernels(flag):
            prefill[flag] = model(ids[:, :40], model.init_state(batch), collect_aux=False).logits
    # The prefill's own kernels (the SSM's, ops.ssm_mix) agree to float rounding; rounding can still flip a top-k
    # choice a few steps later, so both decodings start from one state, the PyTorch path's.
    torch.testing.assert_close(prefill[True], prefill[False], rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), native.native_kernels(False):
        start = model(ids[:, :40], model.init_state(batch), collect_aux=False).state
    for flag in (True, False):
        with torch.inference_mode(), native.native_kernels(flag):
            steps, state = [], copy.deepcopy(start)
            for t in range(40, 72):  # teacher-forced one-token steps
                out = model(ids[:, t : t + 1], state, collect_aux=False)
                steps.append(out.logits)
                state = out.state
        logits[flag] = torch.cat(steps, 1)
        if flag:
            expected = RECIPE_KERNELS[recipe] + (["hk_moe_step"] if batch == 1 and recipe.endswith("full.yaml") else [])
            assert all(calls[name] >= 32 for name in expected), dict(calls)
            reached = sum(calls.values())
    assert sum(calls.values()) == reached  # none with the kernels off
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


def test_compiler_lookup_is_only_a_path_search() -> None:
    assert native._compiler() in {shutil.which("cc"), shutil.which("gcc"), shutil.which("clang")}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_router_kernel_equals_the_pytorch_route(temperature: float, kernel_calls: Calls) -> None:
    from hydra_kit.components.router import TokenRouter

    router = TokenRouter(40, 0, temperature=temperature)
    router.configure_gates(["a", "b", "c"])
    router = _perturbed(router, 8)
    u = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(9))
    calls = kernel_calls(router_step.LIBRARY)
    with torch.no_grad():
        fast = router.route(u, collect_aux=False)
        with native.native_kernels(False):
            reference = router.route(u, collect_aux=False)
    assert calls["hk_router_step"] == 1
    assert fast.gates.shape == reference.gates.shape == (2, 1, 3) and fast.global_score.shape == (2, 1)
    torch.testing.assert_close(fast.gates, reference.gates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.global_score, reference.global_score, rtol=1e-5, atol=1e-5)


def test_gated_residual_kernel_equals_the_pytorch_sum(kernel_calls: Calls) -> None:
    gen = torch.Generator().manual_seed(13)
    x, *updates = torch.randn(4, 3, 40, generator=gen)  # (B, D) input and three updates
    gates = torch.rand(3, 2, generator=gen)  # (B, G)
    scales = [torch.nn.Parameter(torch.tensor(v)) for v in (0.8, 0.2, 0.5)]
    plan = residual.ResidualPlan([None, 1, 0], scales)
    expected = x + scales[0] * updates[0] + scales[1] * gates[:, 1:] * updates[1] + scales[2] * gates[:, :1] * updates[2]
    calls = kernel_calls(residual.LIBRARY)
    with torch.no_grad():
        fast = residual.gated_residual(x, updates, gates, plan)
        with native.native_kernels(False):
            slow = residual.gated_residual(x, updates, gates, plan)
        scales[1].fill_(-3.0)  # the kernel reads the LayerScales' current values, not a copy
        changed = residual.gated_residual(x, updates, gates, plan)
    assert calls["hk_gated_residual"] == 2
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slow, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(changed - fast, -3.2 * gates[:, 1:] * updates[1], rtol=1e-5, atol=1e-5)


def test_rms_norm_kernel_equals_f_rms_norm(kernel_calls: Calls) -> None:
    from hydra_kit.ops import RMSNorm

    layer = _perturbed(RMSNorm(96, eps=1e-5), 10)
    x = torch.randn(3, 1, 96, generator=torch.Generator().manual_seed(11))
    calls = kernel_calls(norm.LIBRARY)
    with torch.no_grad():
        fast = layer(x)
    assert calls["hk_rms_norm"] == 1
    torch.testing.assert_close(fast, F.rms_norm(x, (96,), layer.weight, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [False, True], ids=["one-weight", "q-and-kv-weights"])
def test_qkv_rotary_kernel_equals_projection_then_rope(split: bool, kernel_calls: Calls) -> None:
    from hydra_kit.ops import RotaryEmbedding, apply_rotary
    from hydra_kit.ops.rotary import qkv_rotary, qkv_rotary_reference

    gen = torch.Generator().manual_seed(12)
    batch, heads, hd, d_model, pos = 2, 3, 8, 20, 16_383
    weight = torch.randn(3 * heads * hd, d_model, generator=gen)
    x = torch.randn(batch, d_model, generator=gen)
    rope = RotaryEmbedding(hd)
    parts = (weight[: heads * hd], weight[heads * hd :]) if split else (weight, None)
    calls = kernel_calls(rotary.LIBRARY)
    with torch.no_grad():
        fast = qkv_rotary(x, *parts, rope.inv_freq, heads, pos)
    assert calls["hk_qkv_rotary"] == 1
    q, k, v = (x @ weight.t()).view(batch, 3, heads, hd).unbind(1)
    cos, sin = rope(torch.tensor([pos]))
    reference = torch.stack([apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v], 1)
    assert fast is not None
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(qkv_rotary_reference(x, *parts, rope.inv_freq, heads, pos), reference, rtol=1e-4, atol=1e-4)
    # Keys and values written into a cache slot as well, in either cache layout; nothing else in the cache changes.
    for cache in (torch.zeros(2, batch, heads, 5, hd), torch.zeros(2, batch, 5, heads, hd)):  # (B, H, n, hd), (B, n, H, hd)
        key_slot, value_slot = (cache[0, :, :, 3], cache[1, :, :, 3]) if cache.shape[2] == heads else (cache[0, :, 3], cache[1, :, 3])
        with torch.no_grad():
            again = qkv_rotary(x, *parts, rope.inv_freq, heads, pos, key_slot, value_slot)
        assert again is not None and torch.equal(again, fast)
        torch.testing.assert_close(key_slot, fast[:, 1])
        torch.testing.assert_close(value_slot, fast[:, 2])
        assert int((cache != 0).sum()) == 2 * batch * heads * hd
    assert calls["hk_qkv_rotary"] == 3


@pytest.mark.parametrize(("n_keys", "top_k", "d_value"), [(16, 8, None), (12, 12, 24)])
def test_pkm_kernel_equals_the_pytorch_read(n_keys: int, top_k: int, d_value: int | None, kernel_calls: Calls) -> None:
    from hydra_kit.components.pkm import ProductKeyMemory

    pkm = _perturbed(ProductKeyMemory(32, 0, heads=3, n_keys=n_keys, top_k=top_k, d_key=16, d_value=d_value), 13)
    x = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(14))
    lean = ComponentContext(collect_aux=False)
    calls = kernel_calls(pkm_step.LIBRARY)
    with torch.no_grad():
        fast = pkm(x, lean).update
        with native.native_kernels(False):
            reference = pkm(x, lean).update
    assert calls["hk_pkm_step"] == 1
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("read_hops", [1, 3])
def test_workspace_read_kernel_equals_the_pytorch_step(read_hops: int, kernel_calls: Calls) -> None:
    from hydra_kit.components.workspace import WorkspaceMemory

    memory = _perturbed(WorkspaceMemory(32, 0, n_slots=5, d_slot=24, chunk_size=4, read_hops=read_hops), 17)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(18))
    calls = kernel_calls(workspace_step.LIBRARY)
    with torch.no_grad():
        state = memory(x).state  # slots written from one chunk, two tokens pending
        fast = [memory.step(x[:, t].contiguous(), state) for t in range(2)]  # contiguous, as in decoding
        with native.native_kernels(False):
            reference = [memory.step(x[:, t], state) for t in range(2)]
    assert calls["hk_workspace_read"] == 2
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a.update, b.update, rtol=1e-5, atol=1e-5)
    assert fast[0].state.read_kv is not None  # the slots' keys and values were cached for the next token


def test_cached_kernel_parameters_follow_dtype_moves_and_loads(kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 16)
    x = torch.randn(1, 32)
    calls = kernel_calls(ssm_step.LIBRARY)
    with torch.no_grad():
        state = ssm.init_state(1, device=x.device, dtype=x.dtype)
        ssm.step(x, state)  # builds the cache in float32
        assert ssm._step_pack.get(ssm, ssm._pack_step).suits
        ssm.double()  # a dtype move: the cache is rebuilt, and float64 is not for the kernels
        assert not ssm._step_pack.get(ssm, ssm._pack_step).suits
        state64 = ssm.init_state(1, device=x.device, dtype=torch.float64)
        out = ssm.step(x.double(), state64).update
        reference = ssm(x.double()[:, None]).update[:, 0]
    torch.testing.assert_close(out, reference)
    other = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 17)
    with torch.no_grad():
        ssm.float().load_state_dict(other.state_dict(), assign=True)
        fresh = ssm.init_state(1, device=x.device, dtype=x.dtype)
        fast = ssm.step(x, fresh).update
        with native.native_kernels(False):
            expected = other.step(x, fresh).update
    assert calls["hk_ssm_step"] == 2  # the first float32 step and the one after the load; none in float64
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_reference_equals_sdpa_in_float64() -> None:
    gen = torch.Generator().manual_seed(18)
    keys, values = torch.randn(2, 2, 3, 12, 8, dtype=torch.float64, generator=gen)
    mask = torch.rand(2, 12, generator=gen) > 0.3
    mask[:, 0] = True
    q = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen)
    out = decode_attention.decode_attention(q, [(keys[:, :, :5], values[:, :, :5], None), (keys[:, :, 5:], values[:, :, 5:], mask[:, 5:])], 0.3)
    full_mask = torch.cat([torch.ones(2, 5, dtype=torch.bool), mask[:, 5:]], 1)
    reference = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=full_mask[:, None, None], scale=0.3)[:, :, 0]
    torch.testing.assert_close(out, reference)
