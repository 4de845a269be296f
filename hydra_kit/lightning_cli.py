"""hydra-kit's LightningCLI: HydraLM, any LightningDataModule, and the defaults a run should have.

Defaults: a rich progress bar over steps, TensorBoard event files (without Lightning's placeholder ``hp_metric``)
and checkpoints (last and best by validation loss) under ``runs/<name>/version_<n>/``, per-block diagnostics every
50 steps (:class:`hydra_kit.callbacks.Diagnostics`, section ``diagnostics``), atomic checkpoint writes, gradient
clipping, and the synthetic default task. At the end of ``fit`` the final validation, the run directory and the checkpoints are printed.

A run's saved ``config.yaml`` (and ``--print_config``) holds only what can be written back: the atomic checkpoint
IO, the progress bar and the model summary are added when the trainer is built, not kept in the configuration,
so ``hydra-kit fit --config runs/<name>/version_<n>/config.yaml`` repeats the run.
"""

from __future__ import annotations

import inspect
import itertools
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.model_helpers import is_overridden
from rich.console import Console

from hydra_kit import compat
from hydra_kit.callbacks.diagnostics import Diagnostics
from hydra_kit.callbacks.display import ParameterSummary, StepProgressBar
from hydra_kit.checkpoint import AtomicCheckpointIO, LastCheckpoint, StageCheckpoint, safe_torch_load
from hydra_kit.data import SyntheticDataModule
from hydra_kit.data.task import best_no_skill
from hydra_kit.model import HydraLM
from hydra_kit.network import DEFAULT_COMPONENTS
from hydra_kit.recipe import RecipeError

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "max_steps": 500,
    "max_epochs": -1,
    "val_check_interval": 250,
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
    "reload_dataloaders_every_n_epochs": 1,
    # default_hp_metric off: Lightning's placeholder "hp_metric" scalar (-1, never updated) is noise in TensorBoard.
    # A recipe naming TensorBoardLogger keeps this unless it sets the key (jsonargparse merges init_args).
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "hydra", "default_hp_metric": False}},
    # Objects, not configuration: LightningCLI adds default callbacks to the trainer without writing them into
    # config.yaml. The checkpoint IO is added the same way in HydraCLI._instantiate_trainer (an object given as a
    # trainer default would be written as an unreadable string and break reloading the saved config).
    "callbacks": [StepProgressBar(leave=True)],
}

# The model hyper-parameters that decide the shapes and meaning of the weights: a checkpoint only fits a recipe
# that agrees on all of them.
ARCHITECTURE_KEYS = ("vocab_size", "d_model", "n_blocks", "components", "dropped")
# Lightning's own values for --ckpt_path (resolved by the Trainer, not files).
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


class HydraArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with full option names only and one-line errors (no usage wall)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_step 5` must not silently mean max_steps
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text, hint = _explain_parse_error(parser, " ".join(str(message).split()))
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {prog}: {text}{hint} (all options: {prog} --help)")
        sys.exit(2)


def _explain_parse_error(parser: LightningArgumentParser, message: str) -> tuple[str, str]:
    """A jsonargparse error in one short sentence, and '; did you mean X?' for a misspelt option."""
    import difflib
    import importlib
    import re

    known = compat.long_options(parser)
    prefix = "--"
    # A class given by class_path rejected its arguments: keep that reason, not the union's list of attempts.
    problem = re.search(r'Parser key "([\w.]+)":.*?Problem with given class_path \'([\w.]+)\': (.*?)(?: - Expected a |$)', message)
    if problem:
        key, class_path, reason = problem.groups()
        message = f"{key}: {class_path}: {reason.rstrip(' -')}"
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
            known, prefix = [p for p in inspect.signature(cls.__init__).parameters if p != "self"], ""
        except (ImportError, AttributeError, ValueError, TypeError):
            known = []
    unknown = re.findall(r"--([\w.\-]+)", message) if "unrecognized arguments" in message else []
    unknown += re.findall(r"(?:does not accept option|Option) '([\w.\-]+)'", message)
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.75)
        if close:
            return message, f"; did you mean {' or '.join(prefix + c for c in close)}?"
    return message, ""


def _apply_ablation_callbacks(config: Any) -> None:
    """Add the instances named by ``hydra_kit.callbacks.Ablation`` callbacks to ``model.dropped``, before the model is built."""
    callbacks = config["trainer"].get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        class_path = str(callback.get("class_path", "")) if hasattr(callback, "get") else ""
        if class_path.rsplit(".", 1)[-1] != "Ablation":
            continue
        drop = list((callback.get("init_args") or {}).get("drop") or [])
        model = config["model"]
        model["dropped"] = list(dict.fromkeys([*(model.get("dropped") or []), *drop]))


def model_architecture(hparams: Any) -> dict[str, Any]:
    """The architecture-defining model hyper-parameters (:data:`ARCHITECTURE_KEYS`) in a comparable form."""
    defaults = {k: p.default for k, p in inspect.signature(HydraLM.__init__).parameters.items() if k in ARCHITECTURE_KEYS}
    get = hparams.get if hasattr(hparams, "get") else (lambda key, default=None: getattr(hparams, key, default))
    out = {key: get(key, defaults[key]) for key in ARCHITECTURE_KEYS}
    if out["components"] is None:
        out["components"] = DEFAULT_COMPONENTS
    out["dropped"] = sorted(out["dropped"] or [])
    as_plain = getattr(out["components"], "as_dict", None)
    if as_plain is not None:
        out["components"] = as_plain()
    # One spelling for tuples/lists and nested namespaces, so that a saved and a parsed recipe compare equal.
    return {k: json.loads(json.dumps(v, default=lambda o: o.as_dict() if hasattr(o, "as_dict") else list(o))) for k, v in out.items()}


def _describe_architecture(arch: dict[str, Any]) -> str:
    components = ", ".join(name for name in arch["components"] if name not in arch["dropped"])
    return f"vocab_size {arch['vocab_size']}, d_model {arch['d_model']}, n_blocks {arch['n_blocks']}, components {components}"


def _architecture_differences(checkpoint: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    diffs = [key for key in ARCHITECTURE_KEYS if key != "components" and checkpoint[key] != recipe[key]]
    a, b = checkpoint["components"], recipe["components"]
    if a != b:
        only_ckpt = [n for n in a if n not in b]
        only_recipe = [n for n in b if n not in a]
        changed = [n for n in a if n in b and a[n] != b[n]]
        parts = [f"only in the checkpoint: {', '.join(only_ckpt)}" if only_ckpt else "",
                 f"only in the recipe: {', '.join(only_recipe)}" if only_recipe else "",
                 f"different settings of {', '.join(changed)}" if changed else ""]
        diffs.append(f"components ({'; '.join(p for p in parts if p) or 'order'})")
    return diffs


def check_checkpoint_matches(ckpt_path: str, config_model: Any, recipe_paths: list[str]) -> None:
    """Refuse a checkpoint whose model another recipe built: its weights would not fit, or mean something else.

    Raises:
        CheckpointError: the file is missing, unreadable or not a hydra-kit checkpoint (from ``safe_torch_load``).
        RecipeError: the checkpoint's architecture differs from the recipe's; the message names both.
    """
    checkpoint = safe_torch_load(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise RecipeError(f"checkpoint {ckpt_path}: not a hydra-kit checkpoint (it has no hyper_parameters or state_dict)")
    trained, wanted = model_architecture(hparams), model_architecture(config_model)
    diffs = _architecture_differences(trained, wanted)
    if not diffs:
        return
    folder = Path(ckpt_path).resolve().parent
    run_config = folder.parent / "config.yaml" if folder.name == "checkpoints" else None
    if run_config is not None and run_config.is_file():  # runs/<recipe name>/version_<n>/checkpoints/<file>
        origin = f"recipe {folder.parent.parent.name!r}"
        fix = f"use --config {_shorten(run_config)} (the run's saved recipe) or the recipe it was trained with"
    else:
        origin, fix = "another recipe", "use the recipe it was trained with as --config"
    recipe = f"--config {', '.join(recipe_paths)}" if recipe_paths else "the default model (no --config)"
    raise RecipeError(
        f"checkpoint {ckpt_path} was trained with {origin} ({_describe_architecture(trained)}), but {recipe} builds "
        f"{_describe_architecture(wanted)}; they differ in {', '.join(diffs)}: {fix}"
    )


def _shorten(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class _ValidationStep(Callback):
    """Remembers the global step of the last validation during fit (to validate the final weights if it was not)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.step = trainer.global_step


class HydraCLI(LightningCLI):
    """LightningCLI with HydraLM as the model and a data module chosen by the recipe."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._argv = list(sys.argv[1:] if args is None else args)
        try:
            super().__init__(
                HydraLM,
                LightningDataModule,
                subclass_mode_data=True,
                trainer_defaults=TRAINER_DEFAULTS,
                seed_everything_default=0,
                save_config_kwargs={"overwrite": True},
                parser_class=HydraArgumentParser,
                # Named here: from sys.argv[0] they read "cli.py" or "pytest" when not run as the console script.
                parser_kwargs={"prog": "hydra-kit", **{c: {"prog": f"hydra-kit {c}"} for c in LightningCLI.subcommands()}},
                args=args,
                run=run,
            )
        except RecipeError as exc:
            # Raised while building the model or setting up the data, where the file is not known: name it here.
            paths = _config_paths(self._argv)
            if paths and not any(str(exc).startswith(p) for p in paths) and not str(exc).startswith(("checkpoint ", "--")):
                raise RecipeError(f"{', '.join(paths)}: {exc}") from None
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Two checkpoints: the best by validation loss, and "last.ckpt", rewritten atomically every few steps so
        # that a killed run loses little work and resumes with `--ckpt_path last`.
        parser.add_lightning_class_args(StageCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        # Per-block diagnostics every N steps (hydra_kit.callbacks.Diagnostics): --diagnostics.every_n_steps 0 turns them off.
        parser.add_lightning_class_args(Diagnostics, "diagnostics")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{step}",
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 0,
                "last_checkpoint.save_last": True,  # also written when training ends
                "last_checkpoint.every_n_train_steps": 25,
                "last_checkpoint.enable_version_counter": False,  # a resumed run keeps writing last.ckpt
                "data": {"class_path": f"{SyntheticDataModule.__module__}.{SyntheticDataModule.__qualname__}"},
            }
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the model configuration with the checkpoint's hyper-parameters here, so a checkpoint
        # of another recipe silently trained or validated its own model. HydraCLI instead checks that the two
        # agree (before_instantiate_classes, once `--ckpt_path last` is resolved and ablations applied).
        return

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # The rich progress bar is a default, not a requirement: `--trainer.enable_progress_bar false` removes it.
        if config.get("enable_progress_bar") is False:
            defaults = [c for c in self.trainer_defaults.get("callbacks", []) if not isinstance(c, RichProgressBar)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a recipe's own checkpoint IO wins
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        extra: list[Any] = [_ValidationStep()]
        if config.get("enable_model_summary") is not False:
            extra.append(ParameterSummary())
            config["enable_model_summary"] = False  # ours replaces Lightning's (which printed "Total FLOPs: 0")
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except RecipeError:
            raise
        except ValueError as exc:
            # A data module (or its task) chosen by class_path is built inside jsonargparse's check of a union type,
            # which wraps the constructor's own message in a page about the union's subtypes: report that message.
            cause = _constructor_error(exc)
            if cause is None:
                raise
            raise RecipeError(str(cause)) from None

    def before_instantiate_classes(self) -> None:
        """Check trainer limits, apply recipe ablations, resolve ``--ckpt_path last``, check the checkpoint fits."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        _check_step_limits(trainer, fitting=self.subcommand in (None, "fit"))
        _check_strategy(trainer.get("strategy"))
        _apply_ablation_callbacks(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = self._resolve_last(config)
        if ckpt_path and ckpt_path not in _CKPT_KEYWORDS:
            check_checkpoint_matches(str(ckpt_path), config["model"], _config_paths(self._argv))
        if config.get("ckpt_path") and self.subcommand == "fit":
            # A resumed run writes into its own checkpoint folder again, which is what Lightning warns about.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def _resolve_last(self, config: Any) -> str | None:
        logger = config["trainer"].get("logger")
        init = logger.get("init_args") if isinstance(logger, dict) or hasattr(logger, "get") else None
        if init is None:
            return None
        root = Path(str(init.get("save_dir", "runs"))) / str(init.get("name", "hydra"))
        candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise RecipeError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints/; nothing to resume")
        newest = candidates[-1]
        config["ckpt_path"] = str(newest)
        init["version"] = newest.parent.parent.name
        return str(newest)

    def after_fit(self) -> None:
        trainer = self.trainer
        validated = next((cb.step for cb in trainer.callbacks if isinstance(cb, _ValidationStep)), None)  # type: ignore[attr-defined]
        has_val = is_overridden("val_dataloader", self.datamodule) or is_overridden("val_dataloader", self.model)
        if has_val and not trainer.interrupted and validated != trainer.global_step and trainer.limit_val_batches != 0:
            # The last validation (if any) was before the final step: the final numbers must be the final weights'.
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        log_dir = trainer.log_dir  # a collective under DDP (a broadcast from rank 0): every rank must ask
        if not trainer.is_global_zero:  # one report per run, not one per process
            return
        console = Console(highlight=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            console.print(f"final validation (step {trainer.global_step}): " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))
        baselines_of = getattr(self.datamodule, "no_skill_baselines", None)
        if "val/acc" in metrics and callable(baselines_of):
            # An accuracy means something only above what a shortcut of the task format scores (issue 17).
            baselines = baselines_of()
            name, best = best_no_skill(baselines)
            verdict = "above" if metrics["val/acc"] > best else "[bold red]not above[/]"
            console.print(
                f"held-out accuracy {metrics['val/acc']:.3f}: chance {baselines['chance']:.3f}, best no-skill baseline {best:.3f} ({name}), {verdict} it"
            )
        console.print(f"run directory: [bold]{log_dir}[/]")
        paths: list[str] = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                paths += [p for p in (cb.best_model_path, cb.last_model_path) if p and p not in paths]
        console.print("checkpoints: " + (", ".join(paths) or "-"))


def _constructor_error(exc: BaseException) -> ValueError | None:
    """The ValueError a class raised in its constructor, when jsonargparse wrapped it while instantiating; else None."""
    import jsonargparse

    package = str(Path(jsonargparse.__file__).parent)
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if root is exc or not isinstance(root, ValueError):
        return None
    frames = traceback.extract_tb(root.__traceback__)
    # The innermost frame is the constructor's raise; one in jsonargparse itself is a parsing problem, not the class's.
    if not frames or frames[-1].filename.startswith(package):
        return None
    return root


def _config_paths(argv: list[str]) -> list[str]:
    paths = [path for flag, path in itertools.pairwise(argv) if flag in ("--config", "-c")]
    return paths + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


# Lightning's DDP strategies that register DDPStrategy with find_unused_parameters=False.
_PLAIN_DDP = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def _check_strategy(strategy: Any) -> None:
    """Refuse DDP without unused-parameter detection, which fails at the second step with a page of traceback.

    Sparse components (experts not chosen, gates of absent paths, global tokens not picked) leave some
    parameters without a gradient in a given step, and plain DDP waits for every gradient.
    """
    if isinstance(strategy, str):
        name = strategy
        if name not in _PLAIN_DDP:
            return
    elif hasattr(strategy, "get") and str(strategy.get("class_path", "")).rsplit(".", 1)[-1] == "DDPStrategy":
        init = strategy.get("init_args") or {}
        if init.get("find_unused_parameters"):
            return
        name = "DDPStrategy without find_unused_parameters"
    else:
        return
    raise RecipeError(
        f"--trainer.strategy {name}: Hydra's sparse components leave some parameters without a gradient in a step, which "
        f"plain DDP cannot handle; use --trainer.strategy ddp_find_unused_parameters_true"
    )


def _check_step_limits(trainer: Any, *, fitting: bool) -> None:
    """Refuse step limits that make no run; clamp the validation interval so a short run still validates."""
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, int) and (max_steps < -1 or (fitting and max_steps == 0)):
        what = "trains nothing (the run would only leave an empty run directory)" if max_steps == 0 else "is negative"
        raise RecipeError(f"--trainer.max_steps {max_steps} {what}: give a positive number of steps, or -1 for no step limit")
    interval = trainer.get("val_check_interval")
    if fitting and isinstance(max_steps, int) and max_steps > 0 and isinstance(interval, int) and not isinstance(interval, bool):
        batches = max_steps * int(trainer.get("accumulate_grad_batches") or 1)  # the interval counts batches
        if interval > batches:
            trainer["val_check_interval"] = batches
