"""The shared machinery of ``hydra-kit experiment``: build the compared models, train them, evaluate per level.

Every experiment (E1, E3-E6 of docs/design.md section 4; E2 is ``hydra-kit bench``) follows one protocol:

1. **Models are recipes** (the ``model`` section of a recipe, as a dict): Hydra; Hydra with the component
   under study removed (the recipe's ``dropped`` list, so the ablated model allocates nothing for it); and a
   dense transformer (``attention`` + ``mlp`` components, same width and depth) whose SwiGLU hidden width is
   chosen so its total (or, for E5, active) parameter count is within 5 percent of Hydra's
   (:func:`hydra_kit.experiments.models.dense_transformer`). The counts are reported with every result.
2. **Training** uses the ordinary Lightning path: :class:`~hydra_kit.model.HydraLM` and
   :class:`~hydra_kit.data.SyntheticDataModule` with a fresh example stream per seed (``seed_everything`` and the
   data module's ``seed``), AdamW with warm-up and cosine decay, and a Trainer built from the defaults of every
   hydra-kit run (:func:`hydra_kit.config.trainer.build_trainer`: gradient clipping at 1.0, ...).
3. **Evaluation** draws the held-out split (``task.sample(EVAL_SEED, "val", i)``: the same examples for every
   model and seed, disjoint from every training stream by the task's hash split), keeps the first
   ``n_per_level`` examples of each difficulty level (the task's meta key) and scores accuracy at the answer
   positions (argmax of the logits; an example with several answers counts each).
4. **Aggregation**: mean and standard deviation (n - 1 denominator) over seeds per (model, level), a rich
   table, ``<name>.csv`` (the summary), ``<name>.json`` (settings, parameter counts, every per-seed record, the
   summary) and ``<name>.png`` (the figure); the aggregation and the files are in :mod:`hydra_kit.experiments.report`
   (on :mod:`hydra_kit.reporting`: one seed has no spread).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from lightning.pytorch import Callback
from rich.console import Console
from rich.table import Table
from torch import Tensor

from hydra_kit.config.trainer import build_trainer
from hydra_kit.data.synthetic import SyntheticDataModule
from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask
from hydra_kit.errors import RecipeError
from hydra_kit.experiments.merge import merged_grid
from hydra_kit.experiments.models import ModelSpec, count_parameters
from hydra_kit.experiments.resume import TrainingClock, checkpoint_folder, claim_checkpoint_folder, progress_line
from hydra_kit.experiments.settings import (
    EVAL_SEED,
    Settings,
    add_common_arguments,
    describe_task,
    print_run,
    resolve_settings,
)
from hydra_kit.model import HydraLM, ModelOutput

__all__ = [
    "EVAL_SEED", "IGNORE_INDEX", "CellResult", "RecipeError", "Settings", "TrainSettings", "TrainedModel", "add_common_arguments",
    "build_task", "checkpoint_folder", "describe_models", "describe_task", "eval_set", "evaluate", "latency_ms", "payload", "peak_memory_mb",
    "print_run", "resolve_settings", "run_grid", "stack", "train", "train_settings",
]

TaskT = TypeVar("TaskT", bound=SyntheticTask)

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


def train(
    spec: ModelSpec,
    task: SyntheticTask,
    seed: int,
    settings: TrainSettings,
    checkpoints: Path | None = None,
    report: Callable[[str], object] | None = None,
) -> TrainedModel:
    """Train ``spec`` on ``task``'s training split with Lightning (float32, no logger).

    With ``settings.curriculum`` the task changes at the stages' steps (:class:`~hydra_kit.callbacks.Curriculum`);
    ``task`` is then the task of the last stage, the one evaluated. The model is returned on the device it
    trained on (``settings.accelerator``), in eval mode.

    With ``checkpoints`` (a folder of this run alone) ``last.ckpt`` is written there atomically every twentieth of
    the run and at its end, and a run that finds one continues from it: a killed experiment loses at most a
    twentieth of a run, and a finished run is evaluated again without training. A resumed run trains exactly as
    an uninterrupted one (the data position, curriculum and random state are in the checkpoint). ``report``
    receives a line of progress every tenth of the run.

    Raises:
        RecipeError: ``checkpoints`` holds another run's checkpoint.
    """
    import lightning as L

    from hydra_kit.callbacks.curriculum import Curriculum
    from hydra_kit.checkpoint import AtomicCheckpointIO, LastCheckpoint

    # One experiment trains many models: Lightning's per-Trainer banners (accelerator, tips) would bury the table.
    for logger_name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    L.seed_everything(seed, workers=True, verbose=False)
    config = dict(spec.config, lr=settings.lr, warmup_steps=min(settings.warmup_steps, max(1, settings.steps // 4)))
    model = HydraLM(**config)
    data = SyntheticDataModule(task, batch_size=settings.batch_size, train_size=settings.steps * settings.batch_size, val_size=settings.batch_size, seed=seed)
    clock = TrainingClock(report, every=max(1, settings.steps // 10))
    callbacks: list[Callback] = [clock]
    if settings.curriculum:
        callbacks.append(Curriculum(copy.deepcopy(settings.curriculum)))
    resume_from = None
    if checkpoints is not None:
        identity = {"model": spec.config, "seed": seed, "task": describe_task(task), **{k: v for k, v in asdict(settings).items() if k != "accelerator"}}
        resume_from = claim_checkpoint_folder(checkpoints, identity)
        callbacks.append(LastCheckpoint(dirpath=checkpoints, monitor=None, save_top_k=0, save_last=True, every_n_train_steps=max(1, settings.steps // 20)))
    # The Trainer defaults of every hydra-kit run (hydra_kit.config.trainer), without what an experiment does not
    # keep: no logger, progress bar or model summary, and no validation during training (the experiment evaluates
    # the trained model itself, on held-out examples).
    trainer = build_trainer(
        accelerator=settings.accelerator,
        max_steps=settings.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()] if checkpoints is not None else None,
    )
    clock.start()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*val_dataloader.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
        trainer.fit(model, datamodule=data, ckpt_path=None if resume_from is None else str(resume_from))
    model.eval()
    return TrainedModel(model, clock.seconds, clock.final_loss)


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

    With ``settings.merge`` nothing is trained: the records and runs (of ``settings.models`` only, if named) come
    from the ``<name>.json`` files of those folders (:func:`hydra_kit.experiments.merge.load_merged`, checked against ``specs`` and ``baselines``), keeping the rows that match
    ``where`` (for an experiment that calls this once per level), and each key of ``merged_lists`` (per-run
    records the experiment keeps beside ``records``, such as E5's routing counts) is extended from the files.

    Each (model, seed) trains with its checkpoints in :func:`checkpoint_folder`, so the same command run again
    after a kill continues every unfinished run from its last checkpoint and only evaluates the finished ones.

    Returns:
        The evaluation records and one training record per (model, seed): seconds, final training loss.
    """
    labels = [s.label for s in specs]
    unknown = [m for m in settings.models if m not in labels]
    if unknown:
        raise RecipeError(f"experiment {name}: --models {', '.join(map(repr, unknown))}: no such model here; available: {', '.join(map(repr, labels))}")
    if settings.merge:
        return merged_grid(console, specs, task, settings, name, baselines, where or {}, merged_lists or {})
    chosen = [s for s in specs if not settings.models or s.label in settings.models]
    records: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
        for spec in chosen:
            folder = checkpoint_folder(settings.out, spec.label, seed, where)
            if (folder / "last.ckpt").exists():
                console.print(f"  seed {seed}  {spec.label:<24} continues from {folder / 'last.ckpt'}")
            trained = train(spec, task, seed, train_settings(settings, spec), folder, report=progress_line(console, f"  seed {seed}  {spec.label:<24} "))
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


def payload(name: str, settings: Settings, specs: Sequence[ModelSpec], counts: dict[str, dict[str, int]], extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON body common to every experiment: settings, models (config and counts), extra fields."""
    return {
        "experiment": name,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
        "eval_seed": EVAL_SEED,
        "models": {s.label: {"note": s.note, "lr": s.lr if s.lr is not None else settings.lr, **counts[s.label], "config": s.config} for s in specs},
        **extra,
    }
