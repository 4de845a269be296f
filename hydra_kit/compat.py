"""Every use of Lightning's (and argparse's) private internals, in one place: a Lightning upgrade touches this file.

Each function says which internal it reads and why no public route exists. The rest of hydra-kit uses only
Lightning's public API and these functions. :class:`StepProgressBar` lives here because it is built on the rich
progress bar's protected methods from top to bottom.

Checked against lightning 2.6.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar


# ---------------------------------------------------------------- LightningModule
def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer ``module`` is attached to, or None (``module.trainer`` raises instead of returning None)."""
    return module._trainer


def optimizer_replaced(module: L.LightningModule) -> bool:
    """Whether LightningCLI's ``--optimizer`` replaced ``module.configure_optimizers``.

    LightningCLI binds its own ``configure_optimizers`` on the instance (over the class's method) when
    ``--optimizer`` is given, and offers no flag saying so.
    """
    return "configure_optimizers" in vars(module)


# ---------------------------------------------------------------- the training loop
def batches_processed(trainer: L.Trainer) -> int:
    """Training batches processed so far in the current epoch (what a resumed data stream must skip)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(getattr(progress, "processed", progress.completed))  # `processed`: counted before checkpoints are written


# ---------------------------------------------------------------- ModelCheckpoint
def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step of the last checkpoint ``callback`` wrote (-1: none in this run)."""
    return int(callback._last_global_step_saved)


def save_last_now(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Write ``callback``'s ``last`` checkpoint now, with its naming, linking and bookkeeping.

    ``ModelCheckpoint`` has no public "save last" method, and ``trainer.save_checkpoint`` alone would leave the
    callback's ``last_model_path``, its link (``save_last="link"``) and its record of the step saved behind.
    """
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
    callback._last_global_step_saved = trainer.global_step


# ---------------------------------------------------------------- scheduler
def scale_base_lrs(scheduler: Any, factors: list[float]) -> None:
    """Multiply each base learning rate of a scheduler that has no scale of its own (not hydra-kit's).

    Used only for schedulers other than :class:`hydra_kit.optim.ScaledLambdaLR`, whose learning rates follow
    each param group's ``lr_scale`` entry through the public optimizer API.
    """
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs is None:
        return
    for i, factor in enumerate(factors):
        base_lrs[i] *= factor


# ---------------------------------------------------------------- argparse
def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` a parser accepts, without the dashes (argparse lists its actions only privately)."""
    return [s.lstrip("-") for action in parser._actions for s in action.option_strings if s.startswith("--")]


# ---------------------------------------------------------------- progress bar
class StepProgressBar(RichProgressBar):
    """Rich progress bar over optimizer steps (``global_step / max_steps``) when the run is bounded by steps.

    Runs bounded by epochs (``max_steps = -1``) keep Lightning's per-epoch bar. The logger version (``v_num``) is
    not shown: the run directory is printed when training ends. (Exported as
    :class:`hydra_kit.callbacks.StepProgressBar`; why it exists: :mod:`hydra_kit.callbacks.display`.)
    """

    def _counts_steps(self) -> bool:
        max_steps = self.trainer.max_steps
        return max_steps is not None and max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._counts_steps():
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Training':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counts_steps() and self.train_progress_bar_id is not None:
            return  # one bar for the whole run: a new epoch of a finite dataset does not restart it
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts where it stopped

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._counts_steps():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
