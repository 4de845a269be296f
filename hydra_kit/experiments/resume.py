"""How an experiment's runs survive a kill: each (model, seed) keeps its own checkpoint folder, resumed by the same command.

``hydra-kit experiment`` trains one model per (model, seed), for up to an hour each on the CPU. Each run writes
``last.ckpt`` atomically into :func:`checkpoint_folder` every twentieth of its steps
(:func:`hydra_kit.experiments.runner.train`); the same command run again finds it and continues, exactly as if it
had not stopped. :func:`claim_checkpoint_folder` makes sure a folder's checkpoint belongs to the run at hand, and
:class:`TrainingClock` carries the run's training seconds and last loss across resumptions and prints its progress.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from rich.console import Console

from hydra_kit.errors import RecipeError

__all__ = ["TrainingClock", "checkpoint_folder", "claim_checkpoint_folder", "progress_line"]


def checkpoint_folder(out: Path, label: str, seed: int, where: dict[str, Any] | None = None) -> Path:
    """``OUT/checkpoints/<model>-seed<S>[-<key><value>...]``: where one (model, seed[, level]) run keeps ``last.ckpt``."""
    parts = [re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_"), f"seed{seed}", *(f"{k}{v}" for k, v in (where or {}).items())]
    return out / "checkpoints" / "-".join(parts)


class TrainingClock(Callback):
    """Training seconds and the last training loss of a run, kept in its checkpoints so a resumed run reports the whole run.

    ``seconds`` counts the wall time of every ``fit`` the final model went through (work done after the last
    checkpoint of a killed process is lost, and not counted). With ``report``, a line of progress (step, loss,
    seconds so far) goes to it every ``every`` steps, so an hour-long run shows that it is moving.
    """

    def __init__(self, report: Callable[[str], object] | None = None, every: int = 0) -> None:
        self.before = 0.0  # seconds of the fits before this one (from the checkpoint)
        self.final_loss: float | None = None
        self.report, self.every = report, every
        self._start = time.perf_counter()

    def start(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self._start

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.final_loss = float(loss)
        step = trainer.global_step
        if self.report is not None and self.every > 0 and step % self.every == 0 and step < trainer.max_steps:
            shown = "-" if self.final_loss is None else f"{self.final_loss:.3f}"
            self.report(f"step {step:>6,} of {trainer.max_steps:,}, train loss {shown}, {self.seconds:7.1f} s")

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "final_loss": self.final_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))
        self.final_loss = state_dict.get("final_loss")


def claim_checkpoint_folder(folder: Path, identity: dict[str, Any]) -> Path | None:
    """Make ``folder`` the checkpoint folder of the run ``identity`` describes; its ``last.ckpt`` if one is there to resume.

    The first run writes ``identity`` to ``run.json``; a later run in the same folder must be the same run.

    Raises:
        RecipeError: the folder holds the checkpoint of another run (another model, seed, task or training setting).
    """
    record = folder / "run.json"
    ours = json.loads(json.dumps(identity, sort_keys=True, default=str))
    if record.exists():
        theirs = json.loads(record.read_text(encoding="utf-8"))
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise RecipeError(
                f"experiment: {folder} holds the checkpoint of a run with another {', '.join(differ)} than this command's; "
                "give this run another --out, or delete that folder to train it from the start"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(ours, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    last = folder / "last.ckpt"
    return last if last.exists() else None


def progress_line(console: Console, prefix: str) -> Callable[[str], None]:
    """Print a training run's progress lines to ``console`` after ``prefix`` (the seed and model, as the run's summary line)."""

    def report(line: str) -> None:
        console.print(prefix + line)

    return report
