"""The tokenizers ``hydra-kit prepare`` writes shards with: byte-level BPE (HF ``tokenizers``) or plain bytes.

* ``bpe``: a byte-level BPE (as GPT-2's: every byte is in the base alphabet, so any text encodes and nothing
  is unknown) trained on the training documents with HF ``tokenizers``, locally; saved as ``tokenizer.json``.
  Its ids: the end-of-document token ``<|endoftext|>`` is 0, then the 256 byte symbols, then the merges; so
  ``vocab_size`` must be at least 257. A small corpus may run out of merges before ``vocab_size``: the
  tokenizer then has fewer ids, and the shards' ``meta.json`` records how many.
* ``bytes``: every UTF-8 byte is a token (ids 0-255) and the end-of-document token is 256 (vocabulary 257).
* a ``tokenizer.json`` file: an existing HF tokenizer (one written by an earlier prepare, to encode more text
  with the same ids); it must hold ``<|endoftext|>``.

``tokenizers`` is the optional extra ``text`` (``pip install 'hydra-kit[text]'``); it is imported only when a
BPE is trained or loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hydra_kit.recipe import RecipeError

__all__ = ["BYTE_VOCAB", "EOS_TOKEN", "MIN_BPE_VOCAB", "BPEEncoder", "ByteEncoder", "Encoder", "TokenizerError", "import_tokenizers", "load_encoder", "train_bpe"]

EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte values and the end-of-document token
MIN_BPE_VOCAB = 256 + 1  # the byte alphabet and <|endoftext|>


class TokenizerError(RecipeError):
    """A tokenizer cannot be built or read; the message names the option or file and the fix."""


def import_tokenizers() -> Any:
    """The HF ``tokenizers`` package, or a one-line error naming the extra that installs it."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("--tokenizer bpe needs the package 'tokenizers': pip install 'hydra-kit[text]' (make setup installs it)") from None
    return tokenizers


class Encoder:
    """Text to token ids, with the end-of-document id; what the shard writer needs of a tokenizer.

    Attributes:
        kind: ``bpe``, ``bytes`` or ``file`` (a tokenizer.json given by path).
        vocab_size: number of ids.
        eos_id: the end-of-document id.
    """

    kind: str
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text, (n_i,) int64; the end-of-document token is never produced from text."""
        raise NotImplementedError

    def save(self, folder: Path) -> str | None:
        """Write the tokenizer into ``folder``; returns the file name, or None when there is nothing to write."""
        raise NotImplementedError

    def sha256(self) -> str:
        """A hash that is the same exactly when two encoders give the same ids."""
        raise NotImplementedError


class ByteEncoder(Encoder):
    """UTF-8 bytes as ids 0-255; the end-of-document id is 256."""

    kind, vocab_size, eos_id = "bytes", BYTE_VOCAB, 256

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def save(self, folder: Path) -> str | None:
        return None

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps({"kind": "bytes", "vocab_size": BYTE_VOCAB, "eos_id": 256}).encode()).hexdigest()


class BPEEncoder(Encoder):
    """A HF ``tokenizers.Tokenizer`` holding ``<|endoftext|>``; text that spells it out is encoded as text."""

    def __init__(self, tokenizer: Any, kind: str = "bpe", source: str = "--tokenizer") -> None:
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise TokenizerError(f"{source}: the tokenizer has no {EOS_TOKEN} token to end documents with; use one made by hydra-kit prepare")
        # The literal string "<|endoftext|>" inside a document must not become a document boundary.
        tokenizer.encode_special_tokens = True
        self.tokenizer, self.kind, self.eos_id = tokenizer, kind, int(eos)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._json = tokenizer.to_str()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def save(self, folder: Path) -> str | None:
        (folder / "tokenizer.json").write_text(self._json, encoding="utf-8")
        return "tokenizer.json"

    def sha256(self) -> str:
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()


def check_bpe_vocab(vocab_size: int | None) -> int:
    """``vocab_size`` if a byte-level BPE can have it, else a one-line error saying the least it can be."""
    if vocab_size is None:
        raise TokenizerError("--tokenizer bpe needs --vocab_size N (e.g. 4096; at least 257: the 256 bytes and the end-of-document token)")
    if vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(
            f"--vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least {MIN_BPE_VOCAB} ids "
            f"(the 256-byte alphabet and the end-of-document token {EOS_TOKEN}); use e.g. --vocab_size 4096, or --tokenizer bytes"
        )
    if vocab_size > 2**31 - 1:
        raise TokenizerError(f"--vocab_size {vocab_size} is too large (at most {2**31 - 1})")
    return vocab_size


def train_bpe(texts: Iterator[str], vocab_size: int) -> BPEEncoder:
    """A byte-level BPE with ``vocab_size`` ids trained on ``texts`` (streamed; nothing is downloaded).

    Args:
        texts: training text, in units that split where the pre-tokenizer splits
            (:func:`hydra_kit.data.corpus.split_units`), so the word counts are those of the whole documents.
        vocab_size: the number of ids wanted, at least 257.
    """
    tk = import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    # No prefix space: a unit that begins a document is encoded exactly as written.
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=check_bpe_vocab(vocab_size),
        special_tokens=[EOS_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # the caller shows bytes read
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPEEncoder(tokenizer)


def load_encoder(spec: str, source: str = "--tokenizer") -> Encoder:
    """The encoder ``bytes`` names, or the HF tokenizer saved in the file ``spec`` (a ``tokenizer.json``).

    Raises:
        TokenizerError: the file is missing or not a tokenizer, or lacks ``<|endoftext|>``.
    """
    if spec == "bytes":
        return ByteEncoder()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{source} {spec!r}: expected bpe, bytes, or a tokenizer.json file (no such file)")
    tk = import_tokenizers()
    try:
        tokenizer = tk.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises its own exception type with the parse error
        raise TokenizerError(f"{source} {str(path)!r}: not a tokenizers JSON file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return BPEEncoder(tokenizer, kind="file", source=f"{source} {str(path)!r}")
