"""The component step ops: each C kernel equals its ``*_reference`` in hydra_kit.ops, which equals the component's step.

The first test of each pair needs no C compiler: it ties the reference beside the kernel to what the component
computes in PyTorch. The second holds the kernel to that reference (and is skipped, saying why, without a compiler).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hydra_kit.components.moe import MixtureOfExperts
from hydra_kit.components.pkm import ProductKeyMemory
from hydra_kit.components.router import TokenRouter
from hydra_kit.components.ssm import SelectiveSSM
from hydra_kit.components.workspace import WorkspaceMemory
from hydra_kit.ops import moe_step, native, pkm_step, router_step, ssm_step, workspace_step
from hydra_kit.protocol import ComponentContext

Calls = Callable[..., Counter[str]]  # the kernel_calls fixture
LEAN = ComponentContext(collect_aux=False)


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _tokens(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ngroups", [1, 2])
def test_ssm_step_reference_is_the_components_step(ngroups: int) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8, ngroups=ngroups), 90)
    x = _tokens(2, 3, 32, seed=91)
    with torch.no_grad(), native.native_kernels(False):
        state = ssm(x).state  # a state that is not all zeros
        stepped = ssm.step(x[:, 0], state)
        pack = ssm._step_pack.get(ssm, ssm._pack_step)
        update, conv, ssm_state = ssm_step.ssm_step_reference(x[:, 0], state.conv, state.ssm, pack, ssm.norm_eps)
    torch.testing.assert_close(update, stepped.update, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv, stepped.state.conv)
    torch.testing.assert_close(ssm_state, stepped.state.ssm, rtol=1e-5, atol=1e-6)


def test_ssm_step_kernel_equals_its_reference(kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8, ngroups=2), 92)
    x = _tokens(3, 2, 32, seed=93)
    calls = kernel_calls(ssm_step.LIBRARY)
    with torch.no_grad():
        state = ssm(x).state
        pack = ssm._step_pack.get(ssm, ssm._pack_step)
        u = x[:, 1].contiguous()
        fused = ssm_step.ssm_step_cpu(u, state.conv, state.ssm, pack, ssm.norm_eps)
        reference = ssm_step.ssm_step_reference(u, state.conv, state.ssm, pack, ssm.norm_eps)
    assert fused is not None and calls["hk_ssm_step"] == 1
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_moe_step_reference_is_the_components_step() -> None:
    moe = _perturbed(MixtureOfExperts(32, 0, n_experts=4, top_k=2, expert_hidden=16), 94)
    x = _tokens(1, 32, seed=95)
    with torch.no_grad(), native.native_kernels(False):
        stepped = moe.step(x, None, LEAN).update
        update, chosen = moe_step.moe_step_reference(x, moe._step_pack.get(moe, moe._pack_step), 2)
    torch.testing.assert_close(update, stepped, rtol=1e-5, atol=1e-6)
    assert chosen.shape == (2,)


def test_moe_step_kernel_equals_its_reference(kernel_calls: Calls) -> None:
    moe = _perturbed(MixtureOfExperts(32, 0, n_experts=4, top_k=2, expert_hidden=16), 96)
    x = _tokens(1, 32, seed=97)
    calls = kernel_calls(moe_step.LIBRARY)
    with torch.no_grad():
        pack = moe._step_pack.get(moe, moe._pack_step)
        fused = moe_step.moe_step_cpu(x, pack, 2)
        update, chosen = moe_step.moe_step_reference(x, pack, 2)
    assert fused is not None and calls["hk_moe_step"] == 1
    torch.testing.assert_close(fused[0], update, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused[1], chosen)


def _router() -> TokenRouter:
    router = TokenRouter(32, 0, temperature=0.7)
    router.configure_gates(["a", "b", "c"])
    return _perturbed(router, 98)  # type: ignore[return-value]


def test_router_step_reference_is_the_routers_route() -> None:
    router, x = _router(), _tokens(2, 3, 32, seed=99)
    with torch.no_grad(), native.native_kernels(False):
        routed = router.route(x, collect_aux=False)
        gates, score = router_step.router_step_reference(x, router._step_pack.get(router, router._pack_step), 0.7)
    torch.testing.assert_close(gates, routed.gates)
    torch.testing.assert_close(score, routed.global_score)


def test_router_step_kernel_equals_its_reference(kernel_calls: Calls) -> None:
    router, x = _router(), _tokens(2, 3, 32, seed=100)
    calls = kernel_calls(router_step.LIBRARY)
    with torch.no_grad():
        pack = router._step_pack.get(router, router._pack_step)
        fused = router_step.router_step_cpu(x, pack, 0.7)
        reference = router_step.router_step_reference(x, pack, 0.7)
    assert fused is not None and calls["hk_router_step"] == 1
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _workspace_read_inputs(seed: int) -> tuple[WorkspaceMemory, Tensor, Tensor]:
    memory = _perturbed(WorkspaceMemory(32, 0, n_slots=4, d_slot=16, chunk_size=4, read_hops=3), seed)
    with torch.no_grad():
        state = memory(_tokens(2, 5, 32, seed=seed + 1)).state
        read_kv = memory.read_kv(state.slots).contiguous()  # (B, S, 2 Ds)
    return memory, _tokens(2, 32, seed=seed + 2), read_kv  # type: ignore[return-value]


def test_workspace_read_reference_is_the_components_read() -> None:
    memory, x, read_kv = _workspace_read_inputs(101)
    with torch.no_grad(), native.native_kernels(False):
        state = memory(_tokens(2, 5, 32, seed=102)).state
        stepped = memory.step(x, state).update
        read_kv = memory.read_kv(state.slots)
        reference = workspace_step.workspace_read_reference(x, read_kv, memory._step_pack.get(memory, memory._pack_step), 3)
    torch.testing.assert_close(reference, stepped, rtol=1e-5, atol=1e-6)


def test_workspace_read_kernel_equals_its_reference(kernel_calls: Calls) -> None:
    memory, x, read_kv = _workspace_read_inputs(103)
    calls = kernel_calls(workspace_step.LIBRARY)
    with torch.no_grad():
        pack = memory._step_pack.get(memory, memory._pack_step)
        fused = workspace_step.workspace_read_cpu(x, read_kv, pack, 3)
        reference = workspace_step.workspace_read_reference(x, read_kv, pack, 3)
    assert fused is not None and calls["hk_workspace_read"] == 1
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


def _pkm_args(memory: ProductKeyMemory, x: Tensor) -> tuple[object, ...]:
    return (
        x, memory.query.weight, memory.query_gain, memory.query_bias, memory.sub_keys, memory.values.weight,
        memory.cand_rows, memory.cand_cols, memory.top_k,
    )  # fmt: skip


def test_pkm_read_reference_is_the_components_read() -> None:
    memory = _perturbed(ProductKeyMemory(32, 0, heads=2, n_keys=8, d_key=16, top_k=4), 104)
    x = _tokens(2, 3, 32, seed=105)
    with torch.no_grad(), native.native_kernels(False):
        update = memory(x, LEAN).update
        reference = pkm_step.pkm_read_reference(*_pkm_args(memory, x))  # type: ignore[arg-type]
    torch.testing.assert_close(reference, update, rtol=1e-5, atol=1e-6)


def test_pkm_read_kernel_equals_its_reference(kernel_calls: Calls) -> None:
    memory = _perturbed(ProductKeyMemory(32, 0, heads=2, n_keys=8, d_key=16, top_k=4), 106)
    x = _tokens(1, 3, 32, seed=107)
    calls = kernel_calls(pkm_step.LIBRARY)
    with torch.no_grad():
        fused = pkm_step.pkm_read_cpu(*_pkm_args(memory, x))  # type: ignore[arg-type]
        reference = pkm_step.pkm_read_reference(*_pkm_args(memory, x))  # type: ignore[arg-type]
    assert fused is not None and calls["hk_pkm_step"] == 1
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
