"""PackedWeights, the kernel-weight cache a module owns: it never hands out weights the module no longer has.

The first group needs no C compiler (the cache alone); the second runs the C step kernels and compares them with
the PyTorch steps after ``p.data = ...`` and under ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hydra_kit.components.moe import MixtureOfExperts
from hydra_kit.components.ssm import SelectiveSSM
from hydra_kit.ops import Linear, PackedWeights, moe_step, native, ssm_step
from hydra_kit.ops.packed import Reader
from hydra_kit.protocol import ComponentContext

Calls = Callable[..., Counter[str]]  # the kernel_calls fixture


class _Owner(nn.Module):
    """A module whose pack is the sum of two weights (a stand-in for a kernel's packed weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Parameter(torch.ones(2, 3))
        self.builds = 0
        self._pack_cache: PackedWeights[Tensor] = PackedWeights()

    def _pack(self, read: Reader) -> Tensor:
        self.builds += 1
        return (read("a.weight") + read("b")).detach()

    def forward(self, x: Tensor) -> Tensor:  # (N, 3) -> (N, 2)
        return x @ self._pack_cache.get(self, self._pack).t()


def _expected(owner: _Owner, x: Tensor) -> Tensor:
    return x @ (owner.a.weight + owner.b).detach().t()


def test_the_pack_is_built_once_while_nothing_changes() -> None:
    owner, x = _Owner(), torch.randn(4, 3)
    for _ in range(3):
        torch.testing.assert_close(owner(x), _expected(owner, x))
    assert owner.builds == 1


def test_replacing_p_data_rebuilds_the_pack() -> None:
    owner, x = _Owner(), torch.randn(4, 3)
    owner(x)
    owner.a.weight.data = torch.randn(2, 3)  # a new storage, the same Parameter object, its version unchanged
    torch.testing.assert_close(owner(x), _expected(owner, x))
    assert owner.builds == 2


def test_a_view_of_another_shape_in_p_data_rebuilds_the_pack() -> None:
    owner = _Owner()
    owner(torch.randn(1, 3))
    owner.b.data = torch.randn(2, 4)[:, :3].contiguous()
    owner(torch.randn(1, 3))
    owner.a.weight.data = owner.a.weight.data[:1]  # same data pointer and version, another shape
    x = torch.randn(5, 3)
    torch.testing.assert_close(owner(x), _expected(owner, x))  # a stale pack would still add a's second row
    assert owner.builds == 3


def test_functional_call_uses_the_weights_it_was_given_and_then_the_modules_again() -> None:
    owner, x = _Owner(), torch.randn(4, 3)
    before = owner(x)
    other = {"a.weight": torch.randn(2, 3), "b": torch.randn(2, 3)}
    out = functional_call(owner, other, (x,))
    torch.testing.assert_close(out, x @ (other["a.weight"] + other["b"]).t())
    torch.testing.assert_close(owner(x), before)  # the module's own weights are back


def test_in_place_writes_replaced_parameters_and_submodules_rebuild_the_pack() -> None:
    owner, x = _Owner(), torch.randn(4, 3)
    owner(x)
    with torch.no_grad():
        owner.b.mul_(3.0)  # in place: the version counter moves
    torch.testing.assert_close(owner(x), _expected(owner, x))
    owner.b = nn.Parameter(torch.randn(2, 3))  # a new Parameter object
    torch.testing.assert_close(owner(x), _expected(owner, x))
    owner.a = nn.Linear(3, 2, bias=False)  # a new submodule
    torch.testing.assert_close(owner(x), _expected(owner, x))
    owner.double()  # a dtype move
    torch.testing.assert_close(owner(x.double()), _expected(owner, x.double()))
    assert owner.builds == 5


def test_a_copy_or_a_pickle_starts_empty() -> None:
    owner, x = _Owner(), torch.randn(4, 3)
    owner(x)
    twin = copy.deepcopy(owner)
    assert twin._pack_cache._pack is None
    with torch.no_grad():
        twin.b.mul_(-1.0)
    torch.testing.assert_close(twin(x), _expected(twin, x))
    loaded = pickle.loads(pickle.dumps(owner))
    assert loaded._pack_cache._pack is None
    torch.testing.assert_close(loaded(x), _expected(owner, x))


def test_reading_a_missing_attribute_names_it() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cache: PackedWeights[Any] = PackedWeights()

    broken = Broken()
    try:
        broken.cache.get(broken, lambda read: read("nope.weight"))
    except AttributeError as err:
        assert "nope" in str(err) and "Broken" in str(err)
    else:
        raise AssertionError("reading a missing attribute did not raise")


# ---------------------------------------------------------------------------------------------------------------
# The C step kernels follow p.data and functional_call


class _Stepper(nn.Module):
    """Calls a component's one-token ``step``, so that ``functional_call`` can run it with other weights."""

    def __init__(self, component: nn.Module) -> None:
        super().__init__()
        self.component = component

    def forward(self, x: Tensor, state: Any, context: ComponentContext | None = None) -> Tensor:
        return self.component.step(x, state, context).update  # type: ignore[operator]


def _ssm() -> SelectiveSSM:
    ssm = SelectiveSSM(32, 0, d_state=8, headdim=8)
    with torch.no_grad():
        for i, p in enumerate(ssm.parameters()):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + i)))
    return ssm.eval()


def test_the_ssm_kernel_follows_a_replaced_p_data(kernel_calls: Calls) -> None:
    ssm, x = _ssm(), torch.randn(2, 32, generator=torch.Generator().manual_seed(60))
    calls = kernel_calls(ssm_step.LIBRARY)
    with torch.no_grad():
        state = ssm.init_state(2, device=x.device, dtype=x.dtype)
        before = ssm.step(x, state).update  # the pack is built here
        ssm.out_proj.weight.data = torch.randn(ssm.out_proj.weight.shape, generator=torch.Generator().manual_seed(61))
        fast = ssm.step(x, state).update
        with native.native_kernels(False):
            reference = ssm.step(x, state).update
    assert calls["hk_ssm_step"] == 2
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, before)


def test_the_ssm_kernel_follows_functional_call(kernel_calls: Calls) -> None:
    ssm, x = _ssm(), torch.randn(2, 32, generator=torch.Generator().manual_seed(62))
    stepper = _Stepper(ssm)
    other = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(70 + i)) * 0.3 for i, (name, p) in enumerate(stepper.named_parameters())}
    twin = copy.deepcopy(stepper)
    twin.load_state_dict(other)
    calls = kernel_calls(ssm_step.LIBRARY)
    with torch.no_grad():
        state = ssm.init_state(2, device=x.device, dtype=x.dtype)
        own = stepper(x, state)  # the pack of the module's own weights is built here
        fast = functional_call(stepper, other, (x, state))
        again = stepper(x, state)
        with native.native_kernels(False):
            reference = twin(x, state)
    assert calls["hk_ssm_step"] == 3
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, own)  # and the module's own weights afterwards


def test_the_moe_kernel_follows_p_data_and_functional_call(kernel_calls: Calls) -> None:
    moe = MixtureOfExperts(32, 0, n_experts=4, top_k=2, expert_hidden=16).eval()
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(63))
    lean = ComponentContext(collect_aux=False)
    stepper = _Stepper(moe)
    calls = kernel_calls(moe_step.LIBRARY)
    with torch.no_grad():
        before = stepper(x, None, lean)
        moe.experts[1].down.weight.data = torch.randn(32, 16, generator=torch.Generator().manual_seed(64))
        moe.router.weight.data = torch.randn(4, 32, generator=torch.Generator().manual_seed(65))
        fast = stepper(x, None, lean)
        with native.native_kernels(False):
            reference = stepper(x, None, lean)
        other = {"component.experts.0.gate_up.weight": torch.randn(32, 32, generator=torch.Generator().manual_seed(66))}
        called = functional_call(stepper, other, (x, None, lean))
        with native.native_kernels(False):
            called_reference = functional_call(stepper, other, (x, None, lean))
    assert calls["hk_moe_step"] == 3
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, before)
    torch.testing.assert_close(called, called_reference, rtol=1e-5, atol=1e-5)


def test_a_module_with_a_pack_pickles(kernel_calls: Calls) -> None:
    ssm = _ssm()
    kernel_calls(ssm_step.LIBRARY)
    with torch.no_grad():
        ssm.step(torch.randn(1, 32), ssm.init_state(1, device=torch.device("cpu"), dtype=torch.float32))
    torch.save(ssm, io.BytesIO())
    assert isinstance(ssm.in_proj, Linear)


def test_block_decoding_follows_functional_call(kernel_calls: Calls) -> None:
    from pathlib import Path

    from hydra_kit.bench import build_model
    from hydra_kit.ops.residual import LIBRARY as RESIDUAL

    model = build_model(str(Path(__file__).resolve().parents[2] / "recipes/tiny.yaml")).eval()
    ids = torch.randint(0, model.hparams["vocab_size"], (1, 3), generator=torch.Generator().manual_seed(67))
    name = next(iter(model.blocks[0].layerscale))
    other = {f"blocks.0.layerscale.{name}": torch.tensor(-2.0), "blocks.0.norm.weight": torch.rand(model.blocks[0].norm.weight.shape) + 0.5}
    twin = copy.deepcopy(model)
    twin.load_state_dict(other, strict=False)

    def decode(run: Callable[[Tensor, Any], Any], init: Any) -> Tensor:
        with torch.inference_mode():
            state, logits = init, []
            for t in range(ids.shape[1]):
                out = run(ids[:, t : t + 1], state)
                logits.append(out.logits)
                state = out.state
        return torch.cat(logits, 1)

    calls = kernel_calls(RESIDUAL)
    own = decode(lambda x, s: model(x, s, collect_aux=False), model.init_state(1))  # the plans are built here
    called = decode(lambda x, s: functional_call(model, other, (x, s), {"collect_aux": False}), model.init_state(1))
    with native.native_kernels(False):
        reference = decode(lambda x, s: twin(x, s, collect_aux=False), twin.init_state(1))
    assert calls["hk_gated_residual"] == 2 * 2 * ids.shape[1]  # two blocks, two runs with the kernels on
    torch.testing.assert_close(called, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(called, own, atol=1e-3)
    torch.testing.assert_close(decode(lambda x, s: model(x, s, collect_aux=False), model.init_state(1)), own)
