"""Reading a text corpus as a stream of documents, a bounded piece at a time (what ``hydra-kit prepare`` reads).

A corpus is a UTF-8 text file, or a folder whose files matching a pattern are read recursively, sorted by path,
hidden files and folders skipped. What a *document* is (each one ends with an end-of-document token in the
shards) depends on ``documents``:

* ``file`` (default): each file is one document, its text exactly as in the file;
* ``blank_lines``: each run of non-blank lines is one document (its lines as in the file, newlines included);
  blank lines (empty or whitespace only) separate documents and belong to none;
* ``lines``: each non-blank line is one document (newline included).

Nothing here holds more than about ``chunk_chars`` characters of a document: a file is decoded a block at a time
and a long document is handed on in pieces. Pieces are cut only where the byte-level BPE pre-tokenizer would
split anyway (just before the last whitespace character that precedes a letter or digit), so a document encodes
to the same tokens whether it arrives whole or in pieces; a run of ``4 * chunk_chars`` characters with no such
place (text without spaces) is cut where it stands.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra_kit.recipe import RecipeError

__all__ = ["DOCUMENT_MODES", "CorpusError", "find_files", "iter_pieces", "split_units"]

DOCUMENT_MODES = ("file", "blank_lines", "lines")
READ_BYTES = 1 << 20  # one read() of a file


class CorpusError(RecipeError):
    """The corpus cannot be read as text (missing, empty, binary); the message names the path and the fix."""


def find_files(path: str | Path, pattern: str = "*.txt", option: str = "--input") -> list[Path]:
    """The files of a corpus: ``path`` itself, or the files under the folder matching ``pattern``, sorted.

    Raises:
        CorpusError: the path does not exist, or the folder holds no matching non-empty file.
    """
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob(pattern) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            present = sorted(p.name for p in root.iterdir())[:10]
            raise CorpusError(f"{option} {str(root)!r}: no file matching {pattern!r} in this folder (it holds: {', '.join(present) or 'nothing'}); pass --pattern")
    else:
        raise CorpusError(f"{option} {str(root)!r}: no such file or folder")
    if all(f.stat().st_size == 0 for f in files):
        what = "the file is empty" if root.is_file() else f"its {len(files)} matching file(s) are all empty"
        raise CorpusError(f"{option} {str(root)!r}: {what}; there is no text to prepare")
    return files


def _decoded_blocks(file: Path, on_bytes: Callable[[int], None] | None, option: str) -> Iterator[str]:
    """The text of ``file``, a decoded block at a time; refuses bytes that are not UTF-8 and NUL characters."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            final = len(raw) < READ_BYTES
            nul = raw.find(b"\x00")  # valid UTF-8, but no text has it: the sign of a binary file
            if nul >= 0:
                raise CorpusError(f"{option} {str(file)!r}: not text (a NUL byte at offset {offset + nul:,}: a binary file); name text files (a folder's files are chosen by --pattern)")
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise CorpusError(
                    f"{option} {str(file)!r}: not UTF-8 text (byte at offset {at:,} is not valid UTF-8); "
                    "name text files (a folder's files are chosen by --pattern)"
                ) from None
            offset += len(raw)
            if on_bytes is not None:
                on_bytes(len(raw))
            if text:
                yield text
            if final:
                return


def iter_pieces(
    files: list[Path], documents: str = "file", on_bytes: Callable[[int], None] | None = None, option: str = "--input"
) -> Iterator[tuple[str, bool]]:
    """The documents of ``files`` as ``(text, ends_document)`` pieces, in file order.

    A document is the concatenation of its pieces up to and including the one whose ``ends_document`` is True
    (that piece's text may be empty). Files are always separate documents; empty documents are skipped.

    Args:
        files: the corpus files (see :func:`find_files`).
        documents: ``file``, ``blank_lines`` or ``lines`` (see the module docstring).
        on_bytes: called with the number of bytes of each block read (for a progress bar).
        option: the option that named the files, for error messages.

    Raises:
        CorpusError: a file is not UTF-8 text.
    """
    if documents not in DOCUMENT_MODES:
        raise CorpusError(f"--documents {documents!r}: expected one of {', '.join(DOCUMENT_MODES)}")
    for file in files:
        blocks = _decoded_blocks(file, on_bytes, option)
        if documents == "file":
            seen = False
            for text in blocks:
                seen = True
                yield text, False
            if seen:
                yield "", True
            continue
        in_doc, carry, mid_line = False, "", False  # mid_line: the start of the current line was handed on
        for text in blocks:
            lines = [line + "\n" for line in (carry + text).split("\n")]
            carry = lines.pop()[:-1]  # the text after the last newline: the start of a line still being read
            long_line = len(carry) > READ_BYTES and (mid_line or bool(carry.strip()))
            if long_line:  # hand the start of a very long line on now
                lines.append(carry)
                carry = ""
            for line in lines:
                ends_line = line.endswith("\n")
                if not mid_line and not line.strip():
                    if in_doc:
                        in_doc = False
                        yield "", True
                    continue
                in_doc, mid_line = True, not ends_line
                yield line, documents == "lines" and ends_line
                if documents == "lines" and ends_line:
                    in_doc = False
        if carry.strip() or (mid_line and carry):
            yield carry, True
        elif in_doc:
            yield "", True


def _cut_point(text: str, start: int) -> int:
    """The last index p >= start where ``text[p]`` is a space or newline and ``text[p + 1]`` a letter or digit, or -1.

    Cutting there (``text[:p]``, ``text[p:]``) leaves the byte-level pre-tokenizer's split unchanged: the
    whitespace run before p is one pre-token either way, and ``text[p]`` joins the word after it either way.
    """
    end = len(text) - 1
    while end > start:
        p = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
        if p < 0:
            return -1
        if text[p + 1].isalnum():
            return p
        end = p
    return -1


def split_units(pieces: Iterator[tuple[str, bool]], chunk_chars: int = 1 << 20) -> Iterator[tuple[str, bool]]:
    """Regroup pieces into units of at most about ``chunk_chars`` characters that are safe to encode on their own.

    Yields ``(text, ends_document)``: a whole document (when it is short) or a part of one cut where the
    pre-tokenizer splits anyway (see the module docstring), so encoding the units one by one and concatenating
    the ids gives the ids of the whole document.
    """
    parts: list[str] = []
    size = 0
    for text, ends in pieces:
        if text:
            parts.append(text)
            size += len(text)
        if ends:
            yield "".join(parts), True
            parts, size = [], 0
        elif size >= chunk_chars:
            buffer = "".join(parts)
            cut = _cut_point(buffer, max(1, len(buffer) - chunk_chars))
            if cut < 0 and len(buffer) >= 4 * chunk_chars:
                cut = len(buffer)  # no safe place in a long run: cut anyway (the only inexact case)
            if cut > 0:
                yield buffer[:cut], False
                buffer = buffer[cut:]
            parts, size = [buffer], len(buffer)
    if size:  # pieces that never ended their document (iter_pieces always ends them)
        yield "".join(parts), True
