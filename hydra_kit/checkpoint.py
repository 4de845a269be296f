"""Checkpoints that are written atomically and loaded without executing pickled code.

A run killed while it saves must never leave a corrupt ``last.ckpt``: the checkpoint is written to a temporary
file in the same directory, flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX).
Loading always uses ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects; a truncated or
tampered file fails with a message that names it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from hydra_kit import compat
from hydra_kit.model import HydraLM

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be read safely; the message names the file and the likely cause."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Persist the rename itself, so a power loss right after cannot bring the old file back.
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")  # the names atomic_torch_save writes under: .<target>.tmp-<pid>


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of :func:`atomic_torch_save` left in ``directory`` by processes no longer alive.

    A process killed while writing (``kill -9``, out of memory) leaves its ``.<name>.tmp-<pid>``, possibly as large
    as a checkpoint; a live process may be writing one right now, so only a dead writer's file goes. Process ids
    are those of this machine: a folder shared between machines may hold a live writer elsewhere whose id is
    free here, which is why this runs only when a run starts or resumes in the folder.

    Returns:
        The files removed.
    """
    folder = Path(directory)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or not path.is_file() or _pid_alive(int(match.group(1))):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another process starting in the same folder removed it first
            continue
        removed.append(path)
    if removed:
        log.info("removed %d temporary checkpoint file(s) of killed runs in %s: %s", len(removed), folder, ", ".join(p.name for p in removed))
    return removed


# The checkpoint key holding the SHA-256 of the state dict's tensors, written by AtomicCheckpointIO.
DIGEST_KEY = "hydra_kit_state_dict_sha256"


def state_dict_digest(state_dict: dict[str, Any]) -> str:
    """SHA-256 over the tensors of a state dict: for each key in sorted order, its name, dtype, shape and bytes.

    Torch's zip archive keeps no checksum of the tensor data it reads back, so a flipped bit on disk or in a copy
    loads as a silently different weight; this digest, stored beside the weights, catches it.
    """
    hasher = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _verify_digest(checkpoint: Any, path: str | os.PathLike[str]) -> None:
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return
    stored = checkpoint.get(DIGEST_KEY)
    if stored is None:
        if "hyper_parameters" not in checkpoint:  # not a model checkpoint of hydra-kit: the caller refuses it
            return
        log.warning("checkpoint %r has no weight digest (written before hydra-kit stored one): its weights are not verified", os.fspath(path))
        return
    if stored != state_dict_digest(checkpoint["state_dict"]):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} is corrupt: its weights do not match the SHA-256 digest stored when it was "
            f"written (changed on disk or in a copy); it was not loaded"
        )


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with a clear error for missing, truncated, corrupt or tampered files.

    A checkpoint written by :class:`AtomicCheckpointIO` carries a digest of its weights, checked here; one
    without (older checkpoints) loads with a warning.
    """
    if os.path.isdir(path):
        # Where a run folder keeps them, not a recursive search: a directory can be as large as "/".
        patterns = ("*.ckpt", "checkpoints/*.ckpt", "version_*/checkpoints/*.ckpt", "*/version_*/checkpoints/*.ckpt")
        inside = sorted(p.relative_to(path).as_posix() for pattern in patterns for p in Path(path).glob(pattern))[:5]
        hint = f"; checkpoints inside: {', '.join(inside)}" if inside else "; it holds no .ckpt file"
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is a directory, not a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; a file cut short loses the archive's directory at its end.
        size = os.path.getsize(path)
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} is truncated or corrupt, or not a checkpoint: it is not a PyTorch "
            f"checkpoint archive ({size:,} bytes)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} holds objects that weights-only loading refuses (tampered, or written "
            f"by other code); it was not loaded. Detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is truncated or corrupt and cannot be read ({str(exc).splitlines()[0]})") from None
    _verify_digest(checkpoint, path)
    return checkpoint


def load_model(path: str | os.PathLike[str]) -> tuple[HydraLM, dict[str, Any]]:
    """The HydraLM a checkpoint holds, built from its hyper-parameters and weights, and the checkpoint itself.

    The one loader of the commands that read a trained model (``generate``, ``inspect``, ``ablate --mode
    knockout``). Read weights-only (:func:`safe_torch_load`); the model is in training mode, on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a checkpoint of a HydraLM (names the file).
    """
    checkpoint = safe_torch_load(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is not a hydra-kit checkpoint (it has no hyper_parameters or state_dict)")
    try:
        model = HydraLM(**{k: v for k, v in hparams.items() if not k.startswith("_")})  # "_instantiator": LightningCLI's
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is not a hydra-kit HydraLM checkpoint ({str(exc).splitlines()[0]})") from None
    return model, checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes and weights-only reads (the default of every hydra-kit run)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None) -> None:
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = {**checkpoint, DIGEST_KEY: state_dict_digest(checkpoint["state_dict"])}
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_torch_load(path, map_location if map_location is not None else "cpu")


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and always at the end of training.

    Lightning's ModelCheckpoint skips the end-of-training save once any "last" checkpoint was written in the
    run, which leaves ``last.ckpt`` behind the final step when the run length is not a multiple of the interval.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # A run starting or resuming here clears what a killed writer left (the folder is resolved by now).
        if trainer.is_global_zero and self.dirpath is not None:
            remove_stale_temporaries(self.dirpath)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and compat.last_saved_step(self) != trainer.global_step:
            compat.save_last_now(self, trainer)


class StageCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose "best" starts over at every curriculum stage (``hydra-kit fit``'s best checkpoint).

    A stage changes the task or the model, so its validation loss does not compare with an earlier stage's (a
    harder task has a higher loss): kept across stages, the best checkpoint would stay in the easiest stage
    forever. :class:`hydra_kit.callbacks.Curriculum` calls :meth:`on_curriculum_stage` (the
    :class:`hydra_kit.callbacks.StageAware` protocol) when a stage is reached; the best files written so far
    stay on disk, so each finished stage leaves its best behind. Without a curriculum it is a ModelCheckpoint.
    """

    def on_curriculum_stage(self, stage_index: int) -> None:
        """Forget the best and top-k scores kept so far: from now on they are the new stage's."""
        if self.monitor is None:
            return
        self.best_k_models = {}
        self.kth_best_model_path = ""
        self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
        self.best_model_score = None
        self.best_model_path = ""
