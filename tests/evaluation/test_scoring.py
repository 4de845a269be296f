"""Scoring through the recurrent state equals a direct computation from one forward's logits (torch only)."""

from __future__ import annotations

import math

import pytest
import torch

from hydra_kit.evaluation.scoring import generate_until, prefill, score
from hydra_kit.network import HydraNetwork

VOCAB = 40
# Every stateful mechanism, sized so that 30 tokens cross SSM chunks, the SGA window and workspace writes.
COMPONENTS = {
    "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 8, "headdim": 8, "chunk_size": 8}},
    "sga": {"component": "sga", "blocks": [1], "args": {"n_heads": 2, "window": 8, "max_global": 6}},
    "moe": {"component": "moe", "blocks": "all", "args": {"n_experts": 4, "top_k": 2, "expert_hidden": 16}},
    "workspace": {"component": "workspace", "blocks": [0], "args": {"n_slots": 4, "chunk_size": 8}},
    "pkm": {"component": "pkm", "blocks": [2], "args": {"heads": 2, "n_keys": 8, "top_k": 4, "d_key": 16}},
    "router": {"component": "router", "blocks": "all"},
}
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"  # one character per token id


def decode(ids: list[int]) -> str:
    return "".join(ALPHABET[i] for i in ids)


@pytest.fixture(scope="module")
def network() -> HydraNetwork:
    torch.manual_seed(0)
    return HydraNetwork(vocab_size=VOCAB, d_model=32, n_blocks=3, components=COMPONENTS).double().eval()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct(network: HydraNetwork, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (n - 1,) of tokens[1:] and whether each is the argmax, from one forward of all tokens."""
    with torch.no_grad():
        logits = network(torch.tensor([tokens])).logits[0, :-1].float()  # (n - 1, V)
    target = torch.tensor(tokens[1:])
    return logits.log_softmax(-1).gather(-1, target[:, None])[:, 0].double(), logits.argmax(-1) == target


@pytest.mark.parametrize("chunk_size", [None, 5, 1])
def test_continuation_logprobs_equal_the_log_softmax_of_one_forward(network, chunk_size):
    context, continuation = ids(13, 1), ids(17, 2)
    logprobs, greedy = score(network, prefill(network, context, chunk_size=chunk_size), continuation, chunk_size=chunk_size)
    expected, expected_greedy = direct(network, context + continuation)
    torch.testing.assert_close(logprobs, expected[-len(continuation) :], rtol=0, atol=1e-5)
    assert torch.equal(greedy, expected_greedy[-len(continuation) :])


def test_a_prefix_serves_several_continuations_unchanged(network):
    context = ids(11, 3)
    prefix = prefill(network, context)
    first = [score(network, prefix, ids(9, seed))[0] for seed in (4, 5)]
    again = [score(network, prefill(network, context), ids(9, seed))[0] for seed in (4, 5)]
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_token_with_nothing_before_it_is_uniform_and_not_greedy(network):
    tokens = ids(12, 6)
    logprobs, greedy = score(network, prefill(network, []), tokens, chunk_size=4)
    expected, expected_greedy = direct(network, tokens)
    assert logprobs[0].item() == pytest.approx(-math.log(VOCAB))
    assert not greedy[0]
    torch.testing.assert_close(logprobs[1:], expected, rtol=0, atol=1e-5)
    assert torch.equal(greedy[1:], expected_greedy)


def greedy_text(network: HydraNetwork, context: list[int], n: int) -> str:
    tokens = network.generate(torch.tensor([context]), n, temperature=0)
    return decode([int(t[0]) for t in tokens])


def test_generate_until_is_greedy_decoding_cut_before_the_first_stop_string(network):
    context = ids(10, 7)
    full = greedy_text(network, context, 12)
    stop = full[5:7]
    out = generate_until(network, prefill(network, context), decode, ["zzzz-never", stop], 12)
    assert out == full[: full.find(stop)]
    assert stop not in out


def test_generate_until_stops_at_max_tokens_and_at_the_end_of_document_token(network):
    context = ids(10, 8)
    full = greedy_text(network, context, 12)
    assert generate_until(network, prefill(network, context), decode, [], 7) == full[:7]
    # The end-of-document id is not emitted: the text ends right before its first occurrence.
    eos = ALPHABET.index(full[4])
    cut = generate_until(network, prefill(network, context), decode, [], 12, eos_id=eos)
    assert cut == full[: full.find(full[4])]


def test_generate_until_refuses_an_empty_context(network):
    with pytest.raises(ValueError, match="context is empty"):
        generate_until(network, prefill(network, []), decode, ["\n"], 4)
