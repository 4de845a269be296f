"""hydra-kit's LightningCLI: HydraLM, any LightningDataModule, and the defaults a run should have.

Defaults: a rich progress bar, TensorBoard event files and checkpoints (last and best by validation loss)
under ``runs/<name>/version_<n>/``, gradient clipping, and the synthetic default task. At the end of ``fit``
the run directory and the checkpoints are printed.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from hydra_kit.checkpoint import AtomicCheckpointIO, LastCheckpoint
from hydra_kit.data import SyntheticDataModule
from hydra_kit.model import HydraLM
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
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "hydra"}},
    "callbacks": [RichProgressBar(leave=True)],
    "plugins": [AtomicCheckpointIO()],
}


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


class HydraCLI(LightningCLI):
    """LightningCLI with HydraLM as the model and a data module chosen by the recipe."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        try:
            super().__init__(
                HydraLM,
                LightningDataModule,
                subclass_mode_data=True,
                trainer_defaults=TRAINER_DEFAULTS,
                seed_everything_default=0,
                save_config_kwargs={"overwrite": True},
                args=args,
                run=run,
            )
        except RecipeError as exc:
            # Raised while building the model or setting up the data, where the file is not known: name it here.
            argv = list(sys.argv[1:] if args is None else args)
            paths = [path for flag, path in itertools.pairwise(argv) if flag in ("--config", "-c")]
            if paths and not any(str(exc).startswith(p) for p in paths):
                raise RecipeError(f"{', '.join(paths)}: {exc}") from None
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Two checkpoints: the best by validation loss, and "last.ckpt", rewritten atomically every few steps so
        # that a killed run loses little work and resumes with `--ckpt_path last`.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
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

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # The rich progress bar is a default, not a requirement: `--trainer.enable_progress_bar false` removes it.
        if config.get("enable_progress_bar") is False:
            defaults = [c for c in self.trainer_defaults.get("callbacks", []) if not isinstance(c, RichProgressBar)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        """Apply recipe ablations to the model; resolve ``--ckpt_path last`` to the newest ``last.ckpt`` of this recipe."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        _apply_ablation_callbacks(config)
        if config.get("ckpt_path") != "last":
            return
        logger = config["trainer"].get("logger")
        init = logger.get("init_args") if isinstance(logger, dict) or hasattr(logger, "get") else None
        if init is None:
            return
        root = Path(str(init.get("save_dir", "runs"))) / str(init.get("name", "hydra"))
        candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise RecipeError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints/; nothing to resume")
        newest = candidates[-1]
        config["ckpt_path"] = str(newest)
        init["version"] = newest.parent.parent.name

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP (a broadcast from rank 0): every rank must ask
        if not trainer.is_global_zero:  # one report per run, not one per process
            return
        console = Console(highlight=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            console.print("final validation: " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))
        console.print(f"run directory: [bold]{log_dir}[/]")
        paths = [cb.best_model_path for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.best_model_path]
        console.print("checkpoints: " + (", ".join(paths) or "-"))
