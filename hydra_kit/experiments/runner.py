"""The shared machinery of ``hydra-kit experiment``: build the compared models, train them, evaluate per level.

Every experiment (E1, E3-E6 of HYDRA.md section 4; E2 is ``hydra-kit bench``) follows one protocol:

1. **Models are recipes** (the ``model`` section of a recipe, as a dict): Hydra; Hydra with the component
   under study removed (the recipe's ``dropped`` list, so the ablated model allocates nothing for it); and a
   dense transformer (``attention`` + ``mlp`` components, same width and depth) whose SwiGLU hidden width is
   chosen so its total (or, for E5, active) parameter count is within 5 percent of Hydra's
   (:func:`hydra_kit.experiments.models.dense_transformer`). The counts are reported with every result.
2. **Training** uses the ordinary Lightning path: :class:`~hydra_kit.model.HydraLM` and
   :class:`~hydra_kit.data.SyntheticDataModule` with a fresh example stream per seed (``seed_everything`` and the
   data module's ``seed``), AdamW with warm-up and cosine decay, gradient clipping at 1.0, on the CPU.
3. **Evaluation** draws the held-out split (``task.sample(EVAL_SEED, "val", i)``: the same examples for every
   model and seed, disjoint from every training stream by the task's hash split), keeps the first
   ``n_per_level`` examples of each difficulty level (the task's meta key) and scores accuracy at the answer
   positions (argmax of the logits; an example with several answers counts each).
4. **Aggregation**: mean and standard deviation (n - 1 denominator) over seeds per (model, level), a rich
   table, ``<name>.csv`` (the summary), ``<name>.json`` (settings, parameter counts, every per-seed record, the
   summary) and ``<name>.png`` (the figure); the aggregation and the files are in :mod:`hydra_kit.experiments.report`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from hydra_kit.data.synthetic import SyntheticDataModule
from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask
from hydra_kit.experiments.models import ModelSpec, count_parameters
from hydra_kit.model import HydraLM, ModelOutput
from hydra_kit.recipe import RecipeError

TaskT = TypeVar("TaskT", bound=SyntheticTask)

# Seed of the held-out evaluation examples: the same for every model and training seed (paired comparison).
EVAL_SEED = 1_000_000_007

# ------------------------------------------------------------------------------------------------ training
@dataclass
class TrainSettings:
    """How each compared model is trained."""

    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    accelerator: str = "cpu"
    #: :class:`~hydra_kit.callbacks.Curriculum` stages (data changes by step), empty for one task throughout
    curriculum: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainedModel:
    """A trained model and what its training cost."""

    model: HydraLM
    seconds: float
    final_loss: float | None


def train(spec: ModelSpec, task: SyntheticTask, seed: int, settings: TrainSettings) -> TrainedModel:
    """Train ``spec`` on ``task``'s training split with Lightning (float32, no logger, no checkpoints).

    With ``settings.curriculum`` the task changes at the stages' steps (:class:`~hydra_kit.callbacks.Curriculum`);
    ``task`` is then the task of the last stage, the one evaluated. The model is returned on the device it
    trained on (``settings.accelerator``), in eval mode.
    """
    import lightning as L

    from hydra_kit.callbacks.curriculum import Curriculum

    # One experiment trains many models: Lightning's per-Trainer banners (accelerator, tips) would bury the table.
    for logger_name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    L.seed_everything(seed, workers=True, verbose=False)
    config = dict(spec.config, lr=settings.lr, warmup_steps=min(settings.warmup_steps, max(1, settings.steps // 4)))
    model = HydraLM(**config)
    data = SyntheticDataModule(task, batch_size=settings.batch_size, train_size=settings.steps * settings.batch_size, val_size=settings.batch_size, seed=seed)
    trainer = L.Trainer(
        accelerator=settings.accelerator,
        devices=1,
        max_steps=settings.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Curriculum(copy.deepcopy(settings.curriculum))] if settings.curriculum else None,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*val_dataloader.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    loss = trainer.callback_metrics.get("train/loss")
    model.eval()
    return TrainedModel(model, seconds, None if loss is None else float(loss))


# --------------------------------------------------------------------------------------------- evaluation
def build_task(task_class: Callable[..., TaskT], **kwargs: Any) -> TaskT:
    """``task_class(**kwargs)``, its argument errors (from the experiment's options) as one-line RecipeErrors.

    Raises:
        RecipeError: the task refused its arguments; the message is the task's own, which names the argument.
    """
    try:
        return task_class(**kwargs)
    except ValueError as exc:
        raise RecipeError(f"experiment: {exc}") from None


def eval_set(task: SyntheticTask, level_key: str, levels: Sequence[Any], n_per_level: int, seed: int = EVAL_SEED) -> dict[Any, list[Example]]:
    """The first ``n_per_level`` held-out examples of each level, in index order (deterministic).

    Raises:
        RecipeError: the task never produced some level (a level outside what the task generates).
    """
    wanted = {level: [] for level in levels}  # type: dict[Any, list[Example]]
    limit = 200 * n_per_level * max(1, len(wanted))
    for index in range(limit):
        example = task.sample(seed, "val", index)
        if level_key not in example.meta:
            raise RecipeError(f"experiment: {type(task).__name__} examples have no meta key {level_key!r}; keys: {sorted(example.meta)}")
        bucket = wanted.get(example.meta[level_key])
        if bucket is not None and len(bucket) < n_per_level:
            bucket.append(example)
        if all(len(v) >= n_per_level for v in wanted.values()):
            return wanted
    short = {k: len(v) for k, v in wanted.items() if len(v) < n_per_level}
    raise RecipeError(f"experiment: {type(task).__name__} gave too few held-out examples for {level_key} levels {short} after {limit} draws")


def stack(examples: Sequence[Example]) -> tuple[Tensor, Tensor]:
    """(B, L) input ids and targets of examples of one length."""
    ids = torch.from_numpy(np.stack([e.input_ids for e in examples]))
    targets = torch.from_numpy(np.stack([e.targets for e in examples]))
    return ids, targets


@dataclass
class CellResult:
    """Accuracy of one model on one level's examples, with the means of the model's stats over batches."""

    correct: int
    answers: int
    examples: int
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.answers)


@torch.inference_mode()
def evaluate(
    model: HydraLM,
    examples: Sequence[Example],
    batch_size: int = 128,
    on_batch: Callable[[ModelOutput, Tensor], None] | None = None,
) -> CellResult:
    """Accuracy at the answer positions of ``examples``; ``on_batch(output, input_ids)`` sees every forward."""
    model.eval()
    correct = answers = 0
    stat_sums: dict[str, float] = {}
    batches = 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        ids, targets = (t.to(device) for t in stack(examples[start : start + batch_size]))
        out = model(ids)
        mask = targets != IGNORE_INDEX
        correct += int((out.logits.argmax(-1)[mask] == targets[mask]).sum())
        answers += int(mask.sum())
        for k, v in out.stats.items():
            stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
        batches += 1
        if on_batch is not None:
            on_batch(out, ids)
    return CellResult(correct, answers, len(examples), {k: v / max(1, batches) for k, v in stat_sums.items()})


@torch.inference_mode()
def latency_ms(model: HydraLM, example: Example, repeats: int = 10) -> float:
    """Median wall time (ms) of one forward over one example (batch 1), after two warm-up calls."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.from_numpy(example.input_ids)[None].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        model(ids)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(ids)
        sync()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def peak_memory_mb(config: dict[str, Any], seq_len: int) -> float | None:
    """Peak RSS growth (MB) of one batch-1 inference forward of length ``seq_len`` in a fresh subprocess.

    Uses ``hydra-kit bench``'s probe (:func:`hydra_kit.bench.measure_peak_memory`) on a temporary recipe, so
    the activations and workspaces of the forward are measured, not the weights; None if the probe failed.
    """
    import tempfile

    import yaml

    from hydra_kit.bench import measure_peak_memory

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.yaml"
        path.write_text(yaml.safe_dump({"model": config}), encoding="utf-8")
        return measure_peak_memory(str(path), seq_len, "infer", 1, None)


# --------------------------------------------------------------------------------------------------- CLI
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
        "run the others in another process or session and join the folders with --merge",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per model and seed")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None, help="training batch size")
    parser.add_argument("--eval", dest="eval_per_level", type=int, default=None, help="held-out examples per reported cell (default: 500)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of Hydra and its variants (default 3e-3)")
    parser.add_argument(
        "--transformer-lr", "--transformer_lr", dest="transformer_lr", type=float, default=None,
        help="peak learning rate of the dense transformer (default 1e-3: at 3e-3 it stayed on MQAR's no-skill plateau, issue 17)",
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


def train_settings(settings: Settings, spec: ModelSpec | None = None) -> TrainSettings:
    """How ``spec`` trains: the experiment's settings, with the model's own learning rate where it has one."""
    lr = spec.lr if spec is not None and spec.lr is not None else settings.lr
    return TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=lr, accelerator=settings.accelerator, curriculum=settings.curriculum)


def describe_models(console: Console, specs: Sequence[ModelSpec]) -> dict[str, dict[str, int]]:
    """Print and return the total and active parameter counts of the compared models."""
    counts = {s.label: count_parameters(s.config) for s in specs}
    table = Table(title="compared models")
    for column in ("model", "total params", "active params", "note"):
        table.add_column(column, justify="left" if column in ("model", "note") else "right")
    for s in specs:
        note = s.note if s.lr is None else f"{s.note}; lr {s.lr:g}"
        table.add_row(s.label, f"{counts[s.label]['total_params']:,}", f"{counts[s.label]['active_params']:,}", note)
    console.print(table)
    return counts


Measure = Callable[[TrainedModel, ModelSpec, int], list[dict[str, Any]]]


def run_grid(
    console: Console,
    specs: Sequence[ModelSpec],
    task: SyntheticTask,
    settings: Settings,
    measure: Measure,
    on_seed: Callable[[list[dict[str, Any]], list[dict[str, Any]]], object] | None = None,
    *,
    name: str = "",
    baselines: list[dict[str, Any]] | None = None,
    where: dict[str, Any] | None = None,
    merged_lists: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train every model (of ``settings.models``, if named) for every seed on ``task`` and collect ``measure``'s records (model, seed added).

    ``on_seed(records, runs)`` is called after each complete seed (every chosen model trained and measured), so the
    output files of an interrupted experiment hold the seeds that finished, with ``n_seeds`` saying how many.

    With ``settings.merge`` nothing is trained: the records and runs come from the ``<name>.json`` files of those
    folders (:func:`hydra_kit.experiments.merge.load_merged`, checked against ``specs`` and ``baselines``), keeping the rows that match
    ``where`` (for an experiment that calls this once per level), and each key of ``merged_lists`` (per-run
    records the experiment keeps beside ``records``, such as E5's routing counts) is extended from the files.

    Returns:
        The evaluation records and one training record per (model, seed): seconds, final training loss.
    """
    if settings.merge:
        from hydra_kit.experiments.merge import merged_grid  # merge.py builds on this module's types, so not at the top

        return merged_grid(console, specs, task, settings, name, baselines, where or {}, merged_lists or {})
    labels = [s.label for s in specs]
    unknown = [m for m in settings.models if m not in labels]
    if unknown:
        raise RecipeError(f"experiment {name}: --models {', '.join(map(repr, unknown))}: no such model here; available: {', '.join(map(repr, labels))}")
    chosen = [s for s in specs if not settings.models or s.label in settings.models]
    records: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
        for spec in chosen:
            trained = train(spec, task, seed, train_settings(settings, spec))
            rows = measure(trained, spec, seed)
            for row in rows:
                row.setdefault("model", spec.label)
                row.setdefault("seed", seed)
            records.extend(rows)
            run = {"model": spec.label, "seed": seed, "train_seconds": trained.seconds, "final_train_loss": trained.final_loss, "train_task": describe_task(task)}
            print_run(console, run, settings.steps)
            runs.append(run)
        if on_seed is not None:
            on_seed(records, runs)
    return records, runs


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


def payload(name: str, settings: Settings, specs: Sequence[ModelSpec], counts: dict[str, dict[str, int]], extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON body common to every experiment: settings, models (config and counts), extra fields."""
    return {
        "experiment": name,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
        "eval_seed": EVAL_SEED,
        "models": {s.label: {"note": s.note, "lr": s.lr if s.lr is not None else settings.lr, **counts[s.label], "config": s.config} for s in specs},
        **extra,
    }
