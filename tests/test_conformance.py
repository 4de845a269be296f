"""The public conformance check on every discovered component, and proof that it catches broken ones."""

from __future__ import annotations

import pytest
from fake_components import CumulativeMeanMixer, ForgetfulMixer, LookAheadMixer

from hydra_kit.registry import discover
from hydra_kit.testing import ConformanceError, check_component

REGISTRY = discover()
EXPECTED_FIRST_PARTY = {"ssm", "sga", "moe", "workspace", "pkm", "router", "attention", "mlp"}


def test_every_first_party_component_loads():
    assert not [f.describe() for f in REGISTRY.failures if f.distribution == "hydra-kit"]
    assert EXPECTED_FIRST_PARTY <= set(REGISTRY.names())


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
