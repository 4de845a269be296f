"""The Trainer defaults every hydra-kit run starts from, and building a Trainer from them.

``hydra-kit fit`` (and validate, test, predict), ``hydra-kit ablate`` and the experiments all train through a
Trainer built from :data:`TRAINER_DEFAULTS`: the CLI gives them to LightningCLI as its trainer defaults, and
:func:`build_trainer` builds one in code from the same mapping with a run's own overrides.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

from lightning.pytorch import Trainer

from hydra_kit.callbacks.display import StepProgressBar

__all__ = ["HARMLESS_LOG_LINES", "HARMLESS_WARNINGS", "TRAINER_DEFAULTS", "build_trainer", "quiet_lightning", "trainer_arguments"]

TRAINER_DEFAULTS: dict[str, Any] = {
    # auto: the GPU when there is one, else the CPU, as a Lightning user expects.
    "accelerator": "auto",
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
    # config.yaml. The checkpoint IO is added the same way when the CLI builds the trainer (an object given as a
    # trainer default would be written as an unreadable string and break reloading the saved config).
    "callbacks": [StepProgressBar(leave=True)],
}


def trainer_arguments(**overrides: Any) -> dict[str, Any]:
    """:data:`TRAINER_DEFAULTS` with ``overrides`` applied: the keyword arguments of a Trainer.

    The logger, given as ``class_path``/``init_args``, is instantiated; the default callbacks are fresh objects.
    """
    args = {**TRAINER_DEFAULTS, "callbacks": [StepProgressBar(leave=True)], **overrides}
    logger = args.get("logger")
    if isinstance(logger, dict):
        module, _, name = str(logger["class_path"]).rpartition(".")
        args["logger"] = getattr(importlib.import_module(module), name)(**(logger.get("init_args") or {}))
    return args


def build_trainer(**overrides: Any) -> Trainer:
    """A Trainer built from :data:`TRAINER_DEFAULTS` and ``overrides`` (keyword arguments of ``Trainer``)."""
    return Trainer(**trainer_arguments(**overrides))


# Lightning warnings that say nothing about a hydra-kit run, matched by the start of their message (re.match).
HARMLESS_WARNINGS = (
    # hydra-kit's data modules restore their position from the checkpoint themselves (their state_dict), which
    # Lightning's check of the DataLoader object cannot see.
    r".*your dataloader is not resumable",
    # The CLI passes its arguments on purpose (without --no-plugins), which are also in sys.argv.
    r"LightningCLI's args parameter is intended to run from within Python",
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The synthetic tasks generate examples in the training process; worker processes would not speed them up.
    r".*does not have many workers which may be a bottleneck",
    # `validate --ckpt_path` logs into a new version folder; only best_model_path matters there.
    r"The dirpath has changed from .* won't be reloaded",
)
# Lightning log lines that are noise on the machines hydra-kit runs on (no accounts; accelerators are reported
# by the run itself).
HARMLESS_LOG_LINES = (
    "GPU available: False, used: False",
    "TPU available: False",
    "💡 Tip: For seamless cloud logging",
    "`Trainer(val_check_interval=1)` was configured",  # a 1-step run, whose validation interval hydra-kit clamps to 1
)


class _DropLogLines(logging.Filter):
    """A logging filter for the lines of HARMLESS_LOG_LINES."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(HARMLESS_LOG_LINES)


def quiet_lightning() -> None:
    """Silence the known-harmless Lightning warnings and log lines in this process (each one by its message)."""
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropLogLines) for f in handler.filters):
                handler.addFilter(_DropLogLines())
