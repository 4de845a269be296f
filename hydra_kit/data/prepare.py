"""Turn a text corpus into a tokenizer and train/validation token shards (the work of ``hydra-kit prepare``).

The output folder holds (the format is described in docs/data.md):

* ``tokenizer.json``: the byte-level BPE (absent for ``--tokenizer bytes``);
* ``train-00000.bin``, ``train-00001.bin``, ..., ``val-00000.bin``, ...: raw token ids, uint16 when the
  vocabulary has at most 65,536 ids and uint32 otherwise, every document followed by the end-of-document id;
  a shard holds ``shard_tokens`` ids (the last one fewer), so a document may continue in the next shard;
* ``meta.json``, written last (a folder without it is an interrupted prepare): the vocabulary size, the
  end-of-document id, the dtype, each shard with its token and document counts, the tokenizer's kind and
  sha256, the corpus files and the options.

Documents go to validation by a systematic sample with a seeded phase: document i (in corpus order) is a
validation document when ``floor((i + 1) f + u) > floor(i f + u)``, ``f = val_fraction``, ``u`` drawn from the
seed; so of any n consecutive documents floor(n f) or ceil(n f) are held out, never a part of one. With a
separate ``val_input`` every input document trains and every ``val_input`` document validates. The BPE is trained
on the training documents only.

Memory stays bounded whatever the corpus size: text is read a block at a time, encoded about ``chunk_chars``
characters at a time and appended to the shard files. Training the BPE holds the counts of the distinct
pre-tokens (words) of the corpus, which grow far slower than the corpus.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hydra_kit.data.corpus import DOCUMENT_MODES, CorpusError, find_files, iter_pieces, split_units
from hydra_kit.data.tokenizer import ByteEncoder, Encoder, check_bpe_vocab, load_encoder, train_bpe

__all__ = ["FORMAT", "META_FILE", "PrepareError", "SplitPlan", "prepare", "shard_dtype"]

FORMAT = "hydra-kit-token-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
TRAIN_UNIT_CHARS = 1 << 16  # characters per unit of text handed to the BPE trainer


class PrepareError(CorpusError):
    """``prepare`` cannot run with these options; the message names the option and the fix."""


def shard_dtype(vocab_size: int) -> np.dtype[Any]:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``: uint16 or uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class SplitPlan:
    """Which documents validate: a systematic sample with a seeded phase (see the module docstring)."""

    val_fraction: float
    seed: int
    phase: float = field(init=False)  # u of the module docstring

    def __post_init__(self) -> None:
        self.phase = float(np.random.default_rng([self.seed, 0x5EED]).random())

    def is_val(self, index: int) -> bool:
        """Whether document ``index`` (0-based, in corpus order) is a validation document."""
        f = self.val_fraction
        return math.floor((index + 1) * f + self.phase) > math.floor(index * f + self.phase)

    def documents_needed(self) -> int:
        """The fewest documents a corpus needs for both splits to get one (the later first index of the two, plus
        one); the split of document ``documents_needed() - 1`` is the one a shorter corpus leaves empty."""
        seen: set[bool] = set()
        index = 0
        while len(seen) < 2:
            seen.add(self.is_val(index))
            index += 1
        return index


@dataclass
class ShardWriter:
    """Appends ids to ``{split}-NNNNN.bin`` files of ``shard_tokens`` ids each; counts tokens and documents."""

    folder: Path
    split: str
    dtype: np.dtype[Any]
    eos_id: int
    shard_tokens: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0  # UTF-8 bytes of the documents' text (end-of-document tokens excluded)
    _file: BinaryIO | None = None

    def write(self, ids: np.ndarray) -> None:
        """Append ``ids`` (n,) int64, opening the next shard whenever the current one is full."""
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            shard = self.shards[-1]
            part, ids = ids[: self.shard_tokens - shard["tokens"]], ids[self.shard_tokens - shard["tokens"] :]
            assert self._file is not None
            part.astype(self.dtype).tofile(self._file)
            shard["tokens"] += len(part)
            shard["documents"] += int(np.count_nonzero(part == self.eos_id))

    def _open(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # closed by _open or close
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def close(self) -> dict[str, Any]:
        """Close the last shard; returns the split's entry of meta.json."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "bytes": self.bytes,
            "shards": self.shards,
        }


def _progress(enabled: bool) -> Any:
    """A rich progress bar of bytes read, or a stand-in that shows nothing."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled, transient=False)


def _documents(files: list[Path], documents: str, on_bytes: Callable[[int], None], chunk_chars: int, option: str) -> Iterator[tuple[int, str, bool]]:
    """``(document index, unit text, ends_document)`` over the corpus, units as :func:`split_units` cuts them."""
    index = 0
    for text, ends in split_units(iter_pieces(files, documents, on_bytes, option), chunk_chars):
        yield index, text, ends
        index += ends


def _empty_split_error(split: str, key: str, total: int, documents: str) -> PrepareError:
    """The one-line error for a split that gets no document."""
    hint = "pass --val_input FILE_OR_FOLDER, more files, or --documents blank_lines (blocks separated by blank lines) or lines" if split == "val" else "give more text"
    return PrepareError(f"{key}: the {split} split got no document (the corpus has {total} document(s) with --documents {documents}); {hint}")


def _check_splits_get_documents(files: list[Path], val_files: list[Path], documents: str, plan: SplitPlan | None) -> None:
    """Refuse a corpus one of whose splits would get no document, reading only as many documents as that takes."""

    def count(source: list[Path], option: str, needed: int) -> int:  # documents of ``source``, up to ``needed``
        found = 0
        for _, _, ends in _documents(source, documents, lambda n: None, TRAIN_UNIT_CHARS, option):
            found += ends
            if found >= needed:
                break
        return found

    if plan is None:  # every --input document trains, every --val_input one validates
        for split, source, option in (("train", files, "--input"), ("val", val_files, "--val_input")):
            if count(source, option, 1) == 0:
                raise _empty_split_error(split, option, 0, documents)
        return
    needed = plan.documents_needed()
    found = count(files, "--input", needed)
    if found < needed:
        split = "val" if plan.is_val(needed - 1) else "train"
        raise _empty_split_error(split, "--val_fraction" if split == "val" else "--input", found, documents)


def _clear(folder: Path, overwrite: bool) -> None:
    """Make ``folder`` ready for a new prepare: refuse to overwrite a prepared corpus unless asked."""
    if (folder / META_FILE).exists() and not overwrite:
        raise PrepareError(f"--out {str(folder)!r} already holds a prepared corpus ({META_FILE}); choose another folder or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / META_FILE, folder / "tokenizer.json", *folder.glob("train-*.bin"), *folder.glob("val-*.bin")]:
        old.unlink(missing_ok=True)


def prepare(
    input: str | Path,
    out: str | Path,
    tokenizer: str = "bpe",
    vocab_size: int | None = None,
    val_fraction: float = 0.05,
    val_input: str | Path | None = None,
    seed: int = 0,
    documents: str = "file",
    pattern: str = "*.txt",
    shard_tokens: int = 1 << 26,
    chunk_chars: int = 1 << 20,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize a corpus into train and validation shards in ``out``; returns what meta.json holds.

    Args:
        input: a UTF-8 text file or a folder of them.
        out: the output folder.
        tokenizer: ``bpe`` (train a byte-level BPE on the training documents), ``bytes``, or the path of a
            ``tokenizer.json`` to reuse.
        vocab_size: ids of the BPE (at least 257); for ``bytes`` leave it None (or 257).
        val_fraction: share of the documents held out for validation (unused with ``val_input``).
        val_input: a separate validation file or folder.
        seed: seed of the validation sample's phase.
        documents: what a document is: ``file``, ``blank_lines`` or ``lines`` (docs/data.md).
        pattern: file-name pattern of a folder's files (recursive).
        shard_tokens: ids per shard file.
        chunk_chars: about how many characters are encoded at a time (bounds memory).
        overwrite: replace a corpus prepared in ``out`` before.
        progress: show a rich progress bar of bytes read.

    Raises:
        CorpusError: the input is missing, empty or not text.
        TokenizerError: a bad tokenizer or vocabulary size.
        PrepareError: a bad option, or a split without a document.
    """
    if documents not in DOCUMENT_MODES:
        raise PrepareError(f"--documents {documents!r}: expected one of {', '.join(DOCUMENT_MODES)}")
    if val_input is None and not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val_fraction {val_fraction}: must lie strictly between 0 and 1 (or give --val_input)")
    if shard_tokens <= 0 or chunk_chars <= 0:
        raise PrepareError(f"--shard_tokens ({shard_tokens}) and chunk_chars ({chunk_chars}) must be positive")
    if tokenizer == "bpe":
        check_bpe_vocab(vocab_size)
    elif tokenizer == "bytes" and vocab_size not in (None, ByteEncoder.vocab_size):
        raise PrepareError(f"--vocab_size {vocab_size}: --tokenizer bytes has a fixed vocabulary of {ByteEncoder.vocab_size} (256 bytes and the end-of-document token); leave --vocab_size out")
    files = find_files(input, pattern, "--input")
    val_files = find_files(val_input, pattern, "--val_input") if val_input is not None else []
    plan = SplitPlan(val_fraction, seed) if val_input is None else None
    folder = Path(out).expanduser()
    sizes = sum(f.stat().st_size for f in files) + sum(f.stat().st_size for f in val_files)

    encoder: Encoder | None = None if tokenizer == "bpe" else load_encoder(tokenizer)  # a bad name fails first
    _check_splits_get_documents(files, val_files, documents, plan)  # before the BPE is trained and `out` cleared

    with _progress(progress) as bar:
        if encoder is None:
            task = bar.add_task("training the BPE", total=sum(f.stat().st_size for f in files))
            # Smaller units here: the trainer reads its iterator ahead in batches of units, so their size bounds that.
            read = _documents(files, documents, lambda n: bar.advance(task, n), min(chunk_chars, TRAIN_UNIT_CHARS), "--input")
            assert vocab_size is not None
            encoder = train_bpe((text for i, text, _ in read if plan is None or not plan.is_val(i)), vocab_size)
        vocab = encoder.vocab_size
        if vocab_size is not None and tokenizer != "bytes" and vocab > vocab_size:
            raise PrepareError(f"--tokenizer {tokenizer!r} has {vocab} ids, more than --vocab_size {vocab_size}; leave --vocab_size out to keep its vocabulary")
        _clear(folder, overwrite)
        dtype = shard_dtype(vocab)
        writers = {split: ShardWriter(folder, split, dtype, encoder.eos_id, shard_tokens) for split in SPLITS}
        task = bar.add_task("writing shards", total=sizes)
        sources = [(files, "--input", plan)] + ([(val_files, "--val_input", None)] if val_files else [])
        try:
            for source_files, option, source_plan in sources:
                batch: list[tuple[str, bool, ShardWriter]] = []
                size = 0
                for index, text, ends in _documents(source_files, documents, lambda n: bar.advance(task, n), chunk_chars, option):
                    val = source_plan.is_val(index) if source_plan is not None else option == "--val_input"
                    batch.append((text, ends, writers["val" if val else "train"]))
                    size += len(text)
                    if size >= chunk_chars:
                        _encode(encoder, batch)
                        batch, size = [], 0
                _encode(encoder, batch)
        finally:
            splits = {split: writer.close() for split, writer in writers.items()}
            done = all(splits[split]["documents"] for split in SPLITS) and sys.exc_info()[0] is None
            if not done:  # no half-written corpus is left behind
                for shard in splits["train"]["shards"] + splits["val"]["shards"]:
                    (folder / shard["file"]).unlink(missing_ok=True)

    for split, key in (("train", "--input"), ("val", "--val_input" if val_input is not None else "--val_fraction")):
        if splits[split]["documents"] == 0:  # checked before the BPE too; kept for documents the encoder drops
            raise _empty_split_error(split, key, splits["train"]["documents"] + splits["val"]["documents"], documents)
    tokenizer_file = encoder.save(folder)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vocab_size": vocab,
        "eos_id": encoder.eos_id,
        "dtype": dtype.name,
        "tokenizer": {"kind": encoder.kind, "file": tokenizer_file, "sha256": encoder.sha256(), "source": tokenizer if encoder.kind == "file" else None},
        "documents": documents,
        "val_fraction": val_fraction if val_input is None else None,
        "seed": seed,
        "corpus": {
            "input": str(input),
            "val_input": str(val_input) if val_input is not None else None,
            "pattern": pattern,
            "files": [str(f) for f in files],
            "val_files": [str(f) for f in val_files],
        },
        "splits": splits,
    }
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / META_FILE)  # last, and atomic: meta.json exists only for a complete corpus
    return meta


def _encode(encoder: Encoder, batch: list[tuple[str, bool, ShardWriter]]) -> None:
    """Encode a batch of units and append each unit's ids, and the end-of-document id after a document's last."""
    if not batch:
        return
    for (text, ends, writer), ids in zip(batch, encoder.encode_batch([text for text, _, _ in batch]), strict=True):
        writer.bytes += len(text.encode("utf-8"))
        writer.write(np.append(ids, encoder.eos_id) if ends else ids)
