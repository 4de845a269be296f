"""The text side of a model: the tokenizer that turns text into its token ids and back, and where to find it.

Two kinds of tokenizer:

* ``bytes``: every UTF-8 byte is a token (ids 0-255), as ``recipes/text.yaml`` trains (vocabulary 256);
  ``hydra-kit prepare --tokenizer bytes`` adds an end-of-document id, 256. Nothing to store.
* a ``tokenizer.json`` of Hugging Face ``tokenizers`` (``hydra-kit prepare --tokenizer bpe`` writes one beside its
  token shards, a byte-level BPE whose ``<|endoftext|>`` ends every document). ``tokenizers`` is the optional
  extra ``text`` (``pip install 'hydra-kit[text]'``), imported only when such a file is read.

A checkpoint does not hold its tokenizer: :func:`find_tokenizer` finds it through the run that wrote the
checkpoint (the ``config.yaml`` saved beside its ``checkpoints/`` folder names the data module and the shard
folder, whose ``meta.json`` names the tokenizer), or through the data module's state saved in the checkpoint.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hydra_kit.errors import RecipeError

__all__ = [
    "EOS_TOKEN",
    "TOKENIZER_FILE",
    "ByteCodec",
    "HFTokenizerCodec",
    "IncrementalDecoder",
    "TextCodec",
    "TokenizerError",
    "TokenizerSource",
    "find_tokenizer",
    "load_codec",
    "tokenizer_from_option",
    "verify_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"  # the end-of-document token of hydra-kit prepare's tokenizers
TOKENIZER_FILE = "tokenizer.json"
BYTE_VOCAB = 256


class TokenizerError(RecipeError):
    """A tokenizer cannot be found or read; the message names the file or option and the fix."""


@dataclass(frozen=True)
class TokenizerSource:
    """Which tokenizer a model reads, before it is loaded.

    Attributes:
        kind: ``bytes`` or ``file`` (a ``tokenizer.json``).
        path: the ``tokenizer.json`` (kind ``file`` only).
        eos_id: the end-of-document id, or None when the model was trained without one.
    """

    kind: str
    path: Path | None = None
    eos_id: int | None = None

    def describe(self) -> str:
        """``bytes`` or the path of the file, for messages."""
        return "bytes" if self.kind == "bytes" else str(self.path)


class IncrementalDecoder:
    """Token ids in, text out, one id at a time: :meth:`push` returns the text that is complete so far."""

    def push(self, token: int) -> str:
        """The new text that ``token`` completes ("" while a character is still cut short)."""
        raise NotImplementedError

    def flush(self) -> str:
        """What is left at the end (an unfinished character becomes U+FFFD, as a whole decode gives it)."""
        raise NotImplementedError


class TextCodec:
    """Text to token ids and back.

    Attributes:
        kind: ``bytes`` or ``file``.
        vocab_size: the number of ids the tokenizer uses.
        eos_id: the end-of-document id, or None.
    """

    kind: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (the end-of-document id is never produced from text)."""
        raise NotImplementedError

    def decoder(self) -> IncrementalDecoder:
        """A fresh :class:`IncrementalDecoder` (one per generated row)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (the end-of-document id renders as nothing)."""
        decoder = self.decoder()
        return "".join(decoder.push(i) for i in ids) + decoder.flush()


class _ByteDecoder(IncrementalDecoder):
    def __init__(self, eos_id: int | None) -> None:
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eos_id = eos_id

    def push(self, token: int) -> str:
        if 0 <= token < BYTE_VOCAB:
            return self.utf8.decode(bytes([token]))
        # An id beyond the bytes (a model whose vocabulary is larger than its data's) is shown as its number.
        return "" if token == self.eos_id else f"{token} "

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class ByteCodec(TextCodec):
    """UTF-8 bytes as ids 0-255, and optionally an end-of-document id (256 for ``hydra-kit prepare --tokenizer bytes``)."""

    kind = "bytes"

    def __init__(self, eos_id: int | None = None) -> None:
        self.eos_id = eos_id
        self.vocab_size = BYTE_VOCAB if eos_id is None else max(BYTE_VOCAB, eos_id + 1)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> IncrementalDecoder:
        return _ByteDecoder(self.eos_id)


class _TokenizerDecoder(IncrementalDecoder):
    """Decodes a window of recent ids and emits what it adds, so a character split over tokens comes out whole.

    The window starts at ``prefix``; ``read`` marks how far the text was emitted. Decoding only the window keeps
    every step's work bounded, whatever the length of the generation.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


def _import_tokenizers(path: Path) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"{path}: reading a tokenizer.json needs the package 'tokenizers': pip install 'hydra-kit[text]' (make setup installs it)") from None
    return tokenizers


class HFTokenizerCodec(TextCodec):
    """A Hugging Face ``tokenizers`` tokenizer read from a ``tokenizer.json``.

    Args:
        path: the file.

    Raises:
        TokenizerError: ``tokenizers`` is not installed, or the file is not a tokenizer (names the file).
    """

    kind = "file"

    def __init__(self, path: Path) -> None:
        tk = _import_tokenizers(path)
        try:
            self.tokenizer = tk.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own exception type with the parse error
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TokenizerError(f"{path}: not a tokenizers JSON file ({detail})") from None
        # A prompt that spells out "<|endoftext|>" is text, not a document boundary (as hydra-kit prepare encodes).
        self.tokenizer.encode_special_tokens = True
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        self.eos_id = None if eos is None else int(eos)
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decoder(self) -> IncrementalDecoder:
        return _TokenizerDecoder(self.tokenizer)


def load_codec(source: TokenizerSource) -> TextCodec:
    """The codec ``source`` describes.

    Raises:
        TokenizerError: the file is missing or unreadable, or ``tokenizers`` is not installed.
    """
    if source.kind == "bytes":
        return ByteCodec(source.eos_id)
    if source.path is None or not source.path.is_file():
        raise TokenizerError(f"tokenizer {source.describe()}: no such file")
    return HFTokenizerCodec(source.path)


def tokenizer_from_option(spec: str, option: str = "--tokenizer") -> TokenizerSource:
    """The tokenizer an option names: ``bytes``, a ``tokenizer.json``, or a folder holding one (a shard folder).

    A shard folder's ``meta.json`` (from ``hydra-kit prepare``) also gives the end-of-document id.

    Raises:
        TokenizerError: no such file, or a folder without a tokenizer.json.
    """
    if spec == "bytes":
        return TokenizerSource("bytes")
    path = Path(spec).expanduser()
    if path.is_dir():
        meta = _read_meta(path)
        if meta is not None:
            return _from_meta(path, meta, f"{option} {spec}")
        if not (path / TOKENIZER_FILE).is_file():
            raise TokenizerError(f"{option} {spec}: this folder holds no {TOKENIZER_FILE}; give the file, its folder, or bytes")
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"{option} {spec}: no such file; give a {TOKENIZER_FILE}, the folder holding it, or bytes")
    return TokenizerSource("file", path, _eos_of_file(path))


def _eos_of_file(path: Path) -> int | None:
    """The id of ``<|endoftext|>`` in a tokenizer.json, read as JSON (no ``tokenizers`` needed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not a tokenizers JSON file ({exc})") from None
    for token in data.get("added_tokens", []) if isinstance(data, dict) else []:
        if isinstance(token, dict) and token.get("content") == EOS_TOKEN:
            return int(token["id"])
    return None


def _read_meta(folder: Path) -> dict[str, Any] | None:
    file = folder / "meta.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{file}: cannot be read ({exc})") from None
    return meta if isinstance(meta, dict) and isinstance(meta.get("tokenizer"), dict) else None


def _from_meta(folder: Path, meta: dict[str, Any], where: str) -> TokenizerSource:
    """The tokenizer a shard folder's meta.json names."""
    info, eos = meta["tokenizer"], meta.get("eos_id")
    eos_id = None if eos is None else int(eos)
    if info.get("kind") == "bytes" or not info.get("file"):
        return TokenizerSource("bytes", eos_id=eos_id)
    file = folder / str(info["file"])
    if not file.is_file():
        raise TokenizerError(f"{where}: {file} named in {folder / 'meta.json'} is missing; copy the whole shard folder, or pass --tokenizer FILE")
    return TokenizerSource("file", file, eos_id)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hydra-kit prepare records its tokenizer's, checkpoints of shard runs keep it)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def verify_tokenizer(source: TokenizerSource, checkpoint: dict[str, Any], ckpt_path: str | Path) -> None:
    """Refuse a tokenizer.json other than the one a shard-trained checkpoint recorded (by SHA-256 of the file).

    Raises:
        TokenizerError: the file's SHA-256 differs from the checkpoint's; names both.
    """
    state = checkpoint.get("ShardDataModule")
    trained = state.get("tokenizer_sha256") if isinstance(state, dict) else None
    if source.kind != "file" or source.path is None or trained is None:
        return
    actual = file_sha256(source.path)
    if actual != trained and _serialised_sha256(source.path) != trained:
        raise TokenizerError(
            f"--tokenizer {source.path}: not the tokenizer checkpoint {ckpt_path} was trained with (sha256 {actual[:12]}, the "
            f"checkpoint's {str(trained)[:12]}); give the tokenizer.json of the shard folder it was trained on"
        )


def _serialised_sha256(path: Path) -> str | None:
    """SHA-256 of the tokenizer as ``tokenizers`` writes it back: hydra-kit prepare records that of a tokenizer.json it
    was given, whose own bytes may be spelled differently (key order, spacing); None without ``tokenizers``."""
    try:
        import tokenizers
    except ImportError:
        return None
    try:
        text = tokenizers.Tokenizer.from_file(str(path)).to_str()
    except Exception:  # not a tokenizer: the caller's own comparison already failed
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _run_data_section(ckpt_path: Path) -> tuple[dict[str, Any], Path] | None:
    """The ``data`` section of the config.yaml a run saved beside the checkpoint's folder, and that file."""
    folder = ckpt_path.resolve().parent
    config = folder.parent / "config.yaml" if folder.name == "checkpoints" else None
    if config is None or not config.is_file():
        return None
    try:
        recipe = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    data = recipe.get("data") if isinstance(recipe, dict) else None
    return (data, config) if isinstance(data, dict) else None


def _locate(path: str, config: Path) -> Path | None:
    """A relative path of a run's config.yaml, as seen from where training ran: here, or a folder above the run."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return given if given.exists() else None
    for base in (Path.cwd(), *config.parent.parents):
        if (base / given).exists():
            return base / given
    return None


def find_tokenizer(ckpt_path: str | Path, checkpoint: dict[str, Any]) -> TokenizerSource | None:
    """The tokenizer a checkpoint was trained with, or None when nothing tells (synthetic tasks: token ids only).

    Looks at the run's saved ``config.yaml`` (a ``ShardDataModule`` folder's ``meta.json``, or ``TextDataModule``:
    bytes), then at the data module state Lightning keeps in the checkpoint (``TextDataModule``: bytes).

    Raises:
        TokenizerError: the checkpoint was trained on token shards whose tokenizer cannot be found, or the one
            found is not the one the checkpoint was trained with (by SHA-256); the message says to pass --tokenizer.
    """
    ckpt = Path(ckpt_path)
    shard_state = checkpoint.get("ShardDataModule")
    trained_sha = shard_state.get("tokenizer_sha256") if isinstance(shard_state, dict) else None
    found = _run_data_section(ckpt)
    if found is not None:
        data, config = found
        class_path = str(data.get("class_path", ""))
        raw_args = data.get("init_args")
        init_args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        if class_path.endswith("TextDataModule"):
            return TokenizerSource("bytes")
        if class_path.endswith("ShardDataModule") and init_args.get("path"):
            folder = _locate(str(init_args["path"]), config)
            meta = _read_meta(folder) if folder is not None else None
            if folder is not None and meta is not None:
                source = _from_meta(folder, meta, f"checkpoint {ckpt}")
                recorded = meta["tokenizer"].get("sha256")
                if trained_sha is not None and recorded is not None and recorded != trained_sha:
                    raise TokenizerError(
                        f"checkpoint {ckpt}: the shard folder {folder} now holds another tokenizer (sha256 {str(recorded)[:12]}) than the one "
                        f"the checkpoint was trained with ({str(trained_sha)[:12]}); pass --tokenizer FILE"
                    )
                return source
    if isinstance(checkpoint.get("TextDataModule"), dict):
        return TokenizerSource("bytes")
    if shard_state is not None:
        raise TokenizerError(
            f"checkpoint {ckpt} was trained on token shards, but their tokenizer was not found (no run config.yaml beside its "
            f"checkpoints/ folder naming a shard folder that still exists); pass --tokenizer SHARD_FOLDER or --tokenizer FILE"
        )
    return None
