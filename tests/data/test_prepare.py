"""hydra-kit prepare: BPE and byte tokenizers, token shards with end-of-document ids, the split, bad input in one line."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest

from hydra_kit.commands.prepare import main
from hydra_kit.data.corpus import CorpusError, iter_pieces, split_units
from hydra_kit.data.prepare import SplitPlan, prepare
from hydra_kit.data.tokenizer import EOS_TOKEN, TokenizerError, load_encoder
from hydra_kit.recipe import RecipeError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "wikitext-2-sample" / "valid-sample.txt"  # CC BY-SA 3.0, see its README.md

pytest.importorskip("tokenizers")


def paragraphs(n: int, start: int = 0) -> list[str]:
    """``n`` paragraphs of real text (WikiText-2 sample), each ending in a newline."""
    blocks = [b.strip() + "\n" for b in SAMPLE.read_text(encoding="utf-8").split("\n \n") if len(b.strip()) > 200]
    return blocks[start : start + n]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder of 12 text files (one paragraph each), plus a hidden file and a non-matching file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = paragraphs(12)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read\n")
    (folder / "notes.md").write_text("not matched\n")
    return folder, docs


def read_split(out: Path, meta: dict, split: str) -> np.ndarray:
    return np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]).astype(np.int64)


def documents_of(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    assert ids[-1] == eos, "every document ends with the end-of-document id"
    cuts = np.flatnonzero(ids == eos)
    return [ids[a + 1 : b] for a, b in zip([-1, *cuts[:-1]], cuts, strict=True)]


def test_bytes_shards_hold_every_document_once_each_ended_by_eos(corpus, tmp_path):
    folder, docs = corpus
    out = tmp_path / "out"
    meta = prepare(folder, out, tokenizer="bytes", val_fraction=0.25, seed=3)
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"], meta["tokenizer"]["kind"]) == (257, 256, "uint16", "bytes")
    assert json.loads((out / "meta.json").read_text()) == meta and not (out / "tokenizer.json").exists()
    assert len(meta["corpus"]["files"]) == 12  # the hidden file and notes.md are not read
    got = {split: [bytes(d.astype(np.uint8)).decode() for d in documents_of(read_split(out, meta, split), 256)] for split in ("train", "val")}
    assert sorted(got["train"] + got["val"]) == sorted(docs)  # whole documents, each in exactly one split
    assert len(got["val"]) == 3 and meta["splits"]["val"]["documents"] == 3  # 12 x 0.25, a systematic sample
    assert got["train"] == [d for d in docs if d in got["train"]]  # corpus order kept
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["bytes"] == sum(len(d.encode()) for d in got[split]) and info["tokens"] == info["bytes"] + info["documents"]
    again = prepare(folder, tmp_path / "again", tokenizer="bytes", val_fraction=0.25, seed=3)
    assert again["splits"] == meta["splits"]  # deterministic from the seed
    other = prepare(folder, tmp_path / "other", tokenizer="bytes", val_fraction=0.25, seed=4)
    assert other["splits"]["val"]["documents"] == 3


def test_split_plan_holds_out_floor_or_ceil_of_n_f_in_any_run():
    plan = SplitPlan(0.1, seed=0)
    flags = [plan.is_val(i) for i in range(1000)]
    for start in range(0, 900, 37):
        assert sum(flags[start : start + 50]) == 5 and sum(flags[start : start + 15]) in (1, 2)
    assert flags != [SplitPlan(0.1, seed=1).is_val(i) for i in range(1000)]  # the seed moves the sample


def test_bpe_tokenizer_is_saved_round_trips_and_chunking_changes_no_id(corpus, tmp_path):
    folder, docs = corpus
    whole = prepare(folder, tmp_path / "whole", vocab_size=400, val_fraction=0.25)
    pieces = prepare(folder, tmp_path / "pieces", vocab_size=400, val_fraction=0.25, chunk_chars=64)  # documents cut in many units
    assert whole["tokenizer"]["sha256"] == pieces["tokenizer"]["sha256"]  # training saw the same words
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "whole", whole, split), read_split(tmp_path / "pieces", pieces, split))
    assert whole["vocab_size"] == 400 and whole["eos_id"] == 0 and whole["tokenizer"]["file"] == "tokenizer.json"
    encoder = load_encoder(str(tmp_path / "whole" / "tokenizer.json"))
    decoded = [encoder.tokenizer.decode(d.tolist()) for d in documents_of(read_split(tmp_path / "whole", whole, "train"), 0)]
    assert decoded and all(d in docs for d in decoded)
    assert whole["splits"]["train"]["tokens"] < whole["splits"]["train"]["bytes"] / 1.5  # merges compress the text


def test_a_saved_tokenizer_encodes_new_text_with_the_same_ids(corpus, tmp_path):
    folder, _ = corpus
    first = prepare(folder, tmp_path / "a", vocab_size=300, val_fraction=0.25)
    again = prepare(folder, tmp_path / "b", tokenizer=str(tmp_path / "a" / "tokenizer.json"), val_fraction=0.25)
    assert again["tokenizer"]["kind"] == "file" and again["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    assert np.array_equal(read_split(tmp_path / "a", first, "train"), read_split(tmp_path / "b", again, "train"))


def test_val_input_holds_out_a_separate_corpus(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("".join(paragraphs(4)), encoding="utf-8")
    val.write_text("".join(paragraphs(2, start=10)), encoding="utf-8")
    meta = prepare(train, tmp_path / "out", tokenizer="bytes", val_input=val)
    assert meta["splits"]["train"]["bytes"] == train.stat().st_size and meta["splits"]["val"]["bytes"] == val.stat().st_size
    assert meta["val_fraction"] is None and meta["corpus"]["val_files"] == [str(val)]


def test_document_modes_file_blank_lines_and_lines(tmp_path):
    text = "first line\nsecond line\n\n  \nnext block\n\n\nlast\n"
    (tmp_path / "c.txt").write_text(text)
    units = lambda mode: list(split_units(iter_pieces([tmp_path / "c.txt"], mode)))  # noqa: E731
    assert units("file") == [(text, True)]
    assert units("blank_lines") == [("first line\nsecond line\n", True), ("next block\n", True), ("last\n", True)]
    assert units("lines") == [("first line\n", True), ("second line\n", True), ("next block\n", True), ("last\n", True)]


def test_an_eos_string_inside_a_document_is_text_not_a_boundary(tmp_path):
    (tmp_path / "a.txt").write_text(f"a document that mentions {EOS_TOKEN} in passing\n" * 20)
    (tmp_path / "b.txt").write_text("another document, long enough to train on\n" * 20)
    meta = prepare(tmp_path, tmp_path / "out", vocab_size=300, val_fraction=0.5)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 2


def test_command_main_prepares_and_prints_how_to_train(corpus, tmp_path, capsys):
    folder, _ = corpus
    out = tmp_path / "out"
    assert main(["--input", str(folder), "--tokenizer", "bpe", "--vocab_size", "300", "--out", str(out), "--val_fraction", "0.2", "--seed", "1"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "300 ids" in printed and f"--data.init_args.path {out}" in printed
    assert {p.name for p in out.iterdir()} == {"meta.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"}
    with pytest.raises(RecipeError, match=r"already holds a prepared corpus .* --overwrite"):
        main(["--input", str(folder), "--vocab_size", "300", "--out", str(out), "--quiet"])
    assert main(["--input", str(folder), "--vocab_size", "300", "--out", str(out), "--quiet", "--overwrite"]) == 0


def test_shards_roll_over_at_shard_tokens(corpus, tmp_path):
    folder, _ = corpus
    meta = prepare(folder, tmp_path / "out", tokenizer="bytes", shard_tokens=1000, val_fraction=0.25)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    assert sum(s["documents"] for s in shards) == 9


# ---------------------------------------------------------------- bad input: one line each
def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_binary_corpus_is_refused_naming_the_file_and_offset(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"text at first " + bytes(range(256)))
    with pytest.raises(CorpusError) as exc:
        prepare(tmp_path / "model.bin", tmp_path / "out", tokenizer="bytes")
    assert "model.bin" in one_line(exc) and "not text" in one_line(exc) and "offset 14" in one_line(exc)
    assert not list((tmp_path / "out").glob("*.bin"))  # nothing half-written is left
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1.txt.*not UTF-8 text \(byte at offset 3"):
        prepare(tmp_path / "latin1.txt", tmp_path / "out", tokenizer="bytes")


def test_empty_folder_and_empty_files_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError) as exc:
        prepare(tmp_path / "empty", tmp_path / "out", tokenizer="bytes")
    assert "no file matching '*.txt'" in one_line(exc) and "it holds: nothing" in one_line(exc)
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(CorpusError, match="all empty"):
        prepare(tmp_path / "empty", tmp_path / "out", tokenizer="bytes")
    with pytest.raises(CorpusError, match="no such file or folder"):
        prepare(tmp_path / "nope", tmp_path / "out", tokenizer="bytes")


def test_vocab_size_too_small_for_the_byte_alphabet(corpus, tmp_path):
    folder, _ = corpus
    with pytest.raises(TokenizerError) as exc:
        prepare(folder, tmp_path / "out", vocab_size=256)
    assert "--vocab_size 256 is too small" in one_line(exc) and "at least 257" in one_line(exc)
    with pytest.raises(TokenizerError, match="needs --vocab_size"):
        prepare(folder, tmp_path / "out")
    with pytest.raises(RecipeError, match="fixed vocabulary of 257"):
        prepare(folder, tmp_path / "out", tokenizer="bytes", vocab_size=4096)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_split_without_documents_is_explained(tmp_path):
    (tmp_path / "one.txt").write_text("a single file is a single document\n")
    with pytest.raises(RecipeError) as exc:
        prepare(tmp_path / "one.txt", tmp_path / "out", tokenizer="bytes", val_fraction=0.1)
    assert "val split got no document" in one_line(exc) and "--val_input" in one_line(exc)
    assert not list((tmp_path / "out").glob("*.bin"))


def test_an_empty_split_is_found_before_the_bpe_is_trained_and_the_old_corpus_is_kept(tmp_path, monkeypatch):
    import hydra_kit.data.prepare as prepare_module

    (tmp_path / "one.txt").write_text("a single file is a single document\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.bin").write_bytes(b"an earlier corpus")
    monkeypatch.setattr(prepare_module, "train_bpe", lambda *a, **k: pytest.fail("the BPE was trained for a corpus that cannot split"))
    with pytest.raises(RecipeError, match="val split got no document"):
        prepare(tmp_path / "one.txt", out, vocab_size=300, val_fraction=0.1, overwrite=True)
    assert (out / "train-00000.bin").read_bytes() == b"an earlier corpus"
    with pytest.raises(RecipeError, match=r"--val_input: the val split got no document"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "blank.txt").write_text("\n\n\n")  # blank lines only: no document
        prepare(tmp_path / "one.txt", out, vocab_size=300, val_input=tmp_path / "empty", documents="blank_lines", overwrite=True)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3, 0.5, 0.9])
def test_documents_needed_is_where_both_splits_first_have_one(fraction):
    plan = SplitPlan(fraction, seed=3)
    needed = plan.documents_needed()
    splits = [plan.is_val(i) for i in range(needed)]
    assert set(splits) == {True, False} and len(set(splits[:-1])) == 1


def test_bad_options_are_one_line(tmp_path):
    with pytest.raises(RecipeError) as exc:
        main(["--input", "x", "--out", str(tmp_path), "--bogus"])
    assert "unrecognized arguments: --bogus" in one_line(exc)
    with pytest.raises(RecipeError, match=r"--tokenizer 'nope\.json': expected bpe, bytes, or a tokenizer\.json"):
        main(["--input", str(SAMPLE), "--out", str(tmp_path / "o"), "--tokenizer", "nope.json"])
    with pytest.raises(RecipeError, match="strictly between 0 and 1"):
        main(["--input", str(SAMPLE), "--out", str(tmp_path / "o"), "--tokenizer", "bytes", "--val_fraction", "1.5"])


def test_missing_tokenizers_package_names_the_extra(corpus, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(TokenizerError) as exc:
        prepare(corpus[0], tmp_path / "out", vocab_size=300)
    assert "pip install 'hydra-kit[text]'" in one_line(exc)


def test_long_lines_and_runs_without_spaces_are_handed_on_in_bounded_pieces(tmp_path):
    from hydra_kit.data.corpus import READ_BYTES

    long_line = "word " * (READ_BYTES // 4)  # longer than one read: handed on before its newline arrives
    (tmp_path / "c.txt").write_text(f"{long_line}\n   \nshort block\n")
    units = list(split_units(iter_pieces([tmp_path / "c.txt"], "blank_lines"), chunk_chars=1 << 16))
    assert "".join(t for t, _ in units) == f"{long_line}\nshort block\n"
    assert [ends for _, ends in units].count(True) == 2 and max(len(t) for t, _ in units) <= 2 * READ_BYTES
    nospace = "x" * 300_000
    units = list(split_units(iter([(nospace, False), ("", True)]), chunk_chars=50_000))
    assert "".join(t for t, _ in units) == nospace and len(units) == 2  # cut where it stands after 4 x chunk_chars
