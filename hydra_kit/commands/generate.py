"""``hydra-kit generate``: stream tokens from a checkpoint (a text prompt for byte-level models, or token ids)."""

from __future__ import annotations

import math
import os
import sys

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.errors import RecipeError

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Generate tokens from a checkpoint, streaming them as they are produced."""
    import codecs

    import torch

    from hydra_kit.checkpoint import load_model

    parser = ArgumentParser(prog="hydra-kit generate", description=main.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by hydra-kit fit")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt, encoded as UTF-8 bytes (byte-level models, vocab >= 256)")
    prompt.add_argument("--prompt-ids", "--prompt_ids", dest="prompt_ids", type=int, nargs="+", help="prompt as token ids")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        raise RecipeError(f"generate: --max_new_tokens: expected an integer >= 0, got {args.max_new_tokens}")
    # `not x >= 0` rather than `x < 0`: NaN compares false with everything and reached torch.multinomial.
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise RecipeError(f"generate: --temperature: expected a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise RecipeError(f"generate: --top_k: expected an integer >= 1, got {args.top_k}")
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise RecipeError(f"generate: --seed: expected an integer in -2**63..2**64-1, got {args.seed}")
    if args.prompt is not None and not args.prompt:
        raise RecipeError("generate: --prompt is empty; give at least one character (or token ids with --prompt-ids)")
    model, _ = load_model(args.ckpt_path)
    vocab = model.hparams["vocab_size"]
    if args.prompt is not None:
        if vocab < 256:
            raise RecipeError(f"--prompt needs a byte-level model (vocab_size >= 256); this one has {vocab}: use --prompt-ids")
        ids = list(args.prompt.encode("utf-8"))
    else:
        ids = args.prompt_ids
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise RecipeError(f"--prompt-ids: ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
    if args.top_k is not None and args.top_k > vocab:
        raise RecipeError(f"generate: --top_k: expected an integer in 1..{vocab} (the model's vocabulary), got {args.top_k}")
    generator = torch.Generator().manual_seed(args.seed)
    tokens = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=generator)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for token in tokens:
            value = int(token[0])
            text = decoder.decode(bytes([value])) if args.prompt is not None and value < 256 else f"{value} "
            sys.stdout.write(text)
            sys.stdout.flush()
        # Bytes of a character the generation cut short come out as U+FFFD, as a whole decode would give them.
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`| head -c 40`): stop quietly, as Unix tools do. Python would flush stdout again at exit
        # and fail on the closed pipe, so point it at devnull first (the Python docs' recipe, library/signal).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0
