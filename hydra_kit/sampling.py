"""Choosing the next token: temperature, top-k, top-p (nucleus) and repetition penalty, as pure functions of logits.

Every function takes next-token logits ``(B, V)`` (one row per sequence of a batch) and returns a tensor of the same
shape (a filter: excluded tokens get ``-inf``) or the chosen ids ``(B,)``. They are applied in the order
:func:`sample_next` uses, which is the usual one (Hugging Face's ``generate`` and vLLM use it too): repetition
penalty, then temperature, then top-k, then top-p, then a draw from the softmax. Temperature 0 is greedy decoding:
the argmax of the penalised logits, with no draw.

:func:`decode` is the loop of :meth:`hydra_kit.network.HydraNetwork.generate` around them: prefill, then one recurrent
step per token. :data:`FINISHED` is the id it yields for a row that has already stopped (at its end-of-sequence id
or one of its stop sequences) while other rows of the batch go on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Generator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "FINISHED",
    "StepModel",
    "apply_repetition_penalty",
    "check_sampling",
    "decode",
    "ends_with_any",
    "prompt_rows",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]

FINISHED = -1  # yielded for a row that has stopped; never a token id


class _Output(Protocol):
    logits: Tensor
    state: list[dict[str, Any]]


class StepModel(Protocol):
    """What :func:`decode` needs of a model: :class:`hydra_kit.network.HydraNetwork` has it."""

    vocab_size: int

    def __call__(self, input_ids: Tensor, state: list[dict[str, Any]] | None = ..., *, collect_aux: bool = ...) -> _Output: ...

    def init_state(self, batch_size: int) -> list[dict[str, Any]]: ...

    def step(self, tokens: Tensor, state: list[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]: ...

    def eval(self) -> Any: ...

    def parameters(self) -> Any: ...


def check_sampling(*, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
    """Refuse sampling settings that would fail deep inside torch or silently mean something else.

    Raises:
        ValueError: ``"<setting>: expected <range>, got <value>"``.
    """
    # `not x >= 0` rather than `x < 0`: NaN compares false with everything and would reach torch.multinomial.
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected an integer >= 1, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1] (1: no nucleus filter), got {top_p}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty: expected a finite number > 0 (1: none; above 1 discourages repeats), got {repetition_penalty}")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Make the tokens a row has already seen less likely (penalty > 1) or more likely (penalty < 1).

    The penalty of CTRL (Keskar et al. 2019, https://arxiv.org/abs/1909.05858, section 4.1), in the form Hugging
    Face's ``RepetitionPenaltyLogitsProcessor`` uses for logits of either sign: a seen token's logit ``z`` becomes
    ``z / penalty`` where ``z > 0`` and ``z * penalty`` where ``z <= 0``, so with ``penalty > 1`` it always moves
    down; unseen tokens keep their logits. Each token counts once, however often it was seen.

    Args:
        logits: (B, V) next-token logits.
        seen: (B, V) bool, True for the ids already in each row (its prompt and what it generated so far).
        penalty: 1 leaves the logits unchanged.

    Returns:
        (B, V) the penalised logits (a new tensor).
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (and any tied with the k-th), set the others to ``-inf``.

    Args:
        logits: (B, V).
        k: at least 1; ``k >= V`` keeps everything.

    Returns:
        (B, V) the filtered logits.
    """
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass is at least ``p``; the others get ``-inf``.

    Nucleus sampling (Holtzman et al. 2020, https://arxiv.org/abs/1904.09751). Tokens are taken in order of
    decreasing probability, and a token is kept when the mass of the tokens before it is still below ``p``: the most
    likely token is always kept, and the set stops with the token that brings the mass to ``p`` or above.

    Args:
        logits: (B, V).
        p: in (0, 1]; 1 keeps every token of non-zero probability.

    Returns:
        (B, V) the filtered logits.
    """
    if p >= 1:
        return logits
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # exclusive cumulative mass, (B, V)
    keep_sorted = mass_before < p
    keep_sorted[:, 0] = True  # the most likely token, whatever rounding does
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of every row: greedy (``temperature == 0``) or drawn after the filters.

    Args:
        logits: (B, V) next-token logits.
        temperature: divides the logits before the softmax; 0 means greedy (argmax).
        top_k: sample only among the k most likely tokens (:func:`top_k_filter`).
        top_p: sample only from the nucleus of mass ``top_p`` (:func:`top_p_filter`), after top-k.
        repetition_penalty: applied to the ``seen`` ids first (:func:`apply_repetition_penalty`).
        seen: (B, V) bool, the ids each row has seen; needed when ``repetition_penalty != 1``.
        generator: random generator of the draw (reproducible sampling).

    Returns:
        (B,) int64 token ids.
    """
    if repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("sample_next: repetition_penalty needs `seen`, the (B, V) mask of the ids each row has seen")
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k is not None:
        scaled = top_k_filter(scaled, top_k)
    if top_p is not None:
        scaled = top_p_filter(scaled, top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]


def ends_with_any(ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> bool:
    """Whether ``ids`` ends with one of ``sequences`` (empty sequences never match)."""
    return any(0 < len(s) <= len(ids) and list(ids[len(ids) - len(s) :]) == list(s) for s in sequences)


def prompt_rows(prompt: Tensor | Sequence[Sequence[int] | Tensor], vocab_size: int) -> list[Tensor]:
    """The prompts of a generation as a list of B 1-D int64 tensors, checked.

    Args:
        prompt: (B, T) token ids with T >= 1, or B prompts of any lengths (each 1-D and non-empty).
        vocab_size: ids must lie in [0, vocab_size).

    Raises:
        ValueError: no prompt, an empty or not 1-D prompt, or an id outside the vocabulary.
    """
    if isinstance(prompt, Tensor):
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"generate: prompt must have shape (B, T) with T >= 1, got {tuple(prompt.shape)}")
        rows = list(prompt.long())
    else:
        rows = [torch.as_tensor(p, dtype=torch.long) for p in prompt]
        if not rows:
            raise ValueError("generate: no prompt given")
    for i, row in enumerate(rows):
        if row.dim() != 1 or row.numel() == 0:
            raise ValueError(f"generate: prompt {i} must be a non-empty 1-D sequence of token ids, got shape {tuple(row.shape)}")
        if int(row.max()) >= vocab_size or int(row.min()) < 0:
            raise ValueError(f"generate: prompt token ids must lie in [0, {vocab_size}); got {int(row.min())}..{int(row.max())}")
    return rows


@torch.inference_mode()
def decode(
    model: StepModel,
    prompt: Tensor | Sequence[Sequence[int] | Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    generator: torch.Generator | None = None,
) -> Generator[Tensor, None, None]:
    """The decoding loop of :meth:`hydra_kit.network.HydraNetwork.generate` (which documents the arguments).

    Prompts are grouped by length: each group is prefilled in one forward and then stepped, the groups in
    lock-step, so a row never sees padding and gets exactly the state it would get alone. Yields (B,) int64 per
    step, :data:`FINISHED` for rows that have stopped.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    rows = prompt_rows(prompt, model.vocab_size)
    model.eval()
    batch, device = len(rows), next(iter(model.parameters())).device
    groups: dict[int, list[int]] = defaultdict(list)  # prompt length -> row indices
    for i, row in enumerate(rows):
        groups[row.numel()].append(i)
    states, logits = [], torch.empty(0)
    for members in groups.values():
        out = model(torch.stack([rows[i] for i in members]).to(device), model.init_state(len(members)), collect_aux=False)
        states.append(out.state)
        if logits.numel() == 0:
            logits = out.logits.new_empty(batch, out.logits.shape[-1])  # (B, V)
        logits[members] = out.logits[:, -1]
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.vocab_size, dtype=torch.bool, device=device)  # (B, V)
        for i, row in enumerate(rows):
            seen[i, row.to(device)] = True
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in rows]
    for n in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seen=seen, generator=generator)
        token = token.masked_fill(finished, FINISHED)  # (B,)
        if seen is not None:
            seen[~finished, token[~finished]] = True
        stopping = torch.zeros_like(finished) if eos_id is None else token == eos_id
        if stop_sequences:
            for i in (~finished).nonzero()[:, 0].tolist():
                generated[i].append(int(token[i]))
                stopping[i] |= ends_with_any(generated[i], stop_sequences)
        yield token
        finished |= stopping
        if n + 1 == max_new_tokens or bool(finished.all()):
            return
        fed = token.clamp(min=0)  # a stopped row's state is never read again: any valid id will do
        for g, members in enumerate(groups.values()):
            logits[members], states[g] = model.step(fed[members], states[g])
