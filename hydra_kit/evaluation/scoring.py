"""Log-likelihoods and greedy continuations of token ids under a :class:`~hydra_kit.network.HydraNetwork`.

The network is recurrent, so any length is read in pieces of at most ``chunk_size`` tokens with the state
carried from piece to piece: the result is the one forward over the whole sequence would give (the
conformance check holds every component to that), with memory bounded by the piece. A prefix (a shared
multiple-choice context) is read once and its state copied for every continuation scored after it.

Position ``t`` of the logits predicts token ``t + 1``; a token with nothing before it (no prefix and no
start token) is scored under a uniform distribution over the vocabulary, since the network has no
prediction for it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hydra_kit.network import HydraNetwork

__all__ = ["Prefix", "generate_until", "prefill", "score"]

State = list[dict[str, Any]]


@dataclass
class Prefix:
    """What a read prefix leaves: the next-token logits after its last token and the recurrent state.

    Attributes:
        logits: (V,) float32 logits for the token after the prefix; None when the prefix was empty.
        state: per-block state after the prefix (:meth:`HydraNetwork.init_state` for an empty one).
    """

    logits: Tensor | None
    state: State


def _forward(network: HydraNetwork, ids: list[int], state: State, chunk_size: int | None) -> tuple[Tensor, State]:
    """Logits (len(ids), V) of ``ids`` read after ``state``, in pieces of at most ``chunk_size``, and the new state."""
    step = chunk_size or len(ids)
    device = network.embed.weight.device
    pieces = []
    for start in range(0, len(ids), step):
        chunk = torch.tensor([ids[start : start + step]], dtype=torch.long, device=device)  # (1, l)
        out = network(chunk, state, collect_aux=False)
        pieces.append(out.logits[0].float())  # (l, V)
        state = out.state
    return torch.cat(pieces), state


@torch.no_grad()
def prefill(network: HydraNetwork, ids: list[int], *, chunk_size: int | None = None) -> Prefix:
    """Read ``ids`` (a context) and keep what scoring or generating after it needs.

    Args:
        network: the model, in eval mode.
        ids: the prefix's token ids (may be empty).
        chunk_size: the longest piece one forward reads (None: all at once).
    """
    state = network.init_state(1)
    if not ids:
        return Prefix(None, state)
    logits, state = _forward(network, ids, state, chunk_size)
    return Prefix(logits[-1], state)


@torch.no_grad()
def score(network: HydraNetwork, prefix: Prefix, ids: list[int], *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Log-probability of each token of ``ids`` after ``prefix``, and whether it is the model's argmax there.

    ``prefix`` is not changed (its state is copied), so one prefix serves several continuations.

    Args:
        network: the model, in eval mode.
        prefix: what :func:`prefill` returned for the context.
        ids: the continuation's token ids, at least one.
        chunk_size: the longest piece one forward reads (None: all at once).

    Returns:
        ``(logprobs, greedy)``: (N,) float64 log-probabilities and (N,) bool.
    """
    if not ids:
        raise ValueError("score: the continuation has no tokens")
    vocab = network.vocab_size
    targets = torch.tensor(ids, dtype=torch.long, device=network.embed.weight.device)  # (N,)
    predictors = []  # rows of logits, row i predicting ids[i]
    if prefix.logits is not None:
        predictors.append(prefix.logits[None])
    if len(ids) > 1:
        # The last token predicts nothing that is scored: it is never read.
        logits, _ = _forward(network, ids[:-1], copy.deepcopy(prefix.state), chunk_size)  # (N - 1, V)
        predictors.append(logits)
    scored = targets if prefix.logits is not None else targets[1:]
    logprobs = torch.empty(0, dtype=torch.float64, device=targets.device)
    greedy = torch.empty(0, dtype=torch.bool, device=targets.device)
    if predictors:
        rows = torch.cat(predictors)  # (n, V)
        logprobs = rows.log_softmax(-1).gather(-1, scored[:, None])[:, 0].double()
        greedy = rows.argmax(-1) == scored
    if prefix.logits is None:  # the first token has no prediction: uniform, and not the model's choice
        first = torch.full((1,), -math.log(vocab), dtype=torch.float64, device=targets.device)
        logprobs = torch.cat([first, logprobs])
        greedy = torch.cat([torch.zeros(1, dtype=torch.bool, device=targets.device), greedy])
    return logprobs, greedy


@torch.no_grad()
def generate_until(
    network: HydraNetwork,
    prefix: Prefix,
    decode: Callable[[list[int]], str],
    until: list[str],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
) -> str:
    """Greedy continuation of ``prefix`` through the recurrent state, cut before the first stop string.

    Each new token costs one :meth:`HydraNetwork.step`. Decoding stops at the first of: a stop string in the
    decoded text (the text is cut where it begins), the end-of-document token ``eos_id`` (not included),
    ``max_new_tokens`` tokens.

    Args:
        network: the model, in eval mode.
        prefix: what :func:`prefill` returned for the context (not changed).
        decode: token ids -> text.
        until: stop strings (empty strings are ignored).
        max_new_tokens: the most tokens generated.
        eos_id: the end-of-document id, or None.

    Raises:
        ValueError: the prefix is empty (there is nothing to predict the first token from).
    """
    if prefix.logits is None:
        raise ValueError("generate_until: the context is empty and the tokenizer has no start token to generate after")
    stops = [s for s in until if s]
    logits, state = prefix.logits, copy.deepcopy(prefix.state)
    device = network.embed.weight.device
    generated: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token == eos_id:
            break
        generated.append(token)
        text = decode(generated)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            return text[: min(cuts)]
        if len(generated) == max_new_tokens:
            break
        step_logits, state = network.step(torch.tensor([token], device=device), state)
        logits = step_logits[0].float()
    return text
