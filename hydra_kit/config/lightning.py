"""hydra-kit's LightningCLI: the one parser of recipes, and HydraLM with any LightningDataModule.

Every command that reads a recipe reads it here, with jsonargparse as the single front end: ``--config`` files
are read once by :class:`HydraArgumentParser`, which checks each file's model section as it reads it (so the
message names the file), and :meth:`HydraCLI.before_instantiate_classes` checks the merged configuration
(command-line overrides included) once, before any class is built. :func:`parse_config` stops there, for
commands that only need the configuration (``summary``, ``bench``).

Defaults: the trainer of :data:`hydra_kit.config.trainer.TRAINER_DEFAULTS` (a rich progress bar over steps,
TensorBoard event files without Lightning's placeholder ``hp_metric``, gradient clipping), checkpoints (last and
best by validation loss) under ``runs/<name>/version_<n>/``, per-block diagnostics every 50 steps
(:class:`hydra_kit.callbacks.Diagnostics`, section ``diagnostics``), atomic checkpoint writes and the synthetic
default task. At the end of ``fit`` the final validation, the run directory and the checkpoints are printed.

A run's saved ``config.yaml`` (and ``--print_config``) holds only what can be written back: the atomic checkpoint
IO, the progress bar and the model summary are added when the trainer is built, not kept in the configuration,
so ``hydra-kit fit --config runs/<name>/version_<n>/config.yaml`` repeats the run.
"""

from __future__ import annotations

import inspect
import os
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
from hydra_kit.callbacks.display import ParameterSummary
from hydra_kit.checkpoint import AtomicCheckpointIO, LastCheckpoint, StageCheckpoint
from hydra_kit.config.checkpoints import check_checkpoint_matches
from hydra_kit.config.checks import check_model_section, check_recipe_file, check_step_limits, check_strategy
from hydra_kit.config.files import config_paths, parse_recipe_text, resolve_config_args
from hydra_kit.config.trainer import TRAINER_DEFAULTS
from hydra_kit.data import SyntheticDataModule
from hydra_kit.data.task import best_no_skill
from hydra_kit.errors import RecipeError
from hydra_kit.model import HydraLM

__all__ = ["HydraArgumentParser", "HydraCLI", "model_config", "parse_config"]

# Lightning's own values for --ckpt_path (resolved by the Trainer, not files).
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


class HydraArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with full option names only, one-line errors (no usage wall), and recipe checks.

    Each ``--config`` file is read once, by jsonargparse; its text is checked (:func:`~hydra_kit.config.checks.check_recipe_file`)
    before jsonargparse applies its values, so a mistake is reported with the file, the key and the valid choices.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_step 5` must not silently mean max_steps
        super().__init__(*args, **kwargs)
        self._reading: str | None = None

    def parse_path(self, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        self._reading = str(path)  # the name parse_string's messages use (jsonargparse passes it the base name only)
        try:
            return super().parse_path(path, *args, **kwargs)
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not a YAML recipe (the file is not UTF-8 text)") from None
        finally:
            self._reading = None

    def parse_string(self, content: str, path: str | os.PathLike[str] = "", *args: Any, **kwargs: Any) -> Any:
        if path:  # a recipe file's text (a --config given as inline YAML is checked with the merged configuration)
            name = self._reading or str(path)
            check_recipe_file(name, parse_recipe_text(name, content))
        return super().parse_string(content, path, *args, **kwargs)

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


class _ValidationStep(Callback):
    """Remembers the global step of the last validation during fit (to validate the final weights if it was not)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.step = trainer.global_step


# LightningCLI's `--lr_scheduler` takes effect only beside `--optimizer` (refused by HydraLM): alone it would be
# silently ignored.
LR_SCHEDULER_OPTION_REFUSED = (
    "--lr_scheduler: HydraLM schedules its learning rate itself (linear warm-up over --model.warmup_steps, then cosine "
    "decay to --model.min_lr_ratio times --model.lr by the last step); set those instead"
)


class HydraCLI(LightningCLI):
    """LightningCLI with HydraLM as the model and a data module chosen by the recipe."""

    def __init__(self, args: list[str] | None = None, run: bool = True, *, instantiate: bool = True, prog: str = "hydra-kit") -> None:
        """Parse ``args`` (default ``sys.argv``), check the configuration, and build the classes if ``instantiate``.

        ``--config`` values are resolved to recipe files first (:func:`~hydra_kit.config.files.config_path`).
        ``prog`` names the command in messages when there is no subcommand (``hydra-kit ablate``).
        """
        self._instantiate = instantiate
        args = resolve_config_args(list(sys.argv[1:] if args is None else args))
        self._argv = args
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
                parser_kwargs={"prog": prog, **{c: {"prog": f"hydra-kit {c}"} for c in LightningCLI.subcommands()}},
                args=args,
                run=run,
            )
        except RecipeError as exc:
            # Raised while building the model or setting up the data, where the file is not known: name it here.
            paths = config_paths(self._argv)
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
        if not self._instantiate:
            return
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
        """Check the merged model section and trainer limits, apply recipe ablations, resolve ``--ckpt_path last``,
        check the checkpoint fits."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("lr_scheduler") is not None:  # LightningCLI would ignore it without --optimizer: refuse instead
            raise RecipeError(LR_SCHEDULER_OPTION_REFUSED)
        model = config["model"]
        check_model_section(model.as_dict() if hasattr(model, "as_dict") else dict(model), config_paths(self._argv))
        trainer = config["trainer"]
        check_step_limits(trainer, fitting=self.subcommand in (None, "fit"))
        check_strategy(trainer.get("strategy"))
        _apply_ablation_callbacks(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = self._resolve_last(config)
        if ckpt_path and ckpt_path not in _CKPT_KEYWORDS:
            check_checkpoint_matches(str(ckpt_path), config["model"], config_paths(self._argv))
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
            # An accuracy means something only above what a shortcut of the task format scores.
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


def parse_config(paths: list[str], overrides: list[str] | None = None, *, prog: str = "hydra-kit") -> Any:
    """The checked configuration (a jsonargparse Namespace) of recipes and overrides, without building anything.

    Raises:
        RecipeError: a recipe or an override is wrong (the message names the file or option).
        SystemExit: jsonargparse refused an option (printed as one line, exit status 2).
    """
    args = [arg for path in paths for arg in ("--config", path)] + list(overrides or [])
    with warnings.catch_warnings():
        # The arguments are given on purpose, besides the process's own sys.argv (a library call).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        # seed_everything off: parsing alone must not seed the process (nor print "Seed set to").
        return HydraCLI(args=[*args, "--seed_everything", "false"], run=False, instantiate=False, prog=prog).config


def model_config(paths: list[str], overrides: list[str] | None = None, *, prog: str = "hydra-kit") -> dict[str, Any]:
    """The keyword arguments of :class:`~hydra_kit.model.HydraLM` that recipes and overrides give (checked)."""
    model = parse_config(paths, overrides, prog=prog).model
    return dict(model.as_dict() if hasattr(model, "as_dict") else model)
