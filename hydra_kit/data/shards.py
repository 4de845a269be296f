"""Train from token shards written by ``hydra-kit prepare``: a LightningDataModule over memory-mapped shard files.

Examples are windows of ``seq_len + 1`` ids inside one shard: ``input_ids = window[:-1]``, ``targets =
window[1:]``, and ``segment_ids``, which document each input position belongs to (see :class:`ShardWindows`).
Validation reads the non-overlapping windows of the validation shards in order (a shard's tail shorter than a
window is not scored). Training reads the non-overlapping windows of the training shards, each shard's windows
shifted by an offset drawn per epoch, in an order shuffled per epoch by a keyed pseudo-random permutation
(:func:`permute`): the order costs no memory, so nothing grows with the corpus but the page cache. Offsets and
order come from (seed, epoch), so a resumed run sees the batches an uninterrupted one would; under DDP rank r
of w reads examples r, r + w, r + 2w, ... of that order (together the ranks read what one process with batch
size ``batch_size * w`` would).

The module declares ``vocab_size`` (from meta.json) and ``bytes_per_token`` (UTF-8 bytes per token of the
validation split), so the model logs validation bits per byte beside perplexity. A model whose vocabulary is
smaller than the shards' is refused at setup in one line naming the shard folder and both sizes.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hydra_kit.data.loading import training_loader
from hydra_kit.recipe import RecipeError

__all__ = ["ShardDataError", "ShardDataModule", "ShardWindows", "permute", "segment_ids"]

log = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT = "hydra-kit-token-shards"


class ShardDataError(RecipeError):
    """The shard folder cannot be used (missing, incomplete, mismatched); the message names it and the fix."""


@functools.lru_cache(maxsize=64)
def _round_keys(seed: int, epoch: int) -> tuple[int, ...]:
    """The four 64-bit round keys of the permutation of (seed, epoch)."""
    return tuple(int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{r}".encode(), digest_size=8).digest(), "little") for r in range(4))


def permute(index: int, n: int, seed: int, epoch: int) -> int:
    """The image of ``index`` under a pseudo-random permutation of ``range(n)`` keyed by (seed, epoch).

    A four-round Feistel network on the smallest even number of bits that covers ``n``, walked until the
    image falls below ``n`` (cycle walking keeps it a bijection of ``range(n)``): O(1) memory for any ``n``,
    where a stored permutation of every window of a large corpus would not be.
    """
    if not 0 <= index < n:
        raise IndexError(f"index {index} outside range({n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    keys = _round_keys(seed, epoch)
    x = index
    while True:
        left, right = x >> half, x & mask
        for key in keys:
            mixed = ((right * 0x9E3779B97F4A7C15) ^ key) & 0xFFFFFFFFFFFFFFFF
            mixed ^= mixed >> 29
            mixed = (mixed * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
            left, right = right, left ^ ((mixed >> 31) & mask)
        x = (left << half) | right
        if x < n:
            return x


def segment_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Which document each position belongs to, counted from 0 at the window's start.

    Args:
        input_ids: (..., L) token ids.
        eos_id: the end-of-document id.

    Returns:
        (..., L) int64: the number of end-of-document tokens strictly before each position, so the end-of-
        document token closes its document and the token after it opens the next segment.
    """
    ends = (input_ids == eos_id).long()
    return torch.cumsum(ends, dim=-1) - ends


class ShardWindows(Dataset[dict[str, torch.Tensor]]):
    """Windows of ``seq_len + 1`` ids from memory-mapped shards; example i is window ``order(i)``.

    Shard s holds ``counts[s]`` windows starting at ``offsets[s] + k * seq_len``. Each example is a dict:

    * ``input_ids``: (L,) int64, ``L = seq_len``;
    * ``targets``: (L,) int64, the next id at every position;
    * ``segment_ids``: (L,) int64, 0 for the document the window starts in, +1 after every end-of-document
      token in ``input_ids`` (batched: (B, L)); a model that resets its state where the id changes sees each
      document as if it were alone.

    The shard files are opened (read-only memory maps) on first use in each process, so a DataLoader worker
    maps them itself instead of receiving a copy.
    """

    def __init__(self, files: list[Path], dtype: str, seq_len: int, eos_id: int, offsets: list[int], counts: list[int], seed: int | None = None, epoch: int = 0) -> None:
        self.files, self.dtype, self.seq_len, self.eos_id = files, dtype, seq_len, eos_id
        self.offsets, self.counts, self.seed, self.epoch = offsets, counts, seed, epoch
        self.cumulative = np.cumsum([0, *counts]).tolist()
        self._maps: dict[int, np.memmap[Any, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # workers map the files themselves

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def window(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` ids of window ``index`` (in shard order, before shuffling)."""
        s = bisect.bisect_right(self.cumulative, index) - 1
        if s not in self._maps:
            self._maps[s] = np.memmap(self.files[s], dtype=self.dtype, mode="r")
        start = self.offsets[s] + (index - self.cumulative[s]) * self.seq_len
        return np.asarray(self._maps[s][start : start + self.seq_len + 1], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.seed is not None:
            index = permute(index, len(self), self.seed, self.epoch)
        window = torch.from_numpy(self.window(index))
        inputs = window[:-1]
        return {"input_ids": inputs, "targets": window[1:], "segment_ids": segment_ids(inputs, self.eos_id)}


class ShardDataModule(L.LightningDataModule):
    """Language modelling on a folder of token shards made by ``hydra-kit prepare`` (docs/data.md).

    Args:
        path: the folder ``hydra-kit prepare --out`` wrote (meta.json, the ``.bin`` shards, tokenizer.json).
        seq_len: tokens per example.
        batch_size: examples per batch (per process).
        seed: seed of the per-epoch window offsets and order.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, path: str, seq_len: int = 256, batch_size: int = 16, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.path, self._seq_len, self.batch_size, self.seed, self.num_workers = path, seq_len, batch_size, seed, num_workers
        self._meta: dict[str, Any] | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches done), set by load_state_dict

    # ------------------------------------------------------------ what the folder holds
    @property
    def folder(self) -> Path:
        """The shard folder."""
        return Path(self.path).expanduser()

    @property
    def meta(self) -> dict[str, Any]:
        """meta.json of the folder, checked against the shard files (read once).

        The check runs here rather than in the constructor because the CLI builds the data module inside
        jsonargparse, which would bury the message in a traceback.

        Raises:
            ShardDataError: the folder, meta.json or a shard file is missing, or a shard's size is wrong.
        """
        if self._meta is not None:
            return self._meta
        folder, key = self.folder, f"data.path {self.path!r}"
        if self._seq_len <= 0 or self.batch_size <= 0:
            raise ShardDataError(f"data: seq_len ({self._seq_len}) and batch_size ({self.batch_size}) must be positive")
        if not folder.is_dir():
            raise ShardDataError(f"{key}: no such folder; make one with hydra-kit prepare --input CORPUS --out {self.path}")
        meta_file = folder / META_FILE
        if not meta_file.is_file():
            raise ShardDataError(f"{key}: no {META_FILE} (an interrupted or unfinished hydra-kit prepare?); run hydra-kit prepare --out {self.path} again")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ShardDataError(f"{key}: {META_FILE} cannot be read ({exc}); run hydra-kit prepare --out {self.path} again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ShardDataError(f"{key}: {META_FILE} is not a hydra-kit token-shard description (format {FORMAT!r}); run hydra-kit prepare --out {self.path}")
        try:
            self._check_shards(meta)
        except ShardDataError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardDataError(f"{key}: {META_FILE} is malformed ({type(exc).__name__}: {exc}); run hydra-kit prepare --out {self.path} again") from None
        self._meta = meta
        return meta

    def _check_shards(self, meta: dict[str, Any]) -> None:
        """Raise ShardDataError when a shard or the tokenizer file that meta.json lists is missing or truncated."""
        folder, key = self.folder, f"data.path {self.path!r}"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            for shard in meta["splits"][split]["shards"]:
                file = folder / shard["file"]
                if not file.is_file():
                    raise ShardDataError(f"{key}: shard {shard['file']} listed in {META_FILE} is missing; copy the whole folder, or run hydra-kit prepare --out {self.path} again")
                if file.stat().st_size != shard["tokens"] * itemsize:
                    raise ShardDataError(
                        f"{key}: shard {shard['file']} has {file.stat().st_size:,} bytes, {META_FILE} says {shard['tokens']:,} {meta['dtype']} tokens "
                        f"({shard['tokens'] * itemsize:,} bytes); the file is truncated or from another run: prepare the folder again"
                    )
            windows = sum((s["tokens"] - 1) // self._seq_len for s in meta["splits"][split]["shards"] if s["tokens"] > 0)
            if windows == 0:
                raise ShardDataError(f"{key}: the {split} split has no window of seq_len + 1 = {self._seq_len + 1} tokens; use a smaller seq_len or a larger corpus")
        tokenizer = meta.get("tokenizer", {})
        if tokenizer.get("file") and not (folder / tokenizer["file"]).is_file():
            raise ShardDataError(f"{key}: {tokenizer['file']} listed in {META_FILE} is missing; copy the whole folder, or run hydra-kit prepare --out {self.path} again")
        for name in ("vocab_size", "eos_id"):
            int(meta[name])  # present, and a number

    @property
    def vocab_size(self) -> int:
        """Number of token ids in the shards (the tokenizer's vocabulary)."""
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        """The end-of-document id."""
        return int(self.meta["eos_id"])

    @property
    def seq_len(self) -> int:
        """Tokens per example."""
        return self._seq_len

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token of the validation split (end-of-document tokens counted as tokens)."""
        val = self.meta["splits"]["val"]
        return float(val["bytes"]) / max(1, int(val["tokens"]))

    @property
    def tokenizer_sha256(self) -> str:
        """The sha256 meta.json records for the tokenizer (equal exactly when the ids mean the same)."""
        return str(self.meta["tokenizer"]["sha256"])

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model whose vocabulary cannot hold every id of the shards, in one line.

        Raises:
            ShardDataError: naming the shard folder, both sizes and the fix.
        """
        if model_vocab_size < self.vocab_size:
            kind = self.meta["tokenizer"]["kind"]
            raise ShardDataError(
                f"data.path {self.path!r}: the shards use {self.vocab_size} token ids ({kind} tokenizer, {META_FILE}) but model.vocab_size is "
                f"{model_vocab_size}; set --model.vocab_size {self.vocab_size}, or prepare the corpus with --vocab_size {model_vocab_size}"
            )
        if model_vocab_size > self.vocab_size:
            log.warning("model.vocab_size %d exceeds the %d token ids of %s: ids %d and up are never seen in training", model_vocab_size, self.vocab_size, self.path, self.vocab_size)

    # ------------------------------------------------------------ windows and loaders
    def _split(self, split: str) -> tuple[list[Path], list[int]]:
        shards = [s for s in self.meta["splits"][split]["shards"] if s["tokens"] > 0]
        return [self.folder / s["file"] for s in shards], [int(s["tokens"]) for s in shards]

    def train_windows(self, epoch: int) -> ShardWindows:
        """The training windows of epoch ``epoch``: offset per shard and shuffled, from (seed, epoch)."""
        files, tokens = self._split("train")
        rng = np.random.default_rng([self.seed, epoch])
        offsets = [int(rng.integers(0, min(self._seq_len, n - self._seq_len - 1) + 1)) if n > self._seq_len else 0 for n in tokens]
        counts = [max(0, (n - 1 - o) // self._seq_len) for n, o in zip(tokens, offsets, strict=True)]
        return ShardWindows(files, self.meta["dtype"], self._seq_len, self.eos_id, offsets, counts, seed=self.seed, epoch=epoch)

    def val_windows(self) -> ShardWindows:
        """The validation windows: non-overlapping, in order."""
        files, tokens = self._split("val")
        counts = [max(0, (n - 1) // self._seq_len) for n in tokens]
        return ShardWindows(files, self.meta["dtype"], self._seq_len, self.eos_id, [0] * len(files), counts)

    def setup(self, stage: str) -> None:
        self.meta  # noqa: B018 (reads and checks the folder now, so a bad path is one line before training)
        model = self.trainer.lightning_module if self.trainer is not None else None
        vocab = getattr(model, "hparams", {}).get("vocab_size") if model is not None else None
        if vocab is not None:
            self.check_vocab(int(vocab))

    def _loader(self, dataset: Dataset[dict[str, torch.Tensor]], drop_last: bool, sampler: Any = None) -> DataLoader[dict[str, torch.Tensor]]:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler, num_workers=self.num_workers, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        dataset = self.train_windows(epoch)
        if len(dataset) < self.batch_size * world:
            raise ShardDataError(
                f"data.path {self.path!r}: {len(dataset)} training windows of {self._seq_len + 1} tokens cannot fill one batch of "
                f"{self.batch_size * world}; use a smaller batch_size or seq_len"
            )
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0  # what the interrupted run had read
        self._resume = None
        return training_loader(dataset, self.batch_size, trainer, skip, self.num_workers, seed=self.seed + epoch)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self._loader(self.val_windows(), drop_last=False)

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self.val_dataloader()

    # ------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where the training stream stands, and which shards (tokenizer, size) it reads."""
        train = self.meta["splits"]["train"]
        state: dict[str, Any] = {"seed": self.seed, "seq_len": self._seq_len, "num_tokens": int(train["tokens"]), "tokenizer_sha256": self.tokenizer_sha256}
        if self.trainer is not None:
            # `processed`, not `completed`: checkpoints are written in on_train_batch_end, after a batch is processed
            # and before it counts as completed.
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            state.update(epoch=self.trainer.current_epoch, batches_done=int(getattr(progress, "processed", progress.completed)))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream where the checkpoint left it; refuse shards of another tokenizer.

        Raises:
            ShardDataError: the checkpoint was trained on ids of another tokenizer.
        """
        saved = state_dict.get("tokenizer_sha256")
        if saved is not None and saved != self.tokenizer_sha256:
            raise ShardDataError(
                f"data.path {self.path!r}: its tokenizer (sha256 {self.tokenizer_sha256[:12]}) is not the one the checkpoint was trained with "
                f"(sha256 {saved[:12]}); prepare the corpus with that run's tokenizer: hydra-kit prepare --tokenizer OLD_DIR/tokenizer.json"
            )
        # The stream position only means something for the same shards and window size; a checkpoint fine-tuned on
        # other text starts that text from its beginning.
        if state_dict.get("num_tokens") != int(self.meta["splits"]["train"]["tokens"]) or state_dict.get("seq_len") != self._seq_len:
            return
        self.seed = int(state_dict.get("seed", self.seed))
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict.get("batches_done", 0)))


