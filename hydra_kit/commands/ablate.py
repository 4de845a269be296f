"""``hydra-kit ablate``: what each component instance is worth, by paired training runs or by knock-outs.

::

    hydra-kit ablate --drop pkm --drop sga,workspace --config recipes/full.yaml --seeds 3 --trainer.max_steps 300
    hydra-kit ablate --mode knockout --ckpt_path runs/full/version_0/checkpoints/last.ckpt --drop pkm --drop sga

The runs, the table and the files are :mod:`hydra_kit.ablate`'s; this module parses the options.
"""

from __future__ import annotations

import time
from pathlib import Path

from hydra_kit import reporting
from hydra_kit.ablate import (
    DEFAULT_RECIPE,
    RunResult,
    check_drops,
    knockout_runs,
    parse_drops,
    print_table,
    recipe_from_run,
    recipe_instances,
    run_config,
    summarise,
    train_run,
    write_outputs,
)
from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.errors import RecipeError

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Paired runs with and without component instances (or knock-outs of one checkpoint), with a table of deltas."""
    parser = ArgumentParser(
        prog="hydra-kit ablate",
        description=main.__doc__,
        epilog="Arguments after the known options are LightningCLI overrides for every run, e.g. --trainer.max_steps 50.",
        allow_abbrev=False,
    )
    parser.add_argument("--drop", action="append", required=True, metavar="NAME[,NAME]", help="instances to remove in one run (repeatable)")
    parser.add_argument(
        "--config", "-c", default=None, help=f"recipe (train mode default {DEFAULT_RECIPE}; knockout mode default: the run's config.yaml)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run with seeds 0..N-1 (train mode)")
    parser.add_argument("--out", default=None, help="output folder (default runs/ablate/<recipe stem>-<timestamp>)")
    parser.add_argument("--mode", choices=("train", "knockout"), default="train")
    parser.add_argument("--ckpt_path", default=None, help="knockout mode: the trained checkpoint to evaluate")
    parser.add_argument("--warmup_batches", type=int, default=5, help="batches of each run not timed for tokens/s (default 5)")
    args, overrides = parser.parse_known_args(argv)
    if args.seeds < 1:
        raise RecipeError(f"ablate: --seeds must be >= 1, got {args.seeds}")
    if args.mode == "knockout" and (args.ckpt_path is None or args.seeds != 1):
        raise RecipeError("ablate: --mode knockout needs --ckpt_path and evaluates one checkpoint (no --seeds)")
    if args.mode == "train" and args.ckpt_path is not None:
        raise RecipeError("ablate: --ckpt_path is for --mode knockout; train mode trains every run from scratch")
    if args.config is None:
        saved = None if args.mode == "train" else run_config(args.ckpt_path)
        if args.mode == "knockout" and saved is None:
            raise RecipeError(f"ablate: no config.yaml beside {args.ckpt_path}'s checkpoints/ folder; name the recipe it was trained with: --config RECIPE")
        stem = saved.parent.parent.name if saved is not None else Path(DEFAULT_RECIPE).stem
    else:
        stem = Path(args.config).stem
    suffix = "" if args.mode == "train" else "-knockout"
    out = Path(args.out or f"runs/ablate/{stem}{suffix}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.config is None:
        args.config = DEFAULT_RECIPE if saved is None else recipe_from_run(saved, out)
    drops = parse_drops(args.drop)
    console = reporting.console()

    if args.mode == "train":
        instances, _ = recipe_instances(args.config, overrides)
        check_drops(drops, instances, args.config)
        configs: list[tuple[str, ...]] = [(), *drops]
        results: list[RunResult] = []
        total = len(configs) * args.seeds
        for seed in range(args.seeds):
            for dropped in configs:
                what = f"without {', '.join(dropped)}" if dropped else "full recipe"
                console.print(f"[bold]ablate[/]: run {len(results) + 1}/{total}: {what}, seed {seed}")
                results.append(train_run(args.config, overrides, dropped, seed, out, args.warmup_batches))
        kind = "train"
    else:
        results = knockout_runs(args.config, overrides, args.ckpt_path, drops, out, console, args.warmup_batches)
        kind = "val"
    rows = summarise(results)
    meta = {"mode": args.mode, "recipe": args.config, "seeds": args.seeds, "ckpt_path": args.ckpt_path, "overrides": overrides, "throughput": kind}
    if args.mode == "train":
        title = f"ablation of {args.config} (train, {args.seeds} seed{'s' if args.seeds > 1 else ''}; Δ = run - full)"
    else:
        title = f"knock-outs of {args.ckpt_path} (no retraining; Δ = run - as is)"
    print_table(rows, title, kind, console)
    for path in write_outputs(rows, results, meta, out):
        console.print(f"wrote {path}")
    return 0
