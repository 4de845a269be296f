"""Text in, text out: prompts encoded by a model's tokenizer, generated, decoded as they come, cut at stop strings.

:func:`stream_text` drives :meth:`hydra_kit.network.HydraNetwork.generate` (token ids, recurrent state, sampling)
with a :class:`hydra_kit.codec.TextCodec`: every row of the batch gets its own incremental decoder, so a character
split over several tokens comes out whole, and its own :class:`StopStrings`, so a stop string never reaches the
output, not even in part. A row ends at the tokenizer's end-of-document id, at its first stop string, or after
``max_new_tokens`` tokens; generation ends when every row has ended.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from hydra_kit.codec import TextCodec
from hydra_kit.network import HydraNetwork
from hydra_kit.sampling import FINISHED

__all__ = ["StopStrings", "generate_text", "stream_text"]


class StopStrings:
    """Cut a stream of text at the first stop string, holding back what could still become one.

    Example: with ``stops=["\\n\\n"]``, ``feed("a\\n")`` returns ``"a"`` (the newline may begin a stop string),
    then ``feed("\\nb")`` returns ``""`` and sets :attr:`stopped`; the text up to the stop string is all that came out.

    Args:
        stops: the stop strings (empty ones are ignored).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add ``text``; return what is now known to come before any stop string."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        # The longest end of the pending text that is the start of a stop string stays back.
        held = max((n for s in self.stops for n in range(1, min(len(s), len(self.pending) + 1)) if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held :]
        return out

    def flush(self) -> str:
        """The text held back, at the end of the stream (it did not become a stop string)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def stream_text(
    network: HydraNetwork,
    codec: TextCodec,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    stop_at_eos: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[list[str]]:
    """Yield, after every generated token, the new text of each prompt's continuation ("" where none is complete).

    Args:
        network: the model.
        codec: its tokenizer.
        prompts: B texts, or B lists of token ids.
        max_new_tokens: tokens to generate at most per row.
        stop: stop strings: a row's text ends before the first one it produces.
        stop_at_eos: end a row at the tokenizer's end-of-document id (when it has one).
        temperature, top_k, top_p, repetition_penalty, generator: sampling, as in :meth:`HydraNetwork.generate`.

    Yields:
        A list of B strings per step; the last one holds what the decoders and stop filters held back.

    Raises:
        ValueError: a prompt encodes to no token, or a sampling setting is out of range.
    """
    ids = [codec.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty: give at least one character")
    decoders = [codec.decoder() for _ in ids]
    stoppers = [StopStrings(stop) for _ in ids]
    done = [False] * len(ids)
    tokens = network.generate(
        ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_id=codec.eos_id if stop_at_eos else None, generator=generator,
    )
    try:
        for step in tokens:
            pieces = [""] * len(ids)
            for i, token in enumerate(step.tolist()):
                if done[i] or token == FINISHED:
                    continue
                pieces[i] = stoppers[i].feed(decoders[i].push(token))
                done[i] = stoppers[i].stopped
            yield pieces
            if all(done):  # every row met a stop string: nothing more to compute
                break
    finally:
        tokens.close()
    yield [s.feed(d.flush()) + s.flush() for d, s in zip(decoders, stoppers, strict=True)]


def generate_text(
    network: HydraNetwork,
    codec: TextCodec,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    stop_at_eos: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """The continuation of each prompt as text, without its stop string (:func:`stream_text`, collected)."""
    out = [""] * len(prompts)
    for pieces in stream_text(
        network, codec, prompts, max_new_tokens, stop=stop, stop_at_eos=stop_at_eos, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, generator=generator,
    ):
        out = [a + b for a, b in zip(out, pieces, strict=True)]
    return out
