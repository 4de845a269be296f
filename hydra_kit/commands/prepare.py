"""``hydra-kit prepare``: tokenize a text corpus into train/validation token shards that training reads from disk.

::

    hydra-kit prepare --input corpus/ --tokenizer bpe --vocab_size 4096 --out data/corpus-bpe4k
    hydra-kit prepare --input valid.txt --val_input test.txt --documents blank_lines --tokenizer bytes --out data/wt2-bytes
    hydra-kit fit --config recipes/text-bpe.yaml --data.init_args.path data/corpus-bpe4k

The work is done by :func:`hydra_kit.data.prepare.prepare`; the format, what a document is and the memory it
takes are in docs/data.md. A user error (a missing or binary corpus, a vocabulary too small) raises
:class:`~hydra_kit.recipe.RecipeError`, which the dispatcher prints as one ``error:`` line.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from hydra_kit.recipe import RecipeError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one RecipeError line naming the command."""

    def error(self, message: str) -> NoReturn:
        raise RecipeError(f"{self.prog}: {' '.join(message.split())} (all options: {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    from hydra_kit.data.corpus import DOCUMENT_MODES

    parser = _Parser(prog="hydra-kit prepare", description=main.__doc__, allow_abbrev=False)
    parser.add_argument("--input", required=True, help="a UTF-8 text file, or a folder whose files matching --pattern are read (recursively)")
    parser.add_argument("--out", required=True, help="the output folder (meta.json, tokenizer.json, train-*.bin, val-*.bin)")
    parser.add_argument("--tokenizer", default="bpe", help="bpe (train a byte-level BPE), bytes (256 bytes + end-of-document), or a tokenizer.json to reuse")
    parser.add_argument("--vocab_size", type=int, default=None, help="ids of the BPE, at least 257 (e.g. 4096)")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of the documents held out for validation")
    parser.add_argument("--val_input", default=None, help="a separate validation file or folder (then all of --input trains)")
    parser.add_argument("--seed", type=int, default=0, help="seed of which documents are held out")
    parser.add_argument("--documents", choices=DOCUMENT_MODES, default="file", help="what a document is: a file, a block between blank lines, or a line")
    parser.add_argument("--pattern", default="*.txt", help="file-name pattern for a folder's files")
    parser.add_argument("--shard_tokens", type=int, default=1 << 26, help="token ids per shard file")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus prepared in --out before")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def main(argv: list[str]) -> int:
    """Tokenize a text corpus (a file or folder) into train and validation token shards for training."""
    args = _parser().parse_args(argv)
    from hydra_kit.data.prepare import prepare

    meta = prepare(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        val_input=args.val_input,
        seed=args.seed,
        documents=args.documents,
        pattern=args.pattern,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if not args.quiet:
        from rich.console import Console

        console = Console(soft_wrap=True)
        tokenizer = meta["tokenizer"]
        console.print(f"{args.out}: {tokenizer['kind']} tokenizer, {meta['vocab_size']:,} ids (end of document: {meta['eos_id']}), {meta['dtype']} shards")
        for split, info in meta["splits"].items():
            per = info["bytes"] / max(1, info["tokens"])
            console.print(f"  {split:5s} {info['documents']:>10,} documents  {info['tokens']:>14,} tokens  {len(info['shards'])} shard(s)  {per:.2f} bytes/token")
        console.print(f"train on it: hydra-kit fit --config recipes/text-bpe.yaml --data.init_args.path {args.out} --model.vocab_size {meta['vocab_size']}")
    return 0
