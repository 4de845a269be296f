"""``hydra-kit inspect``: per-block gates, LayerScale, update norms and component stats of a checkpoint.

The report itself is :mod:`hydra_kit.inspection`'s; this module holds the command's options.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.errors import RecipeError

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Per-block gates, LayerScale, update norms and component statistics of a checkpoint on held-out examples."""
    from hydra_kit.checkpoint import load_model
    from hydra_kit.inspection import (
        TASKS,
        build_task,
        check_task,
        describe,
        inspect_model,
        plot,
        print_report,
        select_instances,
        trained_task,
    )

    parser = ArgumentParser(prog="hydra-kit inspect", description=main.__doc__, allow_abbrev=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by hydra-kit fit")
    parser.add_argument("--task", default=None, help=f"task to run ({', '.join(TASKS)}); default: the one the run was trained on")
    parser.add_argument("--task_args", default=None, help='JSON keywords for --task, e.g. \'{"num_pairs": 4}\'')
    parser.add_argument("--examples", type=int, default=64, help="held-out examples, run as one batch (default 64)")
    parser.add_argument("--seed", type=int, default=None, help="data seed of the held-out examples (default: the run's)")
    parser.add_argument("--component", action="append", default=[], metavar="NAME", help="only these instances (or instances of this component); repeatable")
    parser.add_argument("--out", default=None, help="PNG to write (default: beside the checkpoint, <name>-inspect.png)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        raise RecipeError(f"inspect: --examples must be at least 1, got {args.examples}")
    if args.task is None and args.task_args is not None:
        raise RecipeError("inspect: --task_args needs --task")
    model, checkpoint = load_model(args.ckpt_path)
    chosen = select_instances(model, args.component)
    seed = 0
    if args.task is not None:
        task = build_task(args.task, args.task_args)
    else:
        found = trained_task(args.ckpt_path, checkpoint)
        if found is None:
            raise RecipeError(f"inspect: the synthetic task {args.ckpt_path} was trained on is not known (no config.yaml of a synthetic-data run beside its checkpoints/ folder); name one with --task ({', '.join(TASKS)})")
        task, seed = found
    name = describe(task)
    check_task(model, task, name)
    seed = seed if args.seed is None else args.seed
    examples = [task.sample(seed, "val", i) for i in range(args.examples)]
    report = inspect_model(model, task, examples, chosen, name, seed)
    console = Console(highlight=False, width=None if Console().is_terminal else 160)
    print_report(report, args.ckpt_path, console)
    out = Path(args.out) if args.out else Path(args.ckpt_path).with_name(f"{Path(args.ckpt_path).stem}-inspect.png")
    console.print(f"wrote {plot(report, out)}")
    return 0
