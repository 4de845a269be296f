"""``hydra-kit generate``: stream text (or token ids) from an export folder or a checkpoint.

::

    hydra-kit generate --model export/ --prompt "The cat" [--prompt "A dog" ...] [--top_p 0.9] [--stop "\\n\\n"]
    hydra-kit generate --ckpt_path runs/text/version_0/checkpoints/last.ckpt --prompt "The cat" --temperature 0
    hydra-kit generate --ckpt_path last.ckpt --prompt-ids 3 40 7 [--prompt-ids 5 6 ...]

Text goes through the model's tokenizer: an export's (bytes or tokenizer.json), or the one a checkpoint's run
was trained with (:func:`hydra_kit.codec.find_tokenizer`; byte-level models, vocabulary >= 256, read UTF-8 bytes
otherwise). One prompt is streamed as it is generated; several are generated as one batch and printed in turn,
each after a ``==> prompt N <==`` line.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.errors import RecipeError

__all__ = ["main"]


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="hydra-kit generate", description=main.__doc__)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="DIR", help="export folder written by hydra-kit export (model.safetensors, config.json, tokenizer)")
    model.add_argument("--ckpt_path", metavar="CKPT", help="checkpoint written by hydra-kit fit")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", action="extend", nargs="+", help="text prompt(s), encoded by the model's tokenizer; several make one batch")
    prompt.add_argument("--prompt-ids", "--prompt_ids", dest="prompt_ids", metavar="ID", type=int, nargs="+", action="append", help="a prompt as token ids (repeat for a batch)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None, help="sample from the smallest set of tokens whose probability reaches p (nucleus)")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="above 1 makes tokens already in the text less likely (CTRL)")
    parser.add_argument("--stop", metavar="TEXT", action="append", default=[], help="stop a prompt's text before this string (repeatable; needs --prompt)")
    parser.add_argument("--ignore_eos", action="store_true", help="go on after the tokenizer's end-of-document token")
    parser.add_argument("--tokenizer", metavar="PATH", help="with --ckpt_path: the tokenizer (bytes, a tokenizer.json or a shard folder) instead of the run's")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _check_options(args: Any) -> None:
    from hydra_kit.sampling import check_sampling

    if args.max_new_tokens < 0:
        raise RecipeError(f"generate: --max_new_tokens: expected an integer >= 0, got {args.max_new_tokens}")
    try:
        check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    except ValueError as exc:
        raise RecipeError(f"generate: --{exc}") from None
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise RecipeError(f"generate: --seed: expected an integer in -2**63..2**64-1, got {args.seed}")
    if args.prompt is not None and not all(args.prompt):
        raise RecipeError("generate: --prompt is empty; give at least one character (or token ids with --prompt-ids)")
    if args.stop and args.prompt is None:
        raise RecipeError("generate: --stop needs a text --prompt (stop strings are text; --prompt-ids prints token ids)")
    if args.tokenizer is not None and args.model is not None:
        raise RecipeError("generate: --tokenizer is for --ckpt_path; an export folder (--model) brings its own tokenizer")


def _load(args: Any) -> tuple[Any, Any]:
    """The network and its tokenizer (or None) from --model or --ckpt_path."""
    from hydra_kit.codec import (
        ByteCodec,
        TokenizerSource,
        find_tokenizer,
        load_codec,
        tokenizer_from_option,
        verify_tokenizer,
    )
    from hydra_kit.export import load_tokenizer
    from hydra_kit.network import HydraNetwork

    if args.model is not None:
        return HydraNetwork.from_pretrained(args.model), load_tokenizer(args.model)
    from hydra_kit.checkpoint import load_model

    model, checkpoint = load_model(args.ckpt_path)
    source: TokenizerSource | None
    if args.tokenizer is not None:
        source = tokenizer_from_option(args.tokenizer)
        verify_tokenizer(source, checkpoint, args.ckpt_path)
    else:
        source = find_tokenizer(args.ckpt_path, checkpoint)
    codec = load_codec(source) if source is not None else None
    if codec is None and model.network.vocab_size >= 256:
        codec = ByteCodec()  # a byte-level model whose run says nothing else: text is its UTF-8 bytes
    return model.network, codec


def main(argv: list[str]) -> int:
    """Generate text or token ids from an export folder or a checkpoint, streaming one prompt as it is produced."""
    import torch

    from hydra_kit.generation import stream_text

    args = _parser().parse_args(argv)
    _check_options(args)
    network, codec = _load(args)
    vocab = network.vocab_size
    if args.prompt is not None and codec is None:
        raise RecipeError(f"--prompt needs a byte-level model (vocab_size >= 256) or a tokenizer; this one has {vocab}: use --prompt-ids")
    if codec is not None and codec.vocab_size > vocab:
        raise RecipeError(f"the tokenizer has {codec.vocab_size} token ids but the model only {vocab}: it is not this model's tokenizer")
    if args.prompt_ids is not None:
        bad = [i for row in args.prompt_ids for i in row if not 0 <= i < vocab]
        if bad:
            raise RecipeError(f"--prompt-ids: ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
    if args.top_k is not None and args.top_k > vocab:
        raise RecipeError(f"generate: --top_k: expected an integer in 1..{vocab} (the model's vocabulary), got {args.top_k}")
    generator = torch.Generator().manual_seed(args.seed)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "generator": generator}
    prompts = args.prompt if args.prompt is not None else args.prompt_ids
    try:
        if args.prompt is not None:
            pieces = stream_text(network, codec, prompts, args.max_new_tokens, stop=args.stop, stop_at_eos=not args.ignore_eos, **sampling)
        else:
            pieces = _stream_ids(network, prompts, args.max_new_tokens, None if codec is None or args.ignore_eos else codec.eos_id, sampling)
        _print(pieces, len(prompts))
    except BrokenPipeError:
        # The reader left (`| head -c 40`): stop quietly, as Unix tools do. Python would flush stdout again at exit
        # and fail on the closed pipe, so point it at devnull first (the Python docs' recipe, library/signal).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def _stream_ids(network: Any, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, sampling: dict[str, Any]) -> Any:
    """Per step, each row's new token id as text (``"17 "``), "" for a row that has stopped."""
    for step in network.generate(prompts, max_new_tokens, eos_id=eos_id, **sampling):
        yield ["" if t < 0 else f"{t} " for t in step.tolist()]


def _print(pieces: Any, rows: int) -> None:
    """Stream one row as it comes; print several, each after a ``==> prompt N <==`` line, when all are done."""
    if rows == 1:
        for step in pieces:
            sys.stdout.write(step[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    texts = [""] * rows
    for step in pieces:
        texts = [a + b for a, b in zip(texts, step, strict=True)]
    for i, text in enumerate(texts):
        sys.stdout.write(f"{'' if i == 0 else chr(10)}==> prompt {i + 1} <==\n{text}\n")
    sys.stdout.flush()
