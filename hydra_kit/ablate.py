"""``hydra-kit ablate``: what each component instance is worth, by paired training runs or by knock-outs.

::

    hydra-kit ablate --drop pkm --drop sga,workspace --config recipes/full.yaml --seeds 3 --trainer.max_steps 300
    hydra-kit ablate --mode knockout --ckpt_path runs/full/version_0/checkpoints/last.ckpt --drop pkm --drop sga

``--mode train`` (default) trains the recipe as is and once per ``--drop`` (``a,b`` drops both in one run),
each with the same seed and the same data stream (``seed_everything`` and the data module's ``seed``), and
validates the final weights. A dropped instance is removed before the model is built (the model's ``dropped``
hyper-parameter), so the ablated model allocates nothing for it, and its checkpoint reloads with
``HydraLM.load_from_checkpoint``. Any instance of the recipe's ``model.components`` may be dropped, the router
included: without it every gated component contributes with gate 1 and sparse global attention has no scores,
so it is plain sliding-window attention. Model initialisation draws from the same seed, but removing an
instance changes which random numbers the others receive: the paired runs share data, not initial weights.

``--mode knockout`` loads one trained checkpoint and validates it as is and once per ``--drop`` with those
instances switched off (:class:`hydra_kit.callbacks.KnockOut`): no retraining, parameters kept. The router
cannot be knocked out (its gates are how the other components are weighted; drop it in train mode instead).
The data and trainer settings come from the ``config.yaml`` that training saved beside the checkpoint's
``checkpoints/`` folder (``--config`` overrides it), and the data module's state is restored from the
checkpoint, so a curriculum-trained model is evaluated on the task of its last stage.

``--seeds N`` repeats every run with N seeds, ``s + i`` for ``i`` in 0..N-1 where ``s`` is the recipe's
``seed_everything`` (model initialisation) and, separately, its data seed (the example stream); it reports the
mean and the standard deviation (N-1 denominator) of each metric; deltas are paired per seed (run - full with
the same seed), then averaged, with the two-sided p of Student's paired t over the seeds (``delta_<metric>_p``;
the table prints it beside the loss and accuracy deltas from two seeds on).

Outputs, in ``--out`` (default ``runs/ablate/<recipe stem>-<timestamp>/``): a rich table, ``ablate.csv`` (one
row per configuration) and ``ablate.json`` (those rows plus every single run: seed, metrics, log directory,
checkpoint). Metrics: total and active parameters (:meth:`HydraLM.parameter_report`; in knockout mode active
parameters exclude the instances switched off), validation loss and accuracy (a final ``trainer.validate``),
and tokens/s (:class:`hydra_kit.callbacks.Throughput`: training batches in train mode, validation batches in
knockout mode, after ``--warmup_batches`` untimed batches of each run; knockout mode also runs one untimed
validation first; when a run has no more batches than that, all are timed). Throughput is measured in the
same process, one run after the other: on a shared or busy machine its deltas are noise unless runs are long. Every run logs and checkpoints into its own directory under ``--out``.

Arguments after the known options are LightningCLI overrides applied to every run (``--trainer.max_steps 50``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from rich.console import Console

from hydra_kit.callbacks import Ablation, KnockOut, Throughput
from hydra_kit.checkpoint import load_model
from hydra_kit.config.lightning import HydraCLI, model_config
from hydra_kit.errors import RecipeError
from hydra_kit.network import DEFAULT_COMPONENTS
from hydra_kit.recipe import resolve_components
from hydra_kit.registry import default_registry
from hydra_kit.reporting import fmt, is_missing, mean_spread, paired_test, write_csv, write_json
from hydra_kit.reporting import print_table as report_table

DEFAULT_RECIPE = "recipes/full.yaml"
METRICS = ("val_loss", "val_acc", "tokens_per_s", "total_params", "active_params")
FULL = "full"


@dataclass
class RunResult:
    """One training run or one evaluation."""

    label: str
    dropped: list[str]
    seed: int | None  # the seed index (0..N-1); the seeds used are seed_everything + index, data seed + index
    val_loss: float
    val_acc: float
    tokens_per_s: float | None
    total_params: int
    active_params: int
    log_dir: str | None = None
    checkpoint: str | None = None


# ------------------------------------------------------------------------------------------- argument checks
def parse_drops(values: list[str]) -> list[tuple[str, ...]]:
    """``--drop`` values to drop sets: ``a,b`` is one set of two; duplicates removed, order kept."""
    sets: list[tuple[str, ...]] = []
    for value in values:
        names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
        if not names:
            raise RecipeError(f"ablate: --drop {value!r} names no component instance")
        if names not in sets:
            sets.append(names)
    return sets


def recipe_instances(recipe: str, overrides: list[str]) -> tuple[list[str], set[str]]:
    """The component instances a recipe builds (in recipe order) and which of them are routers.

    The recipe and the overrides are parsed and checked here (:func:`~hydra_kit.config.lightning.model_config`),
    so a mistake is reported before any run starts.
    """
    section = model_config([recipe], overrides, prog="hydra-kit ablate")
    spec = dict(section.get("components") or DEFAULT_COMPONENTS)
    for name in section.get("dropped") or []:
        spec.pop(name, None)
    resolved = resolve_components(spec, int(section.get("n_blocks", 4)), default_registry(), f"{recipe}: model.components")
    return [r.name for r in resolved], {r.name for r in resolved if r.is_router}


def check_drops(drops: list[tuple[str, ...]], valid: list[str], where: str, note: str = "") -> None:
    """Fail before any run when a drop names something that is not an instance; the message lists the valid ones."""
    unknown = sorted({n for names in drops for n in names} - set(valid))
    if unknown:
        raise RecipeError(f"ablate: unknown component instance(s) {unknown}; instances of {where}: {', '.join(valid)}{note}")


# ------------------------------------------------------------------------------------------------- runs
class _RunCLI(HydraCLI):
    """HydraCLI for one run of an ablation: its own log directory, drop list and data seed."""

    def __init__(self, args: list[str], *, run_dir: Path, label: str, dropped: list[str], seed: int | None) -> None:
        self._run_dir, self._label, self._dropped, self._seed = run_dir, label, dropped, seed
        super().__init__(args=args, run=False, prog="hydra-kit ablate")

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config
        if self._dropped:
            config.model.dropped = list(dict.fromkeys([*(config.model.dropped or []), *self._dropped]))
        data_args = config.data.get("init_args") if hasattr(config.data, "get") else None
        if self._seed:
            # Seed index i: model initialisation and the data stream (with its held-out split) both move by i,
            # so seed 0 is exactly the recipe as written.
            config.seed_everything = int(config.seed_everything or 0) + self._seed
            if data_args is not None and "seed" in data_args:
                data_args.seed = int(data_args.seed or 0) + self._seed
        config.trainer.default_root_dir = str(self._run_dir)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = logger.get("init_args") if hasattr(logger, "get") else None
            if init is not None:  # TensorBoard/CSV-style loggers: <out>/<label>/version_<n>/
                for key, value in (("save_dir", str(self._run_dir.parent)), ("name", self._label), ("version", None)):
                    if key in init:
                        init[key] = value


def _cli_args(recipe: str, overrides: list[str]) -> list[str]:
    return ["--config", recipe, *overrides]


def _callbacks(trainer: Trainer) -> list[Callback]:
    return trainer.callbacks  # type: ignore[attr-defined, no-any-return]


def _label(dropped: tuple[str, ...] | list[str], prefix: str) -> str:
    return f"{prefix}-{'+'.join(dropped)}" if dropped else FULL


def train_run(recipe: str, overrides: list[str], dropped: tuple[str, ...], seed: int, out: Path, warmup_batches: int = 5) -> RunResult:
    """Train one configuration with one seed, validate the final weights, and measure it."""
    label = _label(dropped, "drop")
    run_name = f"{label}-seed{seed}"
    cli = _RunCLI(_cli_args(recipe, overrides), run_dir=out / run_name, label=run_name, dropped=list(dropped), seed=seed)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    throughput = Throughput(warmup_batches)
    _callbacks(trainer).append(throughput)
    if dropped:
        _callbacks(trainer).append(Ablation(list(dropped)))
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    report = model.parameter_report(throughput.seq_len or getattr(getattr(datamodule, "task", None), "seq_len", 1))
    checkpoint = next((str(p) for cb in trainer.checkpoint_callbacks if (p := getattr(cb, "last_model_path", ""))), None)
    return RunResult(
        label=label,
        dropped=list(dropped),
        seed=seed,
        val_loss=float(metrics["val/loss"]),
        val_acc=float(metrics["val/acc"]),
        tokens_per_s=throughput.tokens_per_s("train"),
        total_params=report["total_params"],
        active_params=report["active_params"],
        log_dir=trainer.log_dir,
        checkpoint=checkpoint,
    )


def run_config(ckpt_path: str) -> Path | None:
    """The ``config.yaml`` a training run saved beside the checkpoint's folder, if there is one."""
    path = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    return path if path.is_file() else None


def _serialisable(value: Any) -> Any:
    """Drop what LightningCLI could not write (objects given as defaults, e.g. the checkpoint IO plugin)."""
    if isinstance(value, dict):
        return {k: _serialisable(v) for k, v in value.items() if not _unwritten(v)}
    if isinstance(value, list):
        kept = [_serialisable(v) for v in value if not _unwritten(v)]
        return kept or None
    return value


def _unwritten(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("Unable to serialize instance")


def _subcommand_options() -> set[str]:
    """Options of the fit/validate/test/predict subcommands (``ckpt_path``, ``weights_only``, ...): a run's
    ``config.yaml`` holds them, but the recipe of a single run (no subcommand) does not accept them."""
    import inspect

    skipped = {"self", "model", "datamodule", "dataloaders", "train_dataloaders", "val_dataloaders"}
    return {p for fn in (Trainer.fit, Trainer.validate, Trainer.test, Trainer.predict) for p in inspect.signature(fn).parameters} - skipped


def recipe_from_run(config: Path, out: Path) -> str:
    """A recipe made from a run's saved ``config.yaml``: without subcommand options, and without what an older
    hydra-kit could not serialise (left to the CLI's defaults)."""
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    for key in _subcommand_options():
        data.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run-config.yaml"
    path.write_text(yaml.safe_dump(_serialisable(data), sort_keys=False))
    return str(path)


def knockout_runs(
    recipe: str, overrides: list[str], ckpt_path: str, drops: list[tuple[str, ...]], out: Path, console: Console, warmup_batches: int = 5
) -> list[RunResult]:
    """Validate one checkpoint as is and with each drop set knocked out."""
    model, _ = load_model(ckpt_path)  # a missing, truncated, tampered or foreign file fails here, naming it
    instances = [r.name for r in model.resolved]
    routers = {r.name for r in model.resolved if r.is_router}
    note = f" (routers {sorted(routers)} cannot be knocked out: drop them in --mode train)" if routers & {n for d in drops for n in d} else ""
    check_drops(drops, [n for n in instances if n not in routers], ckpt_path, note)
    # The recipe supplies the data module and trainer settings; its freshly built model is not used.
    cli = _RunCLI(_cli_args(recipe, overrides), run_dir=out / "knockout", label="knockout", dropped=[], seed=None)
    trainer, datamodule = cli.trainer, cli.datamodule
    base_callbacks = list(_callbacks(trainer))
    report = model.parameter_report(getattr(getattr(datamodule, "task", None), "seq_len", 1))
    # One untimed pass first: the first validation of a process pays one-off costs (allocator, thread pool,
    # first calls) that would otherwise be charged to the "as is" row and inflate every delta.
    _callbacks(trainer)[:] = list(base_callbacks)
    trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    results = []
    for names in [(), *drops]:
        console.print(f"[bold]ablate[/]: validating {ckpt_path} " + (f"with {', '.join(names)} knocked out" if names else "as is"))
        throughput = Throughput(warmup_batches)
        _callbacks(trainer)[:] = [*base_callbacks, throughput, KnockOut(list(names))]
        # ckpt_path restores the data module's state too: a curriculum run is evaluated on its last stage's task.
        metrics = trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]
        off = sum(report["components"][n]["active_params"] for n in names if n in report["components"])
        results.append(
            RunResult(
                label=_label(names, "knockout"),
                dropped=list(names),
                seed=None,
                val_loss=float(metrics["val/loss"]),
                val_acc=float(metrics["val/acc"]),
                tokens_per_s=throughput.tokens_per_s("val"),
                total_params=report["total_params"],
                active_params=int(report["active_params"] - off),
                log_dir=trainer.log_dir,
                checkpoint=ckpt_path,
            )
        )
    return results


# --------------------------------------------------------------------------------------------- summary
def summarise(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per configuration: mean and spread of every metric and of its paired delta against the full run.

    Means and spreads are :func:`hydra_kit.reporting.mean_spread`'s (a single seed has no spread: NaN); a delta's
    ``_p`` is :func:`hydra_kit.reporting.paired_test`'s (NaN below two seeds).
    """
    labels = list(dict.fromkeys(r.label for r in results))
    full = {r.seed: r for r in results if r.label == FULL}
    rows = []
    for label in labels:
        runs = [r for r in results if r.label == label]
        row: dict[str, Any] = {"label": label, "dropped": runs[0].dropped, "n": len(runs)}
        for metric in METRICS:
            row[metric], row[f"{metric}_std"] = mean_spread(getattr(r, metric) for r in runs)
            deltas: list[float | None] = []
            for r in runs:
                base = full.get(r.seed)
                a, b = getattr(r, metric), None if base is None else getattr(base, metric)
                deltas.append(None if a is None or b is None else a - b)
            test = paired_test(deltas)
            row[f"delta_{metric}"], row[f"delta_{metric}_std"], row[f"delta_{metric}_p"] = test.mean, test.std, test.p
        rows.append(row)
    return rows


def with_p(cell: str, p: float) -> str:
    """A delta's cell with the p of its paired t, when there is one (two seeds or more)."""
    return cell if is_missing(p) else f"{cell} (p {p:.2f})"


def print_table(rows: list[dict[str, Any]], title: str, throughput_kind: str, console: Console) -> None:
    """The ablation table: one row per configuration, mean ± spread of each metric and of its delta."""
    columns = ["run", "removed", "params", "active", "val loss", "Δ loss", "val acc", "Δ acc", f"{throughput_kind} tok/s", "Δ tok/s"]
    cells = [
        [
            row["label"],
            ", ".join(row["dropped"]) or "-",
            fmt(row["total_params"], None, ",.0f"),
            fmt(row["active_params"], None, ",.0f"),
            fmt(row["val_loss"], row["val_loss_std"], ".4f"),
            with_p(fmt(row["delta_val_loss"], row["delta_val_loss_std"], ".4f", signed=True), row["delta_val_loss_p"]),
            fmt(row["val_acc"], row["val_acc_std"], ".4f"),
            with_p(fmt(row["delta_val_acc"], row["delta_val_acc_std"], ".4f", signed=True), row["delta_val_acc_p"]),
            fmt(row["tokens_per_s"], row["tokens_per_s_std"], ",.0f"),
            fmt(row["delta_tokens_per_s"], row["delta_tokens_per_s_std"], ",.0f", signed=True),
        ]
        for row in rows
    ]
    report_table(console, title, columns, cells, left=("run", "removed"))


def write_outputs(rows: list[dict[str, Any]], results: list[RunResult], meta: dict[str, Any], out: Path) -> list[Path]:
    """``ablate.csv`` (one row per configuration) and ``ablate.json`` (``meta``, the rows and every run) in ``out``."""
    json_path = write_json(out / "ablate.json", {**meta, "rows": rows, "runs": [asdict(r) for r in results]})
    fields = ["label", "dropped", "n"] + [name for m in METRICS for name in (m, f"{m}_std", f"delta_{m}", f"delta_{m}_std", f"delta_{m}_p")]
    csv_path = write_csv(out / "ablate.csv", [{**row, "dropped": "+".join(row["dropped"])} for row in rows], fields)
    return [csv_path, json_path]
