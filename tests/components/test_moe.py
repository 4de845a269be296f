"""Tests of the mixture of experts (docs/design.md 3.5)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from recompute_check import assert_recompute_keeps_gradients
from torch import Tensor, nn

from hydra_kit.components import moe as moe_module
from hydra_kit.components.mlp import SwiGLUMLP
from hydra_kit.components.moe import MixtureOfExperts, MoEState
from hydra_kit.protocol import ComponentContext, ComponentPath
from hydra_kit.testing import ConformanceError, check_component

SMALL = dict(MixtureOfExperts.example_init_args)  # E = 4, k = 2, H = 16, chunk 8, capacity window 16
VARIANTS: list[dict[str, Any]] = [
    {},
    {"routing": "chunk"},
    {"capacity_factor": 0.75},
    {"routing": "chunk", "capacity_factor": 1.0},
    {"routing": "chunk", "chunk_size": 5, "top_k": 3, "capacity_factor": 0.5, "capacity_window": 7},
]


def build(seed: int = 0, d_model: int = 16, **kwargs: object) -> MixtureOfExperts:
    torch.manual_seed(seed)
    return MixtureOfExperts(d_model, 0, **{**SMALL, **kwargs}).double()  # type: ignore[arg-type]


def randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_gates(module: MixtureOfExperts, x: Tensor) -> Tensor:
    """Dense (B, L, E) combination weights, from explicit loops over chunks and positions: the routing oracle."""
    batch, seq_len, d_model = x.shape
    route_in = x
    if module.routing == "chunk":
        size = module.chunk_size
        route_in = torch.empty_like(x)
        for c in range(math.ceil(seq_len / size)):
            past = module.start_summary.expand(batch, d_model) if c == 0 else x[:, (c - 1) * size : c * size].mean(1)
            route_in[:, c * size : (c + 1) * size] = F.rms_norm(past, (d_model,), eps=1e-6)[:, None]
    top_p, idx = module.router(route_in).softmax(-1).topk(module.top_k, dim=-1)
    gates = torch.zeros(batch, seq_len, module.n_experts, dtype=x.dtype)
    gates.scatter_(-1, idx, top_p / top_p.sum(-1, keepdim=True))
    if module.capacity is not None:
        for b in range(batch):
            taken: dict[tuple[int, int], int] = {}
            for t in range(seq_len):  # first come first served inside each window
                for e in idx[b, t].tolist():
                    key = (t // module.capacity_window, e)
                    if taken.get(key, 0) >= module.capacity:
                        gates[b, t, e] = 0.0
                    taken[key] = taken.get(key, 0) + 1
    return gates


def dense_reference(module: MixtureOfExperts, x: Tensor, keep: Tensor | None = None) -> Tensor:
    """Every expert on every token, combined with the top-k weights."""
    gates = reference_gates(module, x)  # (B, L, E)
    if keep is not None:
        gates = gates * keep[..., None]
    every = torch.stack([expert(x) for expert in module.experts], dim=-2)  # (B, L, E, D)
    return (gates[..., None] * every).sum(-2)


def rows_seen(module: MixtureOfExperts, x: Tensor, context: ComponentContext | None = None) -> list[Tensor]:
    """The input rows each expert's forward received during one MoE forward."""
    seen: list[list[Tensor]] = [[] for _ in module.experts]
    hooks = [
        expert.register_forward_hook(lambda _m, args, _out, e=e: seen[e].append(args[0].detach()))
        for e, expert in enumerate(module.experts)
    ]
    try:
        module(x, context)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(rows) if rows else x.new_zeros(0, x.shape[-1]) for rows in seen]


def check_experts_see_only_their_tokens(module: MixtureOfExperts, x: Tensor, keep: Tensor | None = None) -> None:
    """Expert e must receive exactly the rows of the tokens routed (and admitted) to it, in position order."""
    gates = reference_gates(module, x)  # zero where not routed or dropped by the capacity
    if keep is not None:
        gates = gates * keep[..., None]
    seen = rows_seen(module, x, ComponentContext(keep=keep))
    flat_x, flat_g = x.reshape(-1, x.shape[-1]), gates.reshape(-1, module.n_experts)
    for e, rows in enumerate(seen):
        expected = flat_x[flat_g[:, e] > 0]
        if rows.shape != expected.shape or not torch.equal(rows, expected):
            raise AssertionError(f"expert {e} saw {rows.shape[0]} rows, expected its {expected.shape[0]} tokens")


@pytest.mark.slow
def test_conforms() -> None:
    check_component(MixtureOfExperts)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [*VARIANTS[1:], {"top_k": 1, "n_experts": 3}, {"top_k": 4}])
def test_conforms_variants(extra: dict) -> None:
    args = {**SMALL, **extra}
    # The document-boundary check's second document starts on both grids (routing chunks, capacity windows).
    check_component(MixtureOfExperts, init_args=args, resets_aligned=math.lcm(args["chunk_size"], args["capacity_window"]))


def test_conformance_exercises_capacity_drops() -> None:
    # The conformance check above is only meaningful for capacity if drops happen within its 40 tokens.
    for extra in VARIANTS[2:]:
        module = build(**extra)
        assert module(randn(2, 40, 16)).stats["dropped_frac"] > 0.05, extra


def test_class_attributes() -> None:
    assert MixtureOfExperts.path is ComponentPath.CHANNEL
    assert MixtureOfExperts.gated_by_router
    assert MixtureOfExperts.layerscale_init == 0.5
    assert build().pointwise and build().init_state(2, device=torch.device("cpu"), dtype=torch.float64) is None
    for extra in VARIANTS[1:]:
        assert not build(**extra).pointwise
        assert isinstance(build(**extra).init_state(2, device=torch.device("cpu"), dtype=torch.float64), MoEState)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n_experts": 0}, "n_experts"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5}, "top_k"),
        ({"expert_hidden": 0}, "expert_hidden"),
        ({"routing": "sequence"}, "routing"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_window": 0}, "capacity_window"),
        ({"load_balance_weight": -1.0}, "load_balance_weight"),
    ],
)
def test_validation(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"moe: {argument}"):
        MixtureOfExperts(16, 0, **{**SMALL, **kwargs})


@pytest.mark.parametrize("extra", VARIANTS)
def test_sparse_dispatch_equals_dense_reference(extra: dict) -> None:
    module = build(**extra)
    x = randn(3, 37, 16)
    torch.testing.assert_close(module(x).update, dense_reference(module, x), rtol=0, atol=1e-12)
    keep = torch.rand(3, 37, generator=torch.Generator().manual_seed(5)) < 0.6
    out = module(x, ComponentContext(keep=keep)).update
    torch.testing.assert_close(out, dense_reference(module, x, keep), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[keep], module(x).update[keep], rtol=0, atol=1e-12)  # kept tokens unchanged


@pytest.mark.parametrize("extra", VARIANTS)
def test_each_expert_runs_only_on_its_tokens(extra: dict) -> None:
    module = build(**extra)
    x = randn(2, 40, 16)
    check_experts_see_only_their_tokens(module, x)
    keep = torch.rand(2, 40, generator=torch.Generator().manual_seed(3)) < 0.5
    check_experts_see_only_their_tokens(module, x, keep)  # skipped tokens are never dispatched
    total = sum(rows.shape[0] for rows in rows_seen(module, x))
    assert total <= 2 * 40 * module.top_k  # k rows per token at most, not E


def test_dense_dispatch_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def dense_dispatch(x: Tensor, experts: nn.ModuleList, expert_idx: Tensor, weight: Tensor, active: Tensor | None):
        gates = torch.zeros(x.shape[0], len(experts), dtype=x.dtype).scatter(1, expert_idx, weight.to(x.dtype))
        if active is not None:
            gates = gates.scatter(1, expert_idx, gates.gather(1, expert_idx) * active)
        return sum(gates[:, e, None] * expert(x) for e, expert in enumerate(experts))

    module = build()
    x = randn(2, 40, 16)
    monkeypatch.setattr(moe_module, "dispatch", dense_dispatch)
    torch.testing.assert_close(module(x).update, dense_reference(module, x))  # same numbers: only the work differs
    with pytest.raises(AssertionError, match="expert 0 saw 80 rows"):
        check_experts_see_only_their_tokens(module, x)


def constructed(imbalanced: bool, a: float = 3.0, b: float = 2.0, **kwargs: object) -> tuple[MixtureOfExperts, Tensor]:
    """E = D = 4, k = 2, identity router: token t's logits are x_t. Token t prefers experts (t, t + 1) mod 4,
    or (0, 1) for every token when ``imbalanced``."""
    module = MixtureOfExperts(4, 0, n_experts=4, top_k=2, expert_hidden=8, **kwargs).double()  # type: ignore[arg-type]
    with torch.no_grad():
        module.router.weight.copy_(torch.eye(4))
    x = torch.zeros(1, 8, 4, dtype=torch.float64)
    for t in range(8):
        shift = 0 if imbalanced else t % 4
        x[0, t, shift], x[0, t, (shift + 1) % 4] = a, b
    return module, x


def test_load_balance_loss_values_and_gradient() -> None:
    a, b = 3.0, 2.0
    pa, pb = (math.exp(v) / (math.exp(a) + math.exp(b) + 2) for v in (a, b))
    balanced, x_bal = constructed(False, a, b, load_balance_weight=1.0)
    skewed, x_skew = constructed(True, a, b, load_balance_weight=1.0)
    loss_bal = balanced(x_bal).aux_losses["load_balance"]
    loss_skew = skewed(x_skew).aux_losses["load_balance"]
    # Balanced: f_e = P_e = 1/4, E * sum f P = 1. Skewed: f = (1/2, 1/2, 0, 0), P = (pa, pb, p0, p0).
    torch.testing.assert_close(loss_bal, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(loss_skew, torch.tensor(4 * (pa + pb) / 2, dtype=torch.float64))
    assert loss_skew > 1.5 * loss_bal
    loss_skew.backward()
    grad = skewed.router.weight.grad
    assert grad is not None and grad.abs().sum() > 1e-3
    with torch.no_grad():  # the gradient pushes towards balance: a small step lowers the loss
        skewed.router.weight -= 0.1 * grad
    assert skewed(x_skew).aux_losses["load_balance"] < loss_skew


def test_z_loss_and_weights() -> None:
    module, x = constructed(True, load_balance_weight=0.5, z_loss_weight=0.25)
    out = module(x)
    torch.testing.assert_close(out.aux_losses["z_loss"], 0.25 * torch.logsumexp(x, -1).square().mean())
    unweighted = constructed(True, load_balance_weight=1.0)[0](x).aux_losses["load_balance"]
    torch.testing.assert_close(out.aux_losses["load_balance"], 0.5 * unweighted)


def test_load_stats_match_constructed_routing() -> None:
    for imbalanced, expected in ((False, [0.25] * 4), (True, [0.5, 0.5, 0.0, 0.0])):
        module, x = constructed(imbalanced)
        stats = module(x).stats
        assert [stats[f"load_e{i}"].item() for i in range(4)] == pytest.approx(expected)
        probs = x.softmax(-1)
        torch.testing.assert_close(stats["router_entropy"], -(probs * probs.log()).sum(-1).mean())
    for extra in VARIANTS:
        stats = build(**extra)(randn(2, 40, 16)).stats
        assert sum(stats[f"load_e{i}"] for i in range(4)).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("factor", "kept_tokens"), [(0.5, [0, 4]), (1.0, [0, 1, 4, 5]), (2.0, list(range(8)))])
def test_capacity_drops_later_tokens_of_each_window(factor: float, kept_tokens: list[int]) -> None:
    # All tokens pick experts 0 and 1; capacity = ceil(factor * window 4 * k 2 / E 4) per expert per window.
    module, x = constructed(True, capacity_factor=factor, capacity_window=4)
    out = module(x)
    nonzero = out.update[0].abs().sum(-1) > 0
    assert nonzero.nonzero().squeeze(1).tolist() == kept_tokens
    assert out.stats["dropped_frac"].item() == pytest.approx(1 - len(kept_tokens) / 8)
    state = module.init_state(1, device=x.device, dtype=x.dtype)  # the count carries across calls in a window
    first = module(x[:, :3], state=state)
    assert first.state.counts.tolist() == [[3, 3, 0, 0]]
    torch.testing.assert_close(torch.cat([first.update, module(x[:, 3:], state=first.state).update], 1), out.update)


def chunk_routing_is_causal(module: MixtureOfExperts, x: Tensor) -> bool:
    """Changing the tokens of chunk c (and later) must not change the experts of chunk c or earlier."""
    size, seq_len = module.chunk_size, x.shape[1]
    choice = module.assign(x).expert_idx
    for c in range(math.ceil(seq_len / size)):
        x2 = x.clone()
        x2[:, c * size :] = randn(*x2[:, c * size :].shape, seed=100 + c) * 3
        if not torch.equal(module.assign(x2).expert_idx[:, : (c + 1) * size], choice[:, : (c + 1) * size]):
            return False
    return True


def test_chunk_routing_is_causal_and_shared() -> None:
    module = build(routing="chunk", chunk_size=4, n_experts=8, top_k=2)
    x = randn(3, 22, 16)
    assert chunk_routing_is_causal(module, x)
    choice = module.assign(x).expert_idx  # (B, L, k)
    for start in range(0, 22, 4):  # one choice per chunk
        assert (choice[:, start : start + 4] == choice[:, start : start + 1]).all()
    # Chunk c does depend on chunk c - 1 (the test would pass vacuously otherwise).
    x2 = x.clone()
    x2[:, 4:8] = randn(3, 4, 16, seed=9)
    assert not torch.equal(module.assign(x2).expert_idx[:, 8:12], choice[:, 8:12])
    # Chunks follow absolute positions when the sequence arrives in pieces.
    state = module.init_state(3, device=x.device, dtype=x.dtype)
    head = module.assign(x[:, :6], state)
    assert torch.equal(module.assign(x[:, 6:], head.state).expert_idx, choice[:, 6:])


class LeakyChunkMoE(MixtureOfExperts):
    """The reference code's mistake: chunk c routed from its own tokens."""

    def _chunk_inputs(self, x: Tensor, state: MoEState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        route_in, chunk_of, summary, chunk_sum = super()._chunk_inputs(x, state)
        own = x.new_zeros(route_in.shape).index_add(1, chunk_of, x)
        return F.rms_norm(own, (self.d_model,)), chunk_of, summary, chunk_sum


def test_leaky_chunk_routing_is_caught() -> None:
    torch.manual_seed(0)
    leaky = LeakyChunkMoE(16, 0, **{**SMALL, "routing": "chunk", "chunk_size": 4, "n_experts": 8}).double()
    x = randn(3, 22, 16)
    assert not chunk_routing_is_causal(leaky, x)
    with pytest.raises(ConformanceError, match="not causal"):
        check_component(LeakyChunkMoE, init_args={**SMALL, "routing": "chunk", "n_experts": 8})


def test_active_parameters_and_flops() -> None:
    module = MixtureOfExperts(512, 0)  # default expert width: k experts cost one dense 8/3 SwiGLU MLP
    dense = sum(p.numel() for p in SwiGLUMLP(512, 0).parameters())
    assert module.expert_hidden == 688
    assert module.active_parameters() == 512 * 8 + dense
    assert sum(p.numel() for p in module.parameters()) == 512 * 8 + 4 * dense
    assert module.flops_per_token(1024) == 2 * module.active_parameters()
    chunked = MixtureOfExperts(512, 0, routing="chunk", chunk_size=64)
    assert chunked.flops_per_token(1024) < module.flops_per_token(1024)


def test_recompute_in_backward_gives_the_same_gradients():
    assert_recompute_keeps_gradients(MixtureOfExperts, {"n_experts": 4, "top_k": 2, "expert_hidden": 8}, length=11)
