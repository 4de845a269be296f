"""The public conformance check on every discovered component, and proof that it catches broken ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fake_components import CumulativeMeanMixer, ForgetfulMixer, LookAheadMixer
from torch import Tensor

from hydra_kit.protocol import ComponentContext, ComponentOutput
from hydra_kit.registry import discover
from hydra_kit.testing import ConformanceError, check_component

REGISTRY = discover()
EXPECTED_FIRST_PARTY = {"ssm", "sga", "moe", "workspace", "pkm", "router", "attention", "mlp"}


def test_every_first_party_component_loads():
    assert not [f.describe() for f in REGISTRY.failures if f.distribution == "hydra-kit"]
    assert EXPECTED_FIRST_PARTY <= set(REGISTRY.names())


@pytest.mark.slow
@pytest.mark.parametrize("name", REGISTRY.names())
def test_component_conforms(name):
    check_component(REGISTRY.entries[name].cls)


def test_a_correct_fake_passes():
    check_component(CumulativeMeanMixer)


def test_lookahead_is_caught():
    with pytest.raises(ConformanceError, match="not causal"):
        check_component(LookAheadMixer)


def test_ignoring_the_state_is_caught():
    with pytest.raises(ConformanceError, match="chunked forward with carried state"):
        check_component(ForgetfulMixer)


def test_non_component_factory_is_caught():
    with pytest.raises(ConformanceError, match="not a TriPathComponent"):
        check_component(lambda d, i: object())


# ------------------------------------------------------------ issue 18, item 5: the module as constructed, typed args
class Float64BufferMixer(CumulativeMeanMixer):
    """Broken on purpose: a float64 buffer. The check's casts hid it, and the float32 model's fit then failed."""

    def __init__(self, d_model: int, layer_idx: int, *, scale: float = 1.0) -> None:
        super().__init__(d_model, layer_idx, scale=scale)
        self.register_buffer("decay", torch.linspace(0.5, 1.0, d_model, dtype=torch.float64))

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: Any = None) -> ComponentOutput:
        out = super().forward(x, context, state)
        return ComponentOutput(out.update * self.decay, state=out.state)


class UntypedMixer(CumulativeMeanMixer):
    """Broken on purpose: a hyper-parameter without a type annotation (a recipe could pass it anything)."""

    def __init__(self, d_model: int, layer_idx: int, *, scale=1.0) -> None:  # type: ignore[no-untyped-def]
        super().__init__(d_model, layer_idx, scale=scale)


class KwargsMixer(CumulativeMeanMixer):
    """Broken on purpose: **kwargs swallows misspelt hyper-parameters."""

    def __init__(self, d_model: int, layer_idx: int, *, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(d_model, layer_idx, scale=scale)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_a_float64_buffer_is_caught_as_constructed():
    with pytest.raises(ConformanceError, match=r"buffer 'decay' is torch\.float64 as constructed, but models are built and trained in torch\.float32"):
        check_component(Float64BufferMixer)
    # What the check stands for: a float32 HydraLM holding it cannot train.
    from hydra_kit.model import HydraLM
    from hydra_kit.registry import ComponentEntry, Registry

    registry = Registry({"f64": ComponentEntry("f64", Float64BufferMixer, "hydra-kit-tests", "0", "test_conformance:Float64BufferMixer")})
    import hydra_kit.model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hydra_kit.model, "default_registry", lambda third_party=None: registry)
        model = HydraLM(vocab_size=16, d_model=8, n_blocks=2, components={"mix": {"component": "f64"}})
    ids = torch.randint(0, 16, (2, 6))
    with pytest.raises(RuntimeError):
        model._shared_step({"input_ids": ids, "targets": ids}, "train")


def test_a_module_that_fails_as_constructed_is_named():
    class HalfWired(CumulativeMeanMixer):
        def __init__(self, d_model: int, layer_idx: int, *, scale: float = 1.0) -> None:
            super().__init__(d_model, layer_idx, scale=scale)
            self.proj = torch.nn.Linear(d_model, d_model).double()  # a float64 parameter: cast away by .to(dtype)

    with pytest.raises(ConformanceError, match=r"HalfWired: parameter 'proj\.weight' is torch\.float64 as constructed"):
        check_component(HalfWired)


@pytest.mark.parametrize(("cls", "match"), [(UntypedMixer, r"UntypedMixer.__init__: keyword\(s\) scale have no type annotation"), (KwargsMixer, r"KwargsMixer.__init__ takes \*\*kwargs")])
def test_untyped_or_open_constructor_is_caught(cls, match):
    with pytest.raises(ConformanceError, match=match):
        check_component(cls)
