"""``hydra-kit export``: write a checkpoint's model as a folder that loads without Lightning (docs/export.md).

::

    hydra-kit export --ckpt_path runs/text/version_0/checkpoints/last.ckpt --out exports/text
    hydra-kit export --ckpt_path last.ckpt --out exports/bpe --tokenizer data/wikitext-2-bpe4k [--force]

The folder holds model.safetensors, config.json and the tokenizer (:mod:`hydra_kit.export`); the tokenizer is the
one the run was trained with (:func:`hydra_kit.codec.find_tokenizer`) unless ``--tokenizer`` names it.
``HydraNetwork.from_pretrained(DIR)`` and ``hydra-kit generate --model DIR`` read it.
"""

from __future__ import annotations

from hydra_kit.config.arguments import ArgumentParser

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Export a checkpoint's network as model.safetensors + config.json + tokenizer, loadable without Lightning."""
    from hydra_kit.checkpoint import load_model
    from hydra_kit.codec import TokenizerSource, find_tokenizer, load_codec, tokenizer_from_option, verify_tokenizer
    from hydra_kit.errors import RecipeError
    from hydra_kit.export import CONFIG_FILE, WEIGHTS_FILE, save_pretrained, split_hparams
    from hydra_kit.network import HydraNetwork

    parser = ArgumentParser(prog="hydra-kit export", description=main.__doc__)
    parser.add_argument("--ckpt_path", metavar="CKPT", required=True, help="checkpoint written by hydra-kit fit")
    parser.add_argument("--out", metavar="DIR", required=True, help="the folder to write (refused if it exists, unless --force)")
    parser.add_argument("--tokenizer", metavar="PATH", help="bytes, a tokenizer.json, or a shard folder of hydra-kit prepare (default: the run's own)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    args = parser.parse_args(argv)

    model, checkpoint = load_model(args.ckpt_path)
    network = model.network
    source: TokenizerSource | None
    if args.tokenizer is not None:
        source = tokenizer_from_option(args.tokenizer)
        verify_tokenizer(source, checkpoint, args.ckpt_path)
    else:
        source = find_tokenizer(args.ckpt_path, checkpoint)
    if source is not None:
        codec = load_codec(source)  # reads it once now, so a broken tokenizer is refused before anything is written
        if codec.vocab_size > network.vocab_size:
            raise RecipeError(
                f"tokenizer {source.describe()}: it has {codec.vocab_size} token ids but the model only {network.vocab_size}; "
                f"it is not this model's tokenizer (pass the right one with --tokenizer)"
            )
    model_config, training_config = split_hparams(HydraNetwork, checkpoint["hyper_parameters"])
    out = save_pretrained(
        network, args.out, model_config=model_config, training_config=training_config, tokenizer=source, source=str(args.ckpt_path), force=args.force
    )
    params = sum(p.numel() for p in network.parameters())
    if source is None:
        tokenizer = "no tokenizer: the model reads token ids (pass --tokenizer bytes or a tokenizer.json if it reads text)"
    else:
        tokenizer = "tokenizer: bytes (UTF-8)" if source.kind == "bytes" else f"tokenizer.json (from {source.path})"
    print(f"exported {args.ckpt_path} -> {out}: {WEIGHTS_FILE} ({params:,} parameters), {CONFIG_FILE}, {tokenizer}")
    return 0
