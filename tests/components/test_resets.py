"""Document boundaries inside a packed window: every first-party component, the scans, and whole models.

Two documents packed in one window must give, for the second, the updates (and logits) it gets alone, and the
first document's must not depend on what follows. Components with an internal chunk grid aligned to the window
(workspace writes, SGA's global chunks) equal "alone" exactly when the second document starts on that grid; at
any start nothing of the first document reaches the second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fake_components import CumulativeMeanMixer

from hydra_kit.block import TriPathBlock
from hydra_kit.components.attention import CausalSelfAttention
from hydra_kit.components.mlp import SwiGLUMLP
from hydra_kit.components.moe import MixtureOfExperts
from hydra_kit.components.pkm import ProductKeyMemory
from hydra_kit.components.router import TokenRouter
from hydra_kit.components.sga import SparseGlobalAttention
from hydra_kit.components.ssm import SelectiveSSM
from hydra_kit.components.workspace import WorkspaceMemory
from hydra_kit.model import HydraLM
from hydra_kit.network import HydraNetwork
from hydra_kit.ops.conv import causal_depthwise_conv
from hydra_kit.ops.scan import diagonal_chunked_scan, ssd_chunked_scan
from hydra_kit.ops.segments import document_offsets, document_starts
from hydra_kit.protocol import ComponentContext, ComponentOutput, TriPathComponent
from hydra_kit.registry import ComponentEntry, Registry, default_registry
from hydra_kit.testing import ConformanceError, check_component, check_resets

D = 32
RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# (class, init args, a start on every internal grid, whether any start equals "alone")
CASES: dict[str, tuple[type[TriPathComponent], dict[str, Any], int, bool]] = {
    "ssm-ssd": (SelectiveSSM, dict(SelectiveSSM.example_init_args), 16, True),
    "ssm-diagonal": (SelectiveSSM, {**SelectiveSSM.example_init_args, "variant": "diagonal"}, 16, True),
    # A chunk decaying past the float range of the factored form: the exact per-head path.
    "ssm-ssd-steep": (SelectiveSSM, {**SelectiveSSM.example_init_args, "dt_min": 1.0, "dt_max": 1.0, "a_init_range": (300.0, 400.0)}, 16, True),
    "ssm-diagonal-steep": (SelectiveSSM, {**SelectiveSSM.example_init_args, "variant": "diagonal", "dt_min": 1.0, "dt_max": 1.0, "a_init_range": (300.0, 400.0)}, 16, True),
    "ssm-groups": (SelectiveSSM, {**SelectiveSSM.example_init_args, "ngroups": 2, "d_conv": 3}, 16, True),
    "attention": (CausalSelfAttention, dict(CausalSelfAttention.example_init_args), 16, True),
    "sga": (SparseGlobalAttention, dict(SparseGlobalAttention.example_init_args), 16, False),
    "workspace": (WorkspaceMemory, dict(WorkspaceMemory.example_init_args), 16, False),
    "pkm": (ProductKeyMemory, dict(ProductKeyMemory.example_init_args), 16, True),
    "mlp": (SwiGLUMLP, dict(SwiGLUMLP.example_init_args), 16, True),
    "moe": (MixtureOfExperts, dict(MixtureOfExperts.example_init_args), 16, True),
    "moe-chunk": (MixtureOfExperts, {**MixtureOfExperts.example_init_args, "routing": "chunk"}, 16, False),
    "moe-capacity": (MixtureOfExperts, {**MixtureOfExperts.example_init_args, "capacity_factor": 0.5}, 16, False),
    "moe-chunk-capacity": (MixtureOfExperts, {**MixtureOfExperts.example_init_args, "routing": "chunk", "capacity_factor": 0.5}, 16, False),
}


def _build(name: str) -> TriPathComponent:
    cls, args, _, _ = CASES[name]
    torch.manual_seed(0)
    return cls(D, 0, **args).double().eval()


def _inputs(length: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, D, generator=gen, dtype=torch.float64)
    return x, torch.randn(2, length, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_component_honours_documents(name: str) -> None:
    component = _build(name)
    assert type(component).supports_resets and component.resets_refusal() is None
    x, score = _inputs()
    check_resets(component, x, score, aligned=CASES[name][2], unaligned=13, atol=1e-10)


@pytest.mark.parametrize("name", [n for n, case in sorted(CASES.items()) if case[3]])
@pytest.mark.parametrize("split", [1, 7, 13, 25, 39])
def test_grid_free_components_equal_alone_at_any_start(name: str, split: int) -> None:
    component = _build(name)
    x, score = _inputs()
    ids = torch.zeros(x.shape[:2], dtype=torch.long)
    ids[:, split:] = 7
    packed = component(x, ComponentContext(global_score=score, segment_ids=ids)).update
    alone = component(x[:, split:], ComponentContext(global_score=score[:, split:])).update
    torch.testing.assert_close(packed[:, split:], alone, rtol=0, atol=1e-10)


def test_sga_without_score_is_a_window_per_document_at_any_start() -> None:
    component = _build("sga")  # no router score: plain sliding-window attention, no grid
    x, _ = _inputs()
    for split in (3, 13, 21):
        ids = torch.zeros(x.shape[:2], dtype=torch.long)
        ids[:, split:] = 1
        packed = component(x, ComponentContext(segment_ids=ids)).update
        torch.testing.assert_close(packed[:, split:], component(x[:, split:]).update, rtol=0, atol=1e-10)


def test_sga_keep_and_many_documents_do_not_leak() -> None:
    component = _build("sga")
    x, score = _inputs(48)
    keep = torch.rand(2, 48, generator=torch.Generator().manual_seed(3)) > 0.3
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3] + [3] * 27).repeat(2, 1)
    last = 20  # the last document starts here
    x2, score2 = x.clone(), score.clone()
    x2[:, :last] += 2.0
    score2[:, :last] = -score2[:, :last] * 4
    a = component(x, ComponentContext(global_score=score, keep=keep, segment_ids=ids)).update
    b = component(x2, ComponentContext(global_score=score2, keep=keep, segment_ids=ids)).update
    torch.testing.assert_close(a[:, last:], b[:, last:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_scans_restart_at_every_start(chunk: int) -> None:
    """The chunked scans with resets equal each document scanned on its own, for documents of any length."""
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 1, 9, 8, 2, 7]  # starts inside chunks, on chunk boundaries, a one-token document
    seq_len, heads, p, n = sum(lengths), 4, 3, 5
    x = torch.randn(2, seq_len, heads, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(2, seq_len, heads, generator=gen, dtype=torch.float64)
    A = -torch.rand(heads, generator=gen, dtype=torch.float64) * 2
    B, C = (torch.randn(2, seq_len, 2, n, generator=gen, dtype=torch.float64) for _ in range(2))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).repeat(2, 1)
    resets = document_starts(ids)
    y, final = ssd_chunked_scan(x, dt, A, B, C, chunk, None, resets)
    u, log_a, Bd, Cd = (torch.randn(2, seq_len, 6, generator=gen, dtype=torch.float64) for _ in range(4))
    log_a = -log_a.abs()
    yd, final_d = diagonal_chunked_scan(u, log_a, Bd, Cd, chunk, None, resets)
    start = 0
    for length in lengths:
        doc = slice(start, start + length)
        y_alone, final_alone = ssd_chunked_scan(x[:, doc], dt[:, doc], A, B[:, doc], C[:, doc], chunk)
        torch.testing.assert_close(y[:, doc], y_alone, rtol=0, atol=1e-12)
        yd_alone, final_d_alone = diagonal_chunked_scan(u[:, doc], log_a[:, doc], Bd[:, doc], Cd[:, doc], chunk)
        torch.testing.assert_close(yd[:, doc], yd_alone, rtol=0, atol=1e-12)
        start += length
    torch.testing.assert_close(final, final_alone, rtol=0, atol=1e-12)  # the last document's state
    torch.testing.assert_close(final_d, final_d_alone, rtol=0, atol=1e-12)


def test_scans_keep_the_initial_state_until_the_first_start() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 12, 2, 3, generator=gen, dtype=torch.float64)
    dt = torch.rand(1, 12, 2, generator=gen, dtype=torch.float64)
    A = -torch.rand(2, generator=gen, dtype=torch.float64)
    B, C = (torch.randn(1, 12, 1, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    init = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    resets = torch.zeros(1, 12, dtype=torch.bool)
    resets[0, 9] = True
    y, _ = ssd_chunked_scan(x, dt, A, B, C, 4, init, resets)
    y_plain, _ = ssd_chunked_scan(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], 4, init)
    torch.testing.assert_close(y[:, :9], y_plain, rtol=0, atol=1e-12)


def test_conv_reads_no_earlier_document() -> None:
    gen = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    x = torch.randn(2, 20, 5, generator=gen)
    ids = torch.zeros(2, 20, dtype=torch.long)
    ids[0, 6:], ids[0, 7:], ids[1, 15:] = 1, 2, 3
    offsets = document_offsets(document_starts(ids))
    out = causal_depthwise_conv(torch.cat([torch.zeros(2, 3, 5), x], 1), weight, bias, offsets)
    for row, start in ((0, 7), (1, 15)):
        alone = causal_depthwise_conv(torch.cat([torch.zeros(1, 3, 5), x[row : row + 1, start:]], 1), weight, bias)
        torch.testing.assert_close(out[row : row + 1, start:], alone)
    assert offsets[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 1]


def test_router_gates_are_per_token() -> None:
    torch.manual_seed(0)
    router = TokenRouter(D, 0)
    router.configure_gates(["a", "b"])
    router.double()
    x, score = _inputs()
    check_resets(router, x, score, aligned=16, unaligned=13, atol=1e-12)


def test_a_block_refuses_documents_for_a_component_without_resets() -> None:
    mean = CumulativeMeanMixer(D, 0)  # declares nothing: supports_resets is False
    assert mean.resets_refusal() == "CumulativeMeanMixer does not declare supports_resets = True"
    block = TriPathBlock(D, 3, {"ssm": SelectiveSSM(D, 3), "mean": mean}, {"ssm": 1.0, "mean": 1.0}, set())
    with pytest.raises(ValueError, match=r"segment_ids\), but component 'mean' \(CumulativeMeanMixer\) in block 3 cannot honour them: .*supports_resets"):
        block(torch.randn(1, 8, D), segment_ids=torch.zeros(1, 8, dtype=torch.long))
    block.knocked_out = {"mean"}  # a knocked-out instance does not run, so it cannot leak
    block(torch.randn(1, 8, D), segment_ids=torch.zeros(1, 8, dtype=torch.long))


def test_bad_segment_ids_are_refused_in_one_line() -> None:
    network = HydraNetwork(vocab_size=16, d_model=D, n_blocks=1)
    ids = torch.randint(0, 16, (2, 8))
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 7\), the input \(B, L\) = \(2, 8\)"):
        network(ids, segment_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        network(ids, segment_ids=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="cannot continue a state"):
        network(ids, network.init_state(2), segment_ids=torch.zeros(2, 8, dtype=torch.long))


def _recipe_network(recipe: str, **overrides: Any) -> HydraNetwork:
    model = yaml.safe_load((RECIPES / recipe).read_text())["model"]
    torch.manual_seed(0)
    return HydraNetwork(
        vocab_size=model["vocab_size"], d_model=D, n_blocks=model["n_blocks"], components={**model["components"], **overrides}
    ).double().eval()


@pytest.mark.parametrize("recipe", ["full.yaml", "transformer.yaml", "tiny.yaml"])
def test_whole_model_second_document_logits_equal_alone(recipe: str) -> None:
    network = _recipe_network(recipe)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, network.vocab_size, (2, 40), generator=gen)
    for split, equal_alone in ((16, True), (13, False)):  # 16: on every grid of the recipes (SGA window, chunks)
        ids = torch.zeros(2, 40, dtype=torch.long)
        ids[0, split:] = 1
        packed = network(tokens, segment_ids=ids).logits
        torch.testing.assert_close(packed[:1, :split], network(tokens[:1, :split]).logits, rtol=0, atol=1e-9)
        torch.testing.assert_close(packed[1:], network(tokens[1:]).logits, rtol=0, atol=1e-9)  # one document
        other = tokens.clone()
        other[:, :split] = torch.randint(0, network.vocab_size, (2, split), generator=gen)
        torch.testing.assert_close(packed[:1, split:], network(other, segment_ids=ids).logits[:1, split:], rtol=0, atol=1e-9)
        if equal_alone or recipe == "transformer.yaml":  # dense attention has no grid: alone at any start
            torch.testing.assert_close(packed[:1, split:], network(tokens[:1, split:]).logits, rtol=0, atol=1e-9)


def test_whole_model_refuses_a_component_without_resets() -> None:
    registry = Registry({**default_registry().entries, "mean": ComponentEntry("mean", CumulativeMeanMixer, "hydra-kit-tests", "0", "fake_components:CumulativeMeanMixer")})
    components = {"ssm": {"component": "ssm", "blocks": "all"}, "mean": {"component": "mean", "blocks": [1, 2]}}
    network = HydraNetwork(vocab_size=16, d_model=D, n_blocks=3, components=components, registry=registry)
    with pytest.raises(ValueError, match=r"^this batch marks documents \(segment_ids\), but component 'mean' \(CumulativeMeanMixer\) in block 1 cannot honour them"):
        network(torch.zeros(1, 8, dtype=torch.long), segment_ids=torch.zeros(1, 8, dtype=torch.long))
    assert len(network.resets_refusals()) == 2  # one per block holding it
    network(torch.zeros(1, 8, dtype=torch.long))  # without segment ids the model runs as before


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps called without a Trainer
def test_training_and_validation_steps_pass_segment_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    model = HydraLM(vocab_size=16, d_model=D, n_blocks=1)
    seen: list[torch.Tensor | None] = []
    forward = model.network.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("segment_ids"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.network, "forward", spy)
    ids = torch.randint(0, 16, (2, 8))
    segments = torch.zeros(2, 8, dtype=torch.long)
    segments[:, 5:] = 1
    batch = {"input_ids": ids, "targets": ids, "segment_ids": segments}
    model.training_step(batch, 0)
    model.validation_step(batch, 0)
    model.training_step({"input_ids": ids, "targets": ids}, 0)  # windows without boundaries: as before
    assert seen[0] is segments and seen[1] is segments and seen[2] is None


class LeakyMeanMixer(CumulativeMeanMixer):
    """Declares resets but keeps averaging across documents: the conformance check must catch it."""

    supports_resets = True


class DocumentMeanMixer(CumulativeMeanMixer):
    """A plugin that honours resets: the running mean restarts at every document start."""

    supports_resets = True

    def forward(self, x: torch.Tensor, context: ComponentContext | None = None, state: Any = None) -> ComponentOutput:
        ids = None if context is None else context.segment_ids
        if ids is None:
            return super().forward(x, context, state)
        sums = self.proj(x).cumsum(1)  # (B, L, D)
        offsets = document_offsets(document_starts(ids))  # (B, L)
        first = torch.arange(x.shape[1]) - offsets  # where each token's document starts
        before = sums.gather(1, (first - 1).clamp_min(0)[..., None].expand_as(sums)) * (first > 0)[..., None]
        return ComponentOutput(self.scale * (sums - before) / (offsets + 1)[..., None])


def test_check_component_catches_a_plugin_that_leaks_across_documents() -> None:
    with pytest.raises(ConformanceError, match="LeakyMeanMixer declares supports_resets, but with documents split at 16 the second document's updates change with the first"):
        check_component(LeakyMeanMixer)
    check_component(DocumentMeanMixer)


def test_sga_attention_map_follows_documents_as_forward_does() -> None:
    component = _build("sga")
    x, score = _inputs(48)
    ids = torch.zeros(2, 48, dtype=torch.long)
    ids[0, 16:], ids[1, 21:] = 1, 1
    amap = component.attention_map(x, ComponentContext(global_score=score, segment_ids=ids))
    assert not amap.visible[0, 16:, :16].any() and not amap.visible[1, 21:, :21].any()
    alone = component.attention_map(x[:1, 16:], ComponentContext(global_score=score[:1, 16:]))
    assert torch.equal(amap.visible[0, 16:, 16:], alone.visible[0]) and torch.equal(amap.via_global[0, 16:, 16:], alone.via_global[0])
    torch.testing.assert_close(amap.weights[0, :, 16:, 16:], alone.weights[0], rtol=0, atol=1e-10)
