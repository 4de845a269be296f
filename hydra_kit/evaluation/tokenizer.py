"""Text to token ids and back for evaluation: UTF-8 bytes, or a HF ``tokenizers`` ``tokenizer.json``.

Which one a model gets is decided by :func:`load_tokenizer` (``hydra-kit eval`` calls it with ``--tokenizer``,
the export folder's ``tokenizer.json``, or the one beside the checkpoint's training shards; bytes otherwise).
Both keep the end-of-document id, when the vocabulary has one, as the token a document starts after: that is
what a model trained on ``hydra-kit prepare`` shards saw before every document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra_kit.errors import RecipeError

__all__ = ["EOS_TOKEN", "ByteTokenizer", "JsonTokenizer", "TextTokenizer", "load_tokenizer"]

EOS_TOKEN = "<|endoftext|>"  # the end-of-document token of hydra-kit prepare's tokenizers
BYTE_EOS_ID = 256  # prepare's byte vocabulary: ids 0-255 are bytes, 256 ends a document


class TextTokenizer:
    """What the evaluation adapter needs of a tokenizer.

    Attributes:
        name: how results name it (``bytes`` or the tokenizer.json path).
        vocab_size: the number of ids it produces (at most the model's vocabulary).
        eos_id: the end-of-document id, or None when the vocabulary has none.
    """

    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (no special tokens added)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; ids that are not text (the end-of-document token) give nothing."""
        raise NotImplementedError


class ByteTokenizer(TextTokenizer):
    """Every UTF-8 byte is a token (ids 0-255), as in ``recipes/text.yaml``.

    Args:
        model_vocab: the model's vocabulary size, at least 256. Above 256, id 256 is the end-of-document token
            (the byte vocabulary of ``hydra-kit prepare --tokenizer bytes``).
    """

    def __init__(self, model_vocab: int) -> None:
        if model_vocab < 256:
            raise RecipeError(f"the byte tokenizer needs a model vocabulary of at least 256; this model has {model_vocab}: give --tokenizer PATH")
        self.name = "bytes"
        self.eos_id = BYTE_EOS_ID if model_vocab > BYTE_EOS_ID else None
        self.vocab_size = 257 if self.eos_id is not None else 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A character cut in the middle decodes as U+FFFD, as a whole-text decode would show it.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class JsonTokenizer(TextTokenizer):
    """A HF ``tokenizers`` tokenizer read from a ``tokenizer.json`` file (``hydra-kit prepare --tokenizer bpe``).

    Args:
        path: the tokenizer.json file.
    """

    def __init__(self, path: Path) -> None:
        try:
            import tokenizers
        except ImportError:
            raise RecipeError(f"{path}: reading a tokenizer.json needs the package 'tokenizers': pip install 'hydra-kit[eval]'") from None
        try:
            self._tokenizer: Any = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own exception type with the parse error
            raise RecipeError(f"--tokenizer {str(path)!r}: not a tokenizers JSON file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        self.name = str(path)
        eos = self._tokenizer.token_to_id(EOS_TOKEN)
        self.eos_id = None if eos is None else int(eos)
        # Task text that spells out "<|endoftext|>" is text, not a document boundary.
        self._tokenizer.encode_special_tokens = True
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


def load_tokenizer(spec: str | Path | None, model_vocab: int) -> TextTokenizer:
    """The tokenizer ``spec`` names, checked against the model's vocabulary.

    Args:
        spec: ``"bytes"``, a tokenizer.json file, a folder holding one, or None for bytes.
        model_vocab: the model's vocabulary size; every id the tokenizer produces must be below it.

    Raises:
        RecipeError: the file is missing or unreadable, or the tokenizer has more ids than the model.
    """
    if spec is None or str(spec) == "bytes":
        return ByteTokenizer(model_vocab)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise RecipeError(f"--tokenizer {str(spec)!r}: expected 'bytes', a tokenizer.json file or a folder holding one (no such file {str(path)!r})")
    tokenizer = JsonTokenizer(path)
    if tokenizer.vocab_size > model_vocab:
        raise RecipeError(f"--tokenizer {str(path)!r} has {tokenizer.vocab_size} ids but the model's vocabulary is {model_vocab}: it is not this model's tokenizer")
    return tokenizer
