"""The tri-path block on its own: the gated residual sum (docs/design.md 3.1), state carrying, one-token decoding,
inference-time gate skipping and the per-block diagnostics."""

from __future__ import annotations

import pytest
import torch
from fake_components import CumulativeMeanMixer

from hydra_kit.block import TriPathBlock
from hydra_kit.components.mlp import SwiGLUMLP
from hydra_kit.components.router import TokenRouter

D = 16


def _block(*, router: bool, threshold: float = 0.0, gain: float = 2.0, skip_in_training: bool = False) -> TriPathBlock:
    torch.manual_seed(0)
    components = {"mix": CumulativeMeanMixer(D, 0), "mlp": SwiGLUMLP(D, 0)}
    if router:
        components["router"] = TokenRouter(D, 0, gate_threshold=threshold, gate_gain=gain, skip_in_training=skip_in_training)
    block = TriPathBlock(D, 0, components, layerscale={"mix": 0.8, "mlp": 0.5}, gated={"mlp"})
    if router:  # gates away from 0.5 and different per token, so a wrong gate cannot pass unnoticed
        assert block.router is not None and block.router.gate_proj is not None
        torch.nn.init.normal_(block.router.gate_proj.weight, std=1.0)
    return block


def test_without_a_router_the_block_adds_each_component_scaled_by_its_layerscale():
    block = _block(router=False)
    x = torch.randn(2, 7, D)
    u = block.norm(x)
    expected = x + 0.8 * block.mixers["mix"](u).update + 0.5 * block.mixers["mlp"](u).update
    torch.testing.assert_close(block(x).hidden, expected)


def test_a_router_weights_only_its_gated_components_by_gain_times_gate():
    block = _block(router=True, gain=2.0)
    x = torch.randn(2, 7, D)
    u = block.norm(x)
    assert block.router is not None
    gate = block.router.route(u).gates[..., 0:1]  # (B, L, 1): the one gated component, "mlp"
    assert gate.std() > 0.05  # the gates differ per token
    expected = x + 0.8 * block.mixers["mix"](u).update + 0.5 * 2.0 * gate * block.mixers["mlp"](u).update
    torch.testing.assert_close(block(x).hidden, expected)


def test_a_block_with_no_components_is_the_identity_and_two_routers_are_refused():
    x = torch.randn(1, 3, D)
    torch.testing.assert_close(TriPathBlock(D, 0, {}, layerscale={}, gated=set())(x).hidden, x)
    routers = {"a": TokenRouter(D, 0), "b": TokenRouter(D, 0)}
    with pytest.raises(ValueError, match="at most one router"):
        TriPathBlock(D, 0, routers, layerscale={}, gated=set())


@pytest.mark.parametrize("router", [False, True])
def test_chunks_with_carried_state_and_one_token_steps_equal_the_whole_sequence(router):
    block = _block(router=router).eval()
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        whole = block(x).hidden
        state = block.init_state(2, device=x.device, dtype=x.dtype)
        first = block(x[:, :4], state)
        second = block(x[:, 4:], first.state)
        torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), whole)
        state = block.init_state(2, device=x.device, dtype=x.dtype)
        steps = []
        for t in range(x.shape[1]):
            out = block(x[:, t : t + 1], state, collect_aux=False)
            steps.append(out.hidden)
            state = out.state
        torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)


def test_at_inference_tokens_below_the_gate_threshold_skip_the_component_and_in_training_none_do():
    block = _block(router=True, threshold=0.5)
    x = torch.randn(2, 11, D)
    u = block.norm(x)
    assert block.router is not None
    gate = block.router.route(u).gates[..., 0]  # (B, L)
    skipped = gate < 0.5
    assert skipped.any() and (~skipped).any()
    without_mlp = x + 0.8 * block.mixers["mix"](u).update
    block.eval()
    with torch.no_grad():
        hidden = block(x).hidden
    torch.testing.assert_close(hidden[skipped], without_mlp[skipped])
    assert not torch.allclose(hidden[~skipped], without_mlp[~skipped])
    block.train()
    assert not torch.allclose(block(x).hidden[skipped], without_mlp[skipped])  # training never skips


def test_a_router_that_skips_in_training_computes_only_the_kept_tokens_and_trains_them():
    block = _block(router=True, threshold=0.5, skip_in_training=True).train()
    x = torch.randn(2, 11, D)
    u = block.norm(x)
    assert block.router is not None
    gate = block.router.route(u).gates[..., 0]  # (B, L)
    kept = gate >= 0.5
    assert kept.any() and (~kept).any()
    rows: list[int] = []
    block.mixers["mlp"].register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0] * args[0].shape[1]))
    out = block(x)
    assert rows == [int(kept.sum())]  # only the kept tokens went through the MLP
    expected = x + 0.8 * block.mixers["mix"](u).update + 0.5 * 2.0 * (gate * kept)[..., None] * block.mixers["mlp"](u).update
    torch.testing.assert_close(out.hidden, expected)
    # The budget counts the share actually computed, and its gradient reaches every gate (straight-through).
    torch.testing.assert_close(out.stats["router.kept_mlp"], kept.float().mean())
    budget = block.router.budget_weight * (kept.float().mean() - 0.5) ** 2
    torch.testing.assert_close(out.aux_losses["router.budget"], budget)
    (out.hidden.square().mean() + out.aux_losses["router.budget"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.mixers["mlp"].parameters())
    assert block.router.gate_proj is not None and block.router.gate_proj.bias.grad.abs().sum() > 0


def test_when_no_token_is_kept_the_component_is_not_run_and_reports_no_losses():
    from hydra_kit.components.moe import MixtureOfExperts

    torch.manual_seed(0)
    router = TokenRouter(D, 0, gate_threshold=0.5, skip_in_training=True)
    block = TriPathBlock(D, 0, {"moe": MixtureOfExperts(D, 0, n_experts=2, top_k=1), "router": router}, layerscale={"moe": 0.5}, gated={"moe"})
    assert router.gate_proj is not None
    torch.nn.init.constant_(router.gate_proj.bias, -10.0)  # every gate far below the threshold
    x = torch.randn(2, 5, D)
    out = block(x)
    torch.testing.assert_close(out.hidden, x)
    assert set(out.aux_losses) == {"router.budget"} and all(torch.isfinite(v) for v in out.aux_losses.values())
    assert float(out.stats["router.kept_moe"]) == 0.0
    assert not block.mixers["moe"](x[:, :0]).aux_losses  # an empty input has no load to balance


def test_skip_in_training_without_a_threshold_is_refused():
    with pytest.raises(ValueError, match="skip_in_training needs a gate_threshold above 0"):
        TokenRouter(D, 0, skip_in_training=True)
    with pytest.raises(ValueError, match="explore serves skipped tokens in training, so it needs skip_in_training"):
        TokenRouter(D, 0, gate_threshold=0.5, explore=0.1)
    with pytest.raises(ValueError, match=r"explore must lie in \[0, 1\), got 1.0"):
        TokenRouter(D, 0, gate_threshold=0.5, skip_in_training=True, explore=1.0)


def test_exploration_serves_skipped_tokens_in_training_only_and_their_gates_hear_the_task():
    torch.manual_seed(0)
    router = TokenRouter(D, 0, gate_threshold=0.5, skip_in_training=True, explore=0.5, budget_weight=0.0)
    block = TriPathBlock(D, 0, {"mix": CumulativeMeanMixer(D, 0), "mlp": SwiGLUMLP(D, 0), "router": router}, layerscale={"mix": 0.8, "mlp": 0.5}, gated={"mlp"})
    assert router.gate_proj is not None
    torch.nn.init.constant_(router.gate_proj.bias, -3.0)  # every gate far below the threshold: all skipped
    x = torch.randn(4, 32, D)
    rows: list[int] = []
    block.mixers["mlp"].register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0] * args[0].shape[1]))
    out = block.train()(x)
    assert 0.3 * 128 < rows[0] < 0.7 * 128  # about half of the skipped tokens served
    assert float(out.stats["router.kept_mlp"]) == 0.0  # the budget's share is the policy's: nobody is above it
    out.hidden.square().mean().backward()  # no budget: only the task reaches the gates
    assert router.gate_proj.bias.grad is not None and router.gate_proj.bias.grad.abs().sum() > 0
    rows.clear()
    block.eval()(x)
    assert rows == []  # at inference the threshold alone decides
    router.explore = 0.0
    block.train()(x)
    assert rows == []  # without exploration, nobody is served and no gate hears the task


def test_diagnostics_report_layerscale_update_share_and_gates_per_instance():
    block = _block(router=True)
    x = torch.randn(2, 5, D)
    diagnostics = block(x, diagnostics=True).diagnostics
    assert set(diagnostics) == {"router", "mix", "mlp"}
    assert float(diagnostics["mix"]["layerscale"]) == pytest.approx(0.8)
    assert "gate" not in diagnostics["mix"]  # ungated
    assert diagnostics["mlp"]["gate"].shape == (2 * 5,)
    u = block.norm(x)
    written = (0.8 * block.mixers["mix"](u).update).norm() / x.norm()
    torch.testing.assert_close(diagnostics["mix"]["update_rel_norm"], written.detach())
    assert "gate_mlp" in diagnostics["router"]
