"""The common options of every ``hydra-kit experiment`` command, and how a run is described in its files.

:class:`Settings` holds what every experiment shares (seeds, steps, batch size, held-out examples, output
folder, ``--merge`` folders, ...); each experiment adds its own options and per-size defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hydra_kit.data.task import SyntheticTask
from hydra_kit.errors import RecipeError

__all__ = ["EVAL_SEED", "Settings", "add_common_arguments", "describe_task", "print_run", "resolve_settings"]

# Seed of the held-out evaluation examples: the same for every model and training seed (paired comparison).
EVAL_SEED = 1_000_000_007


@dataclass
class Settings:
    """The common options of every experiment command (per-experiment defaults fill the Nones)."""

    size: str
    seeds: int
    steps: int
    batch_size: int
    eval_per_level: int
    out: Path
    recipe: str | None
    lr: float
    threads: int = 1
    accelerator: str = "cpu"
    transformer_lr: float = 1e-3
    first_seed: int = 0
    merge: list[str] = field(default_factory=list)
    #: the labels of the models to train (empty: all); the JSON still describes every model, so --merge joins folders that split them
    models: list[str] = field(default_factory=list)
    #: training stages set by the experiment (see :attr:`TrainSettings.curriculum`), recorded in its JSON
    curriculum: list[dict[str, Any]] = field(default_factory=list)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every experiment shares to ``parser``."""
    parser.add_argument("--size", choices=("cpu", "full"), default="cpu", help="cpu: the default, minutes on 2 cores; full: the paper's scale (GPU)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per model (default: 3): FIRST..FIRST+N-1")
    parser.add_argument(
        "--first-seed", "--first_seed", dest="first_seed", type=int, default=0,
        help="the first training seed (default 0): run seeds in parallel processes, each to its own --out, then join them with --merge",
    )
    parser.add_argument(
        "--merge", nargs="+", default=[], metavar="DIR",
        help="train nothing: join the finished seeds in these output folders of this experiment (same settings, disjoint seeds) into --out",
    )
    parser.add_argument(
        "--models", nargs="+", default=[], metavar="LABEL",
        help="train only these of the compared models, by the label the tables print (quote 'hydra - workspace'); "
        "run the others in another process or session and join the folders with --merge. With --merge: take only these "
        "models' runs from the folders (e.g. the still-valid models of an earlier result)",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per model and seed")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None, help="training batch size")
    parser.add_argument("--eval", dest="eval_per_level", type=int, default=None, help="held-out examples per reported cell (default: 500)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of Hydra and its variants (default 3e-3)")
    parser.add_argument(
        "--transformer-lr", "--transformer_lr", dest="transformer_lr", type=float, default=None,
        help="peak learning rate of the dense transformer (default 1e-3: at 3e-3 it stayed on MQAR's no-skill plateau)",
    )
    parser.add_argument("--recipe", default=None, help="Hydra recipe YAML to use instead of the size's default model")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/experiments/NAME)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="where the models train and are evaluated (gpu: the first CUDA device)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: these small models are bound by per-op overhead, not FLOPs)"
    )


def resolve_settings(args: argparse.Namespace, name: str, defaults: dict[str, dict[str, Any]]) -> Settings:
    """Merge the command line over the experiment's defaults for ``--size``.

    Raises:
        RecipeError: a count is not positive.
    """
    d = defaults[args.size]
    settings = Settings(
        size=args.size,
        seeds=args.seeds if args.seeds is not None else d.get("seeds", 3),
        steps=args.steps if args.steps is not None else d["steps"],
        batch_size=args.batch_size if args.batch_size is not None else d.get("batch_size", 32),
        eval_per_level=args.eval_per_level if args.eval_per_level is not None else d.get("eval_per_level", 500),
        out=args.out if args.out is not None else Path("runs") / "experiments" / name,
        recipe=args.recipe,
        lr=args.lr if args.lr is not None else d.get("lr", 3e-3),
        threads=args.threads,
        accelerator=args.accelerator,
        transformer_lr=args.transformer_lr if args.transformer_lr is not None else d.get("transformer_lr", 1e-3),
        first_seed=args.first_seed,
        merge=[str(Path(m)) for m in args.merge],
        models=list(args.models),
    )
    for key in ("seeds", "steps", "batch_size", "eval_per_level"):
        if getattr(settings, key) <= 0:
            raise RecipeError(f"experiment {name}: --{key.replace('_', '-')} must be positive, got {getattr(settings, key)}")
    if settings.first_seed < 0:
        raise RecipeError(f"experiment {name}: --first-seed must be 0 or more, got {settings.first_seed}")
    if settings.lr <= 0 or settings.transformer_lr <= 0 or settings.threads <= 0:
        raise RecipeError(f"experiment {name}: --lr ({settings.lr}), --transformer-lr ({settings.transformer_lr}) and --threads ({settings.threads}) must be positive")
    if settings.accelerator == "gpu" and not torch.cuda.is_available():
        raise RecipeError(f"experiment {name}: --accelerator gpu, but torch sees no CUDA device on this machine")
    torch.set_num_threads(settings.threads)
    return settings




def describe_task(task: SyntheticTask) -> dict[str, Any]:
    """The training task's class and public settings (what ``--merge`` checks runs were trained on)."""
    plain = (bool, int, float, str, type(None))
    settings = {k: v for k, v in vars(task).items() if not k.startswith("_") and (isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v)))}
    return {"class": type(task).__name__, **settings}


def print_run(console: Console, run: dict[str, Any], steps: int) -> None:
    """One line per trained (model, seed): time and final training loss, and the folder of a merged run."""
    loss = "-" if run["final_train_loss"] is None else f"{run['final_train_loss']:.3f}"
    origin = f" (from {run['merged_from']})" if "merged_from" in run else ""
    console.print(f"  seed {run['seed']}  {run['model']:<24} trained {steps} steps in {run['train_seconds']:6.1f} s, final train loss {loss}{origin}")
