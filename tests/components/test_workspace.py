"""WorkspaceMemory: conformance, per-example state, causal chunk reads, gradients to the writes, read hops."""

from __future__ import annotations

import math

import pytest
import torch

from hydra_kit.components.workspace import WorkspaceMemory
from hydra_kit.testing import check_component


def make(**kwargs) -> WorkspaceMemory:
    torch.manual_seed(0)
    args = {"n_slots": 4, "chunk_size": 8, "read_hops": 2, **kwargs}
    return WorkspaceMemory(32, 0, **args).double().eval()


@pytest.mark.slow
@pytest.mark.parametrize("args", [WorkspaceMemory.example_init_args, {"n_slots": 3, "chunk_size": 5, "read_hops": 1, "d_slot": 24}, {"n_slots": 2, "chunk_size": 7, "read_hops": 3}])
def test_conformance(args):
    # The document-boundary check's second document starts on the write grid (a multiple of chunk_size).
    check_component(WorkspaceMemory, init_args=args, resets_aligned=args["chunk_size"] * (16 // args["chunk_size"]))


def test_examples_do_not_affect_each_other():
    ws = make()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    y = x.clone()
    y[1] = torch.randn(30, 32, dtype=torch.float64)
    torch.testing.assert_close(ws(x).update[0], ws(y).update[0], rtol=0, atol=0)


def test_reads_see_earlier_chunks_but_not_their_own():
    ws = make()
    x = torch.randn(1, 24, 32, dtype=torch.float64)
    base = ws(x).update
    own = x.clone()
    own[:, 9] += 1.0  # a token of chunk 1 (positions 8..15)
    changed = ws(own).update
    # Every other token of chunk 1 reads the state from before chunk 1: the change is invisible to them.
    torch.testing.assert_close(changed[:, :9], base[:, :9], rtol=0, atol=0)
    torch.testing.assert_close(changed[:, 10:16], base[:, 10:16], rtol=0, atol=0)
    assert (changed[:, 16:] - base[:, 16:]).abs().max() > 1e-6  # chunk 2 reads what chunk 1 wrote


def test_gradients_reach_writes_and_initial_slots_from_a_later_chunk():
    ws = make()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    ws(x).update[:, 16:].square().sum().backward()
    for name in ("initial_slots", "write_query.weight", "write_kv.weight", "write_gate.weight", "read_kv.weight"):
        grad = dict(ws.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


def test_more_hops_change_the_read():
    one, two = make(read_hops=1), make(read_hops=2)
    two.load_state_dict(one.state_dict())
    x = torch.randn(1, 24, 32, dtype=torch.float64)
    assert (one(x).update[:, 8:] - two(x).update[:, 8:]).abs().max() > 1e-6


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="workspace: n_slots"):
        WorkspaceMemory(32, 0, n_slots=0)


def test_read_statistics_measure_how_reads_spread_over_slots():
    from hydra_kit.components.workspace import read_statistics

    one_slot = torch.zeros(1, 1, 6, 4)
    one_slot[..., 2] = 1.0
    stats = read_statistics(one_slot, torch.float32)
    assert stats["read_entropy"].item() == 0.0 and stats["slot_usage"].item() == pytest.approx(0.25)
    spread = read_statistics(torch.full((2, 1, 6, 4), 0.25), torch.float32)
    assert stats.keys() == spread.keys()
    assert spread["read_entropy"].item() == pytest.approx(math.log(4)) and spread["slot_usage"].item() == pytest.approx(1.0)
    # Every read on one slot, but a different slot per token: sharp reads, all slots used.
    rotating = torch.eye(4)[torch.arange(8) % 4].view(1, 1, 8, 4)
    stats = read_statistics(rotating, torch.float32)
    assert stats["read_entropy"].item() == 0.0 and stats["slot_usage"].item() == pytest.approx(1.0)


def test_read_statistics_only_when_asked_and_over_the_real_tokens():
    from hydra_kit.protocol import ComponentContext

    torch.manual_seed(0)
    module = WorkspaceMemory(16, 0, n_slots=4, chunk_size=8, read_hops=2)
    x = torch.randn(2, 21, 16)
    assert set(module(x).stats) == {"write_gate"}
    stats = module(x, ComponentContext(diagnostics=True)).stats
    assert {"write_gate", "read_entropy", "slot_usage"} == set(stats)
    assert 0.0 <= stats["read_entropy"].item() <= math.log(4) + 1e-6 and 0.25 - 1e-6 <= stats["slot_usage"].item() <= 1.0 + 1e-6
