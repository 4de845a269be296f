"""An lm-evaluation-harness ``LM`` over a :class:`~hydra_kit.network.HydraNetwork` (``hydra-kit eval``).

The harness asks three things of a model, each answered through the recurrent state (:mod:`.scoring`):

* ``loglikelihood(context, continuation)``: the summed log-probability of the continuation's tokens after
  the context, and whether greedy decoding would produce exactly those tokens. Requests sharing a context
  (the choices of a multiple-choice question) read it once.
* ``loglikelihood_rolling(text)``: the log-likelihood of a whole document, read in pieces no longer than the
  model's ``max_seq_len`` (the whole text at once when it has none) with the state carried across pieces, so
  every token is conditioned on everything before it in the document.
* ``generate_until(context, {until, max_gen_toks})``: greedy decoding, one :meth:`HydraNetwork.step` per token,
  cut before the first stop string.

Every request starts after the end-of-document token when the tokenizer has one (what a model trained on
``hydra-kit prepare`` shards saw before each document); without one, a token with nothing before it is
scored under a uniform distribution (:mod:`.scoring`).

Import this module only when evaluating: it imports ``lm_eval``, the optional extra ``eval``, and says so in
one line when it is missing.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra_kit.errors import RecipeError
from hydra_kit.evaluation.scoring import Prefix, generate_until, prefill, score
from hydra_kit.evaluation.tokenizer import TextTokenizer
from hydra_kit.network import HydraNetwork

try:
    from lm_eval.api.model import LM
    from tqdm import tqdm
except ImportError:
    raise RecipeError("hydra-kit eval needs lm-evaluation-harness: pip install 'hydra-kit[eval]' (make setup installs it)") from None

__all__ = ["HydraEvalLM"]

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's own default for generation tasks that do not set max_gen_toks


class HydraEvalLM(LM):
    """lm-evaluation-harness model over a HydraNetwork and a tokenizer (one request at a time).

    Args:
        network: the model; it is put in eval mode.
        tokenizer: text <-> ids; its ids must lie in the network's vocabulary.
        chunk_size: the longest piece one forward reads (default: the network's ``max_seq_len``, or no limit).
        name: how the results' config names the model (e.g. the checkpoint path).
    """

    def __init__(self, network: HydraNetwork, tokenizer: TextTokenizer, *, chunk_size: int | None = None, name: str = "hydra-kit") -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise RecipeError(f"chunk_size: expected an integer >= 1 or None, got {chunk_size}")
        self.network = network.eval()
        self.text_tokenizer = tokenizer
        self.chunk_size = chunk_size if chunk_size is not None else network.max_seq_len
        self.name = name
        self.start_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self._start: Prefix | None = None
        self._warned_sampling = False

    # ------------------------------------------------------------- metadata
    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name (``bytes`` or its file): the harness keys cached requests by it."""
        return self.text_tokenizer.name

    def get_model_info(self) -> dict[str, Any]:
        """What the results' ``config`` records about the model."""
        return {
            "model": self.name,
            "model_num_parameters": sum(p.numel() for p in self.network.parameters()),
            "tokenizer": self.text_tokenizer.name,
            "vocab_size": self.network.vocab_size,
            "chunk_size": self.chunk_size,
        }

    # ------------------------------------------------------------- encoding
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (after the start token) and continuation ids, split as lm_eval's own models split them.

        Spaces ending the context move to the continuation, and the continuation's ids are those of the
        whole text after the context's: a tokenizer that merges across the boundary scores what it would
        have produced reading the text in one go.
        """
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        encode = self.text_tokenizer.encode
        context_ids = encode(context)
        continuation_ids = encode(context + continuation)[len(context_ids) :]
        return self.start_ids + context_ids, continuation_ids

    def _start_prefix(self) -> Prefix:
        if self._start is None:
            self._start = prefill(self.network, self.start_ids, chunk_size=self.chunk_size)
        return self._start

    # ------------------------------------------------------------- requests
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, is it the greedy continuation) per request."""
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, request in enumerate(requests):
            context, continuation = request.args
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            by_context.setdefault(tuple(context_ids), []).append((index, continuation_ids))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for context, items in by_context.items():
                prefix = prefill(self.network, list(context), chunk_size=self.chunk_size)
                for index, continuation_ids in items:
                    if continuation_ids:  # an empty continuation has probability 1, trivially greedy
                        logprobs, greedy = score(self.network, prefix, continuation_ids, chunk_size=self.chunk_size)
                        results[index] = (float(logprobs.sum()), bool(greedy.all()))
                    self.cache_hook.add_partial("loglikelihood", requests[index].args, results[index])
                    bar.update(1)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, every token conditioned on all before it (no truncation)."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args
            ids = self.text_tokenizer.encode(text)
            total = 0.0
            if ids:
                logprobs, _ = score(self.network, self._start_prefix(), ids, chunk_size=self.chunk_size)
                total = float(logprobs.sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut before the first ``until`` string, at most ``max_gen_toks``."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None)
            stops = [until] if isinstance(until, str) else list(until or [])
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if kwargs.get("do_sample") and not self._warned_sampling:
                log.warning("hydra-kit eval decodes greedily; the task's sampling settings (%s) are not used", kwargs)
                self._warned_sampling = True
            prefix = prefill(self.network, self.start_ids + self.text_tokenizer.encode(context), chunk_size=self.chunk_size)
            text = generate_until(self.network, prefix, self.text_tokenizer.decode, stops, max_new, eos_id=self.text_tokenizer.eos_id)
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results
