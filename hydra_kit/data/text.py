"""Real text, byte-level: a LightningDataModule over a text file or a folder of files (no download, no tokenizer).

Every byte is a token (vocabulary 256): the model never decodes, so any language and any UTF-8 character work.
The files must be UTF-8 text: a binary file named by mistake (an executable, an archive, a checkpoint) is refused
with the offset of its first invalid byte; ``allow_binary=True`` reads any bytes as they are. A folder contributes
the files under it that match ``pattern`` (recursively, sorted by path, hidden files skipped), concatenated in
that order.

The byte stream is split by position: the first ``1 - val_fraction`` of it is training text, the rest
validation text, so no validation byte is ever a training input or target. Alternatively ``val_path`` names a
separate held-out file or folder: then all of ``path`` is training text and all of ``val_path`` validation
text (e.g. train on WikiText-2 ``valid.txt``, evaluate on ``test.txt``). Examples are windows of
``seq_len + 1`` bytes: ``input_ids = window[:-1]``, ``targets = window[1:]`` (next-byte prediction at every
position). Validation reads the non-overlapping windows of the validation text in order (a tail shorter than a
window is not scored). Training reads the non-overlapping windows of the training text in an order shuffled
per epoch, shifted by an offset drawn per epoch so epochs see different window boundaries; both come from a
generator seeded by (seed, epoch), so a resumed run sees the batches an uninterrupted one would.

The module declares ``bytes_per_token = 1``: the model then logs validation bits per byte
(``val/bpb`` = mean loss / ln 2) beside perplexity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hydra_kit.compat import batches_processed
from hydra_kit.data.loading import training_loader
from hydra_kit.package_data import package_folder
from hydra_kit.recipe import RecipeError

# A relative path under data/ that does not exist from the working folder names the sample data shipped with
# hydra-kit (the checkout's top-level data/, installed as hydra_kit.sample_data), so recipes/text.yaml's default
# text is found from any folder, in a checkout and in an installed wheel.
_SAMPLE_DATA_PREFIX = "data"
_SAMPLE_DATA_PACKAGE = "hydra_kit.sample_data"


class TextDataError(RecipeError):
    """The text data cannot be used (missing, empty, too short); the message names the path and the fix."""


def read_bytes(path: str | Path, pattern: str = "*.txt", allow_binary: bool = False, key: str = "data.path") -> tuple[np.ndarray, list[Path]]:
    """The bytes of a file, or of the matching files under a folder concatenated, and the files read.

    Args:
        path: a file or a folder.
        pattern: file-name pattern for a folder (recursive glob).
        allow_binary: accept files that are not UTF-8 text.
        key: the recipe key that gave ``path`` (``data.path`` or ``data.val_path``), named in errors.

    Raises:
        TextDataError: the path does not exist, a folder has no matching file, a file is not UTF-8 text (unless
            ``allow_binary``), or there is no byte at all.
    """
    root = _sample_data(Path(path).expanduser())
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob(pattern) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            present = sorted(p.name for p in root.iterdir())[:10]
            raise TextDataError(f"{key} {str(root)!r}: no file matching {pattern!r} in this folder (it holds: {', '.join(present) or 'nothing'}); set data.pattern")
    else:
        raise TextDataError(f"{key} {str(root)!r}: no such file or folder; pass --data.init_args.{key.split('.')[-1]} FILE_OR_FOLDER")
    parts = [np.fromfile(f, dtype=np.uint8) for f in files]
    if not allow_binary:
        for file, part in zip(files, parts, strict=True):
            _check_utf8(file, part, key=key)
    data = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    if data.size == 0:
        what = "file is empty" if root.is_file() else f"{len(files)} matching file(s) are all empty"
        raise TextDataError(f"{key} {str(root)!r}: the {what}; there is no text to {'validate' if key == 'data.val_path' else 'train'} on")
    return data, files


def _sample_data(path: Path) -> Path:
    """``path``, or the shipped sample file it names (``data/...``) when it does not exist from the working folder."""
    if path.exists() or path.is_absolute() or path.parts[:1] != (_SAMPLE_DATA_PREFIX,):
        return path
    shipped = package_folder(_SAMPLE_DATA_PACKAGE).joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path


def _check_utf8(file: Path, data: np.ndarray, chunk: int = 1 << 22, key: str = "data.path") -> None:
    """Raise TextDataError naming the file and offset of the first byte that is not valid UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    for start in range(0, len(data), chunk):
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
        try:
            decoder.decode(data[start : start + chunk].tobytes(), final=start + chunk >= len(data))
        except UnicodeDecodeError as exc:
            offset = start - pending + exc.start
            raise TextDataError(
                f"{key} {str(file)!r}: not UTF-8 text (byte 0x{int(data[min(offset, len(data) - 1)]):02x} at offset "
                f"{offset:,} is not valid UTF-8); name a text file, or set data.init_args.allow_binary true to train on any bytes"
            ) from None


class ByteWindows(Dataset[dict[str, torch.Tensor]]):
    """Windows of a byte array: item i is ``data[s : s + seq_len]`` and its next bytes, ``s = starts[i]``."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, seq_len: int) -> None:
        self.data, self.starts, self.seq_len = data, starts, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[index])
        window = torch.from_numpy(self.data[s : s + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "targets": window[1:]}


class TextDataModule(L.LightningDataModule):
    """Byte-level language modelling on a text file or folder, split into training and validation by position.

    Args:
        path: a text file, or a folder whose files matching ``pattern`` are read (sorted, concatenated). A
            relative ``data/...`` path that does not exist from the working folder names the sample data shipped
            with hydra-kit (``data/wikitext-2-sample/valid-sample.txt`` is recipes/text.yaml's default).
        seq_len: bytes per example (the model sees seq_len bytes and predicts the next byte at each).
        batch_size: examples per batch.
        val_fraction: share of the byte stream, taken from its end, held out for validation (unused with
            ``val_path``).
        val_path: a separate validation file or folder; None: split ``path`` by position.
        pattern: file-name pattern for a folder (recursive glob), e.g. "*.txt" or "*".
        seed: seed of the per-epoch window order and offset.
        num_workers: DataLoader worker processes.
        allow_binary: read files that are not UTF-8 text as they are (by default they are refused).
    """

    bytes_per_token = 1.0  # the model reports val/bpb from this
    vocab_size = 256

    def __init__(
        self,
        path: str,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        val_path: str | None = None,
        pattern: str = "*.txt",
        seed: int = 0,
        num_workers: int = 0,
        allow_binary: bool = False,
    ) -> None:
        super().__init__()
        self.path, self.val_path, self.seq_len, self.batch_size = path, val_path, seq_len, batch_size
        self.val_fraction, self.pattern, self.seed, self.num_workers = val_fraction, pattern, seed, num_workers
        self.allow_binary = allow_binary
        self._loaded: tuple[np.ndarray, np.ndarray, list[Path], list[Path]] | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches done), set by load_state_dict

    def load(self) -> tuple[np.ndarray, np.ndarray, list[Path], list[Path]]:
        """Read and check the text (once): (training bytes, validation bytes, files, validation files).

        Every accessor calls it, and so does ``setup``.

        The check runs here rather than in the constructor because the CLI builds the data module inside
        jsonargparse, which would bury the message in a traceback; raised from ``setup`` it is reported as one
        line naming the path.

        Raises:
            TextDataError: a bad argument, a missing or empty path, or text shorter than one window.
        """
        if self._loaded is not None:
            return self._loaded
        seq_len, val_fraction, path, val_path = self.seq_len, self.val_fraction, self.path, self.val_path
        if seq_len <= 0 or self.batch_size <= 0:
            raise TextDataError(f"data: seq_len ({seq_len}) and batch_size ({self.batch_size}) must be positive")
        if val_path is None and not 0.0 < val_fraction < 1.0:
            raise TextDataError(f"data.val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        data, files = read_bytes(path, self.pattern, self.allow_binary)
        if val_path is None:
            split_at = round(len(data) * (1.0 - val_fraction))
            train, val, val_files = data[:split_at], data[split_at:], files
            sources = [("training", "data.path", path, train), ("validation", "data.path", path, val)]
            how = f" ({len(data):,} bytes split at val_fraction {val_fraction})"
        else:
            train = data
            val, val_files = read_bytes(val_path, self.pattern, self.allow_binary, key="data.val_path")
            sources = [("training", "data.path", path, train), ("validation", "data.val_path", val_path, val)]
            how = ""
        window = seq_len + 1
        for name, key, source, part in sources:
            if len(part) < window:
                raise TextDataError(
                    f"{key} {source!r}: {len(part):,} {name} bytes{how}, shorter than one window of "
                    f"seq_len + 1 = {window} bytes; use a longer text or a smaller seq_len"
                )
        self._loaded = (train, val, files, val_files)
        return self._loaded

    def setup(self, stage: str) -> None:
        self.load()

    @property
    def train_data(self) -> np.ndarray:
        """The training bytes."""
        return self.load()[0]

    @property
    def val_data(self) -> np.ndarray:
        """The validation bytes."""
        return self.load()[1]

    @property
    def files(self) -> list[Path]:
        """The files the training (and, without ``val_path``, validation) text was read from, in order."""
        return self.load()[2]

    @property
    def val_files(self) -> list[Path]:
        """The files the validation text was read from."""
        return self.load()[3]

    def train_starts(self, epoch: int) -> np.ndarray:
        """Window starts of training epoch ``epoch``, in reading order: non-overlapping, offset and shuffled."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.train_data)
        offset = int(rng.integers(0, min(self.seq_len, n - self.seq_len - 1) + 1))
        starts = np.arange(offset, n - self.seq_len, self.seq_len, dtype=np.int64)  # each window needs seq_len + 1 bytes
        return starts[rng.permutation(len(starts))]

    def val_starts(self) -> np.ndarray:
        """Window starts of the validation text: non-overlapping, in order."""
        return np.arange(0, len(self.val_data) - self.seq_len, self.seq_len, dtype=np.int64)

    def _loader(self, dataset: Dataset[dict[str, torch.Tensor]], drop_last: bool) -> DataLoader[dict[str, torch.Tensor]]:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        starts = self.train_starts(epoch)
        if len(starts) < self.batch_size * world:
            raise TextDataError(
                f"data.path {self.path!r}: {len(starts)} training windows of {self.seq_len + 1} bytes cannot fill one batch of "
                f"{self.batch_size * world}; use a smaller batch_size or seq_len"
            )
        dataset: Dataset[dict[str, torch.Tensor]] = ByteWindows(self.train_data, starts, self.seq_len)
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0  # what the interrupted run had read
        self._resume = None
        return training_loader(dataset, self.batch_size, trainer, skip, self.num_workers, seed=self.seed + epoch)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self._loader(ByteWindows(self.val_data, self.val_starts(), self.seq_len), drop_last=False)

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where the training stream stands, and which corpus (by size) it reads."""
        state: dict[str, Any] = {"seed": self.seed, "num_bytes": len(self.train_data), "seq_len": self.seq_len}
        if self.trainer is not None:
            # `processed`, not `completed`: checkpoints are written in on_train_batch_end, after a batch is processed
            # and before it counts as completed.
            state.update(epoch=self.trainer.current_epoch, batches_done=batches_processed(self.trainer))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The stream position only means something for the same corpus and window size; a checkpoint evaluated or
        # fine-tuned on other text starts that text from its beginning.
        if state_dict.get("num_bytes") != len(self.train_data) or state_dict.get("seq_len") != self.seq_len:
            return
        self.seed = int(state_dict.get("seed", self.seed))
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict.get("batches_done", 0)))
