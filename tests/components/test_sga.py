"""Tests of sparse global attention (docs/design.md 3.4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from recompute_check import assert_recompute_keeps_gradients
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hydra_kit.components.attention import CausalSelfAttention
from hydra_kit.components.sga import SparseGlobalAttention, global_schedule
from hydra_kit.ops import apply_rotary
from hydra_kit.protocol import ComponentContext, ComponentPath
from hydra_kit.testing import check_component

SMALL = {"n_heads": 2, "window": 8, "max_global": 4}


@pytest.fixture(autouse=True)
def one_thread():
    # These tensors are tiny: a second intra-op thread only adds synchronisation, which on a loaded 2-core
    # machine made this file 5x slower. Restored after each test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(d_model: int = 16, seed: int = 0, **kwargs) -> SparseGlobalAttention:
    torch.manual_seed(seed)
    return SparseGlobalAttention(d_model, 0, **{**SMALL, **kwargs}).double().eval()


def inputs(batch: int, seq_len: int, d_model: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, d_model, generator=gen, dtype=torch.float64)
    return x, torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)


def rotated_qkv(m: SparseGlobalAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, H, hd) rotated queries and keys, and values, straight from the module's weights."""
    batch, seq_len, _ = x.shape
    q = m.q(x).view(batch, seq_len, m.n_heads, m.head_dim)
    k, v = m.kv(x).view(batch, seq_len, 2, m.n_heads, m.head_dim).unbind(2)
    cos, sin = m.rotary(torch.arange(seq_len))
    return apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None]), v


def reference_sga(m: SparseGlobalAttention, x: Tensor, score: Tensor | None, count_duplicates: bool = False) -> Tensor:
    """The spec, one query at a time, with explicit key lists: the oracle for the blocked implementation."""
    batch, seq_len, _ = x.shape
    w, cap = m.window, m.max_global
    q, key, value = rotated_qkv(m, x)
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(seq_len):
            # The cap highest-scoring tokens of the chunks before t's (Python's sort is stable: ties go earlier).
            earlier = range(t // w * w) if score is not None and cap else []
            best = sorted(earlier, key=lambda p: -score[b, p].item())[:cap]
            glob = [p for p in best if count_duplicates or t - p > w]
            local = list(range(max(0, t - w), t + 1))
            keys, vals = key[b, local + glob], value[b, local + glob]  # (n, H, hd)
            if score is not None and cap:  # every scored value, local or global, times its salience
                vals = vals * (2 * torch.sigmoid(score[b, local + glob]))[:, None, None]
            probs = torch.einsum("hd,nhd->hn", q[b, t], keys).div(math.sqrt(m.head_dim)).softmax(-1)
            out[b, t] = torch.einsum("hn,nhd->hd", probs, vals)
    return m.out(out.flatten(2))


def test_conforms() -> None:
    check_component(SparseGlobalAttention)


@pytest.mark.parametrize(
    "extra",
    [
        {"max_global": 3},  # fewer than a chunk: a chunk's tokens compete for the slots
        {"window": 7, "max_global": 100},  # 40 not divisible by the window, no cap
        {"window": 5, "max_global": 0},  # globals off: sliding window only
        {"window": 64},  # window longer than the sequence
        {"window": 1, "max_global": 5},
        {"window": 4, "max_global": 40},  # every earlier token is global
        {"n_heads": 4},
    ],
)
def test_conforms_variants(extra: dict) -> None:
    args = {**SMALL, **extra}
    # The document-boundary check's second document starts on the chunk grid (a multiple of the window).
    check_component(SparseGlobalAttention, init_args=args, resets_aligned=args["window"] * (16 // args["window"]) or 16)


def test_class_attributes_and_flops() -> None:
    assert SparseGlobalAttention.path is ComponentPath.SEQUENCE
    assert SparseGlobalAttention.gated_by_router
    assert SparseGlobalAttention.layerscale_init == 1.0  # hydra-kit's decision, not the paper's 0.2
    m = SparseGlobalAttention(64, 0)
    assert not m.pointwise
    # Without globals and with a window covering the sequence, the cost is dense causal attention's.
    dense, local = CausalSelfAttention(64, 0), SparseGlobalAttention(64, 0, window=1024, max_global=0)
    assert local.flops_per_token(1000) == pytest.approx(dense.flops_per_token(1000))
    # Per-token cost stops growing once window + max_global keys are in view; dense attention keeps growing.
    assert m.flops_per_token(200_000) == pytest.approx(m.flops_per_token(400_000), rel=0.02)
    assert m.flops_per_token(128_000) < dense.flops_per_token(128_000) / 50


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n_heads": 3}, "n_heads"),
        ({"n_heads": 16}, "n_heads"),  # head width 1 is odd: RoPE needs pairs
        ({"window": 0}, "window"),
        ({"max_global": -1}, "max_global"),
        ({"rope_base": 0.0}, "rope_base"),
    ],
)
def test_validation(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"sga: {argument}"):
        SparseGlobalAttention(16, 0, **{**SMALL, **kwargs})


@pytest.mark.parametrize(
    ("extra", "seq_len"),
    [({}, 40), ({"max_global": 3}, 37), ({"window": 5, "max_global": 7}, 33), ({}, 7)],
)
def test_matches_per_query_reference(extra: dict, seq_len: int) -> None:
    m = build(**extra)
    x, score = inputs(2, seq_len, 16)
    expected, expected_local = reference_sga(m, x, score), reference_sga(m, x, None)
    for per_pass in (4096, 16):  # inference attends a few blocks per pass; the grouping must not matter
        m.queries_per_pass = per_pass
        with torch.no_grad():
            torch.testing.assert_close(m(x, ComponentContext(global_score=score)).update, expected, rtol=0, atol=1e-10)
            local_only = m(x).update  # no score: sliding window only
            torch.testing.assert_close(local_only, expected_local, rtol=0, atol=1e-10)


def test_reference_comparison_catches_double_counted_globals() -> None:
    # A global that is also in the query's window must be masked once; counting it twice is visibly different.
    m = build()
    x, score = inputs(2, 40, 16)
    with torch.no_grad():
        got = m(x, ComponentContext(global_score=score)).update
        assert (got - reference_sga(m, x, score, count_duplicates=True)).abs().max() > 1e-3


@pytest.mark.parametrize("with_score", [False, True])
def test_equals_dense_causal_attention_when_window_covers_the_sequence(with_score: bool) -> None:
    # With window >= L every global lies inside the local window, so the duplicate mask removes them all.
    m = build(window=64)
    x, score = inputs(2, 40, 16)
    q, k, v = rotated_qkv(m, x)
    if with_score:
        v = v * (2 * torch.sigmoid(score))[..., None, None]  # the salience of every scored value
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    expected = m.out(dense.transpose(1, 2).flatten(2))
    got = m(x, ComponentContext(global_score=score if with_score else None)).update
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def influence(m: SparseGlobalAttention, x: Tensor, score: Tensor | None, query: int) -> Tensor:
    """Norm of d update[query] / d x[t] for every t (B=1): which tokens the query can read."""
    x = x.clone().requires_grad_(True)
    m(x, ComponentContext(global_score=score)).update[0, query].sum().backward()
    return x.grad[0].norm(dim=-1)


def test_query_reads_a_global_token_far_outside_its_window() -> None:
    # window 4: token 2 has the top score of the whole past; query 30 is 28 tokens away.
    m = build(window=4, max_global=8)
    x, score = inputs(1, 32, 16, seed=3)
    score[0, 2] = 10.0
    reach = influence(m, x, score, 30)
    assert reach[2] > 1e-4  # the global token is read
    # Exactly the window 26..30 and the 8 best of chunks 0..6 reach it (a pick inside the window counts there).
    globals_seen = set(global_schedule(score, 4, 8)[0, 30 // 4].tolist())
    assert 2 in globals_seen and len(globals_seen) == 8
    assert set(reach.nonzero().flatten().tolist()) == set(range(26, 31)) | globals_seen
    # Globals off (no router score, or max_global=0): nothing beyond the window reaches the query.
    assert (influence(m, x, None, 30)[:26] == 0).all()
    assert (influence(build(window=4, max_global=0), x, score, 30)[:26] == 0).all()
    # One slot: the best token keeps it however old it is, until a better one comes.
    assert influence(build(window=4, max_global=1), x, score, 30)[2] > 1e-4
    better = score.clone()
    better[0, 17] = 20.0
    reach = influence(build(window=4, max_global=1), x, better, 30)
    assert reach[2] == 0 and reach[17] > 1e-4


def test_selection_receives_gradient_through_the_salience_of_every_token() -> None:
    m = build()
    x, score = inputs(1, 40, 16)
    score.requires_grad_(True)
    m(x, ComponentContext(global_score=score)).update.square().sum().backward()
    picked = global_schedule(score.detach(), 8, 4)[0, -1]  # globals the last chunk reads
    assert (score.grad[0, picked] != 0).all()
    # Every token, chosen or not, is read in some local window: its score learns whether its value helps, so a
    # token left out of the top-k can still climb into it.
    assert (score.grad[0] != 0).all()


def first_causality_violation(schedule, score: Tensor, window: int) -> int | None:
    """The first cut t where changing scores after t changes the globals visible to a query <= t."""
    gen = torch.Generator().manual_seed(7)
    base = schedule(score)
    for t in range(score.shape[1] - 1):
        changed = score.clone()
        changed[:, t + 1 :] = torch.randn(changed[:, t + 1 :].shape, generator=gen, dtype=score.dtype) * 5
        through = t // window + 1  # chunks holding queries <= t
        if not torch.equal(schedule(changed)[:, :through], base[:, :through]):
            return t
    return None


def test_global_selection_is_causal() -> None:
    w, cap = 5, 6
    score = inputs(3, 47, 1, seed=1)[0][..., 0]  # (3, 47)
    schedule = global_schedule(score, w, cap)
    assert schedule.shape == (3, 10, 6)
    assert first_causality_violation(lambda s: global_schedule(s, w, cap), score, w) is None
    # The module selects the same tokens: after 47 tokens its state holds what chunk 9 (45..49) reads.
    m = build(window=w, max_global=cap)
    state = m(inputs(3, 47, 16)[0], ComponentContext(global_score=score)).state
    assert torch.equal(state.global_pos, schedule[:, 9])
    # Chunk c reads the cap best tokens of the chunks before it, at any distance; empty slots only in chunk 1.
    for b in range(3):
        for c in range(10):
            best = sorted(range(c * w), key=lambda p: -score[b, p].item())[:cap]
            assert schedule[b, c][schedule[b, c] >= 0].tolist() == sorted(best)
    assert (schedule[:, 1] == -1).sum() == 3 and (schedule[:, 2:] >= 0).all()

    def leaky(s: Tensor) -> Tensor:  # broken on purpose: a chunk already sees its own picks
        return torch.cat([global_schedule(s, w, cap)[:, 1:], global_schedule(s, w, cap)[:, -1:]], 1)

    assert first_causality_violation(leaky, score, w) is not None


def test_ties_go_to_the_earlier_token_in_forward_and_decoding() -> None:
    # Equal scores (common in bfloat16): forward and one-token decoding must pick the same globals.
    m = build(window=4, max_global=3)
    x, _ = inputs(2, 22, 16)
    score = torch.zeros(2, 22, dtype=torch.float64)
    score[:, 9] = 1.0
    full = m(x, ComponentContext(global_score=score))
    assert full.state.global_pos.tolist() == [[0, 1, 9]] * 2
    with torch.no_grad():
        state, steps = m.init_state(2, device=x.device, dtype=x.dtype), []
        for t in range(22):
            out = m.step(x[:, t], state, ComponentContext(global_score=score[:, t]))
            steps.append(out.update)
            state = out.state
    assert torch.equal(state.global_pos, full.state.global_pos)
    torch.testing.assert_close(torch.stack(steps, 1), full.update.detach())


@pytest.mark.parametrize("cuts", [[1, 2, 3, 13, 29], list(range(1, 40)), [8, 16, 17, 31]])
def test_forward_pieces_equal_full_forward(cuts: list[int]) -> None:
    # Length-1 forwards (not step) and mid-chunk cuts go through the gathered-query path.
    m = build(max_global=3)
    x, score = inputs(2, 40, 16)
    full = m(x, ComponentContext(global_score=score)).update
    state, pieces = None, []
    for start, stop in zip([0, *cuts], [*cuts, 40], strict=True):
        out = m(x[:, start:stop], ComponentContext(global_score=score[:, start:stop]), state)
        pieces.append(out.update)
        state = out.state
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)
    assert state.offset == 40 and state.keys.shape[1] == 8 and state.global_keys.shape[1] == 3


def test_step_without_score_equals_sliding_window_forward() -> None:
    m = build()
    x, _ = inputs(2, 20, 16)
    full = m(x).update
    state = m.init_state(2, device=x.device, dtype=x.dtype)
    steps = []
    for t in range(20):
        out = m.step(x[:, t], state)
        steps.append(out.update)
        state = out.state
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-10)


def test_keep_skips_queries_and_leaves_kept_outputs_unchanged() -> None:
    m = build()
    x, score = inputs(2, 40, 16)
    keep = torch.rand(2, 40, generator=torch.Generator().manual_seed(5)) < 0.3
    most_kept_per_block = int(keep.view(2, 5, 8).sum(-1).max())
    rows: list[int] = []
    m.q.register_forward_hook(lambda mod, args, out: rows.append(args[0][..., 0].numel()))
    full = m(x, ComponentContext(global_score=score)).update
    skipping = m(x, ComponentContext(global_score=score, keep=keep))
    torch.testing.assert_close(skipping.update[keep], full[keep], rtol=0, atol=1e-10)
    assert (skipping.update[~keep] == 0).all()
    # Queries projected: all 80, then only the kept ones, padded to the fullest of the 2 x 5 blocks.
    assert rows == [80, 2 * 5 * most_kept_per_block] and most_kept_per_block < 8
    # Skipped tokens still provide keys and values: the state equals the one of the full forward.
    torch.testing.assert_close(
        skipping.state.global_values, m(x, ComponentContext(global_score=score)).state.global_values
    )
    # The same through step, including a token nobody in the batch keeps.
    keep[:, 11] = False
    state, steps = m.init_state(2, device=x.device, dtype=x.dtype), []
    for t in range(24):
        out = m.step(x[:, t], state, ComponentContext(global_score=score[:, t], keep=keep[:, t]))
        steps.append(out.update)
        state = out.state
    stepped = torch.stack(steps, 1)
    torch.testing.assert_close(stepped[keep[:, :24]], full[:, :24][keep[:, :24]], rtol=0, atol=1e-10)
    assert (stepped[~keep[:, :24]] == 0).all()
    # A whole forward in which no token keeps (a router trained to skip can get there): zeros, the same state.
    nothing = m(x, ComponentContext(global_score=score, keep=torch.zeros_like(keep)))
    assert (nothing.update == 0).all()
    torch.testing.assert_close(nothing.state.global_values, skipping.state.global_values)


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor every aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend((str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, Tensor))
        return out


def memory_footprint(fn, seq_len: int) -> tuple[int, int, list[str]]:
    """Largest op output (elements), total elements produced, and the ops that built an L x L tensor."""
    with OutputShapes() as rec:
        fn()
    square = [op for op, shape in rec.shapes if sum(d >= seq_len for d in shape) >= 2]
    return max(math.prod(s) for _, s in rec.shapes), sum(math.prod(s) for _, s in rec.shapes), square


@pytest.mark.slow
def test_memory_is_linear_in_length() -> None:
    torch.manual_seed(0)
    w, cap, heads = 64, 128, 2
    m = SparseGlobalAttention(64, 0, n_heads=heads, window=w, max_global=cap)
    results = {}
    for seq_len in (8192, 16384):
        x, score = torch.randn(1, seq_len, 64), torch.randn(1, seq_len)
        x.requires_grad_(True)
        results[seq_len] = memory_footprint(
            lambda x=x, score=score: m(x, ComponentContext(global_score=score)).update.sum().backward(), seq_len
        )
        largest, _, square = results[seq_len]
        assert not square, f"L x L tensors built by {square}"
        assert largest <= 2 * seq_len * (w + cap) * heads
    assert results[16384][0] <= 2.1 * results[8192][0]  # largest tensor doubles, not quadruples
    assert results[16384][1] <= 2.1 * results[8192][1]  # so does everything allocated


def test_memory_check_catches_dense_attention() -> None:
    # The same probe flags dense attention with an explicit causal mask (what the paper's toy code does).
    seq_len = 512
    q = k = v = torch.randn(1, 2, seq_len, 32)
    mask = lambda: torch.ones(seq_len, seq_len, dtype=torch.bool).tril()  # noqa: E731
    largest, _, square = memory_footprint(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask()), seq_len)
    assert square and largest >= seq_len * seq_len


def test_recompute_in_backward_gives_the_same_gradients():
    assert_recompute_keeps_gradients(
        SparseGlobalAttention, {"n_heads": 2, "window": 4, "max_global": 3}, length=18, scored=True
    )


def test_inference_step_writes_in_place_after_the_window_it_was_given() -> None:
    # Append-only, like a key/value cache: the new token goes after the old state's view, never into it.
    m = build()
    x, score = inputs(1, 30, 16)
    with torch.no_grad():
        state = m.init_state(1, device=x.device, dtype=x.dtype)
        for t in range(20):
            state = m.step(x[:, t], state, ComponentContext(global_score=score[:, t])).state
        before = state.keys.clone(), state.values.clone()
        after = m.step(x[:, 20], state, ComponentContext(global_score=score[:, 20])).state
    assert torch.equal(state.keys, before[0]) and torch.equal(state.values, before[1])
    assert after.key_buffer is not None and after.keys.data_ptr() != state.keys.data_ptr()
    assert torch.equal(after.keys[:, :-1], before[0][:, 1:])  # the window slid by one token


@pytest.mark.parametrize("seq_len", [5, 8, 37])
def test_attention_map_reproduces_the_forward(seq_len):
    """The dense map of inspection has the forward's masks and global selection: weights times the values (a
    scored one scaled by its salience 2 sigmoid(s)) through the output projection give the forward's update."""
    torch.manual_seed(0)
    module = SparseGlobalAttention(16, 0, **SMALL).double()
    x, score = torch.randn(2, seq_len, 16, dtype=torch.float64), torch.randn(2, seq_len, dtype=torch.float64)
    context = ComponentContext(global_score=score)
    amap = module.attention_map(x, context)
    assert amap.weights.shape == (2, 2, seq_len, seq_len) and (amap.via_global <= amap.visible).all()
    assert not (amap.visible & ~torch.ones(seq_len, seq_len, dtype=torch.bool).tril()).any()  # causal
    torch.testing.assert_close(amap.weights.sum(-1), torch.ones(2, 2, seq_len, dtype=torch.float64))
    _, value = module.kv(x).view(2, seq_len, 2, 2, 8).unbind(2)  # (B, L, H, hd)
    scaled = 2 * torch.sigmoid(score)  # (B, L): every scored key's value, local or global
    y = torch.einsum("bhqk,bk,bkhd->bqhd", amap.weights, scaled, value).reshape(2, seq_len, 16)
    torch.testing.assert_close(module.out(y), module(x, context).update)
    # The globals a query reads are those global_schedule gives its chunk, outside its window.
    schedule = global_schedule(score, 8, 4)
    for t in range(seq_len):
        expected = {int(p) for p in schedule[0, t // 8] if p >= 0 and t > p + 8}
        assert set(torch.nonzero(amap.via_global[0, t]).flatten().tolist()) == expected
    some = torch.tensor([seq_len - 1, 0])
    torch.testing.assert_close(module.attention_map(x, context, some).weights, amap.weights[:, :, some])


def test_global_attention_share_is_a_diagnostic_only():
    torch.manual_seed(0)
    module = SparseGlobalAttention(16, 0, **SMALL)
    x, score = torch.randn(2, 40, 16), torch.randn(2, 40)
    assert "global_attn_share" not in module(x, ComponentContext(global_score=score)).stats
    share = module(x, ComponentContext(global_score=score, diagnostics=True)).stats["global_attn_share"]
    amap = module.attention_map(x, ComponentContext(global_score=score), torch.arange(8, 40))
    torch.testing.assert_close(share, (amap.weights * amap.via_global[:, None]).sum(-1).mean())  # 32 queries: all past chunk 0
    assert "global_attn_share" not in module(x, ComponentContext(diagnostics=True)).stats  # no router, no globals
