"""hydra-kit's LightningCLI: HydraLM, any LightningDataModule, and the defaults a run should have.

Defaults: a rich progress bar, TensorBoard event files and checkpoints (last and best by validation loss)
under ``runs/<name>/version_<n>/``, gradient clipping, and the synthetic default task. At the end of ``fit``
the run directory and the checkpoints are printed.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from hydra_kit.data import SyntheticDataModule
from hydra_kit.model import HydraLM

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
}


class HydraCLI(LightningCLI):
    """LightningCLI with HydraLM as the model and a data module chosen by the recipe."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{step}",
                "data": {"class_path": f"{SyntheticDataModule.__module__}.{SyntheticDataModule.__qualname__}"},
            }
        )

    def after_fit(self) -> None:
        trainer = self.trainer
        console = Console(highlight=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            console.print("final validation: " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))
        console.print(f"run directory: [bold]{trainer.log_dir}[/]")
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint):
            console.print(f"checkpoints: last = {checkpoint.last_model_path or '-'}, best = {checkpoint.best_model_path or '-'}")
