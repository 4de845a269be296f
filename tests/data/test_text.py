"""TextDataModule: byte-level windows, split by position, resumable stream, clear errors; WikiText-2; a real fit."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from support import REPO, run_cli

from hydra_kit.data import TextDataError, TextDataModule

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"WikiText-2 not found at {WIKITEXT} (../shared/data/wikitext-2 from the repo root)")


@pytest.fixture
def corpus(tmp_path):
    """A 5,000-byte file whose bytes are a known pseudo-random sequence (all 256 values, not UTF-8)."""
    data = np.random.default_rng(0).integers(0, 256, size=5000, dtype=np.uint8)
    path = tmp_path / "corpus.bin"
    data.tofile(path)
    return path, data


def batches(loader):
    return [b for b in loader]


def test_windows_are_next_byte_pairs_and_split_by_position(corpus):
    path, data = corpus
    dm = TextDataModule(str(path), seq_len=32, batch_size=4, val_fraction=0.2, allow_binary=True)
    assert dm.vocab_size == 256 and dm.bytes_per_token == 1.0
    assert len(dm.train_data) == 4000 and len(dm.val_data) == 1000
    val = batches(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in val) == len(dm.val_starts()) == (1000 - 1) // 32
    for i, start in enumerate(dm.val_starts()):  # validation reads the last 20 percent, in order, no overlap
        b, j = val[i // 4], i % 4
        assert b["input_ids"][j].tolist() == data[4000 + start : 4000 + start + 32].tolist()
        assert b["targets"][j].tolist() == data[4000 + start + 1 : 4000 + start + 33].tolist()
    starts = dm.train_starts(0)
    assert (np.diff(np.sort(starts)) == 32).all() and starts.max() + 33 <= 4000  # training never reads a val byte
    for b in batches(dm.train_dataloader()):
        assert b["input_ids"].shape == b["targets"].shape == (4, 32) and b["input_ids"].dtype == torch.int64
        assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
    assert not np.array_equal(dm.train_starts(0), dm.train_starts(1))  # epochs differ in order and offset
    assert np.array_equal(dm.train_starts(1), TextDataModule(str(path), seq_len=32, batch_size=4, val_fraction=0.2, allow_binary=True).train_starts(1))


def test_resume_skips_exactly_the_consumed_batches(corpus):
    path, _ = corpus
    fresh = batches(TextDataModule(str(path), seq_len=16, batch_size=4, allow_binary=True).train_dataloader())
    resumed = TextDataModule(str(path), seq_len=16, batch_size=4, allow_binary=True)
    resumed.load_state_dict({"seed": 0, "num_bytes": len(resumed.train_data), "seq_len": 16, "epoch": 0, "batches_done": 3})
    loader = resumed.train_dataloader()
    after = batches(loader)
    assert len(after) == len(fresh) - 3
    # Lightning ends the resumed epoch when its restored batch count reaches len(loader): the whole epoch's.
    assert len(loader) == len(fresh)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(after, fresh[3:], strict=True))
    assert len(batches(resumed.train_dataloader())) == len(fresh)  # only the first epoch after the resume skips
    other = TextDataModule(str(path), seq_len=16, batch_size=4, allow_binary=True)  # a different corpus or window: start over
    other.load_state_dict({"seed": 0, "num_bytes": 123, "seq_len": 16, "epoch": 0, "batches_done": 3})
    assert len(batches(other.train_dataloader())) == len(fresh)


def test_folder_reads_matching_files_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"B" * 300)
    (tmp_path / "a.txt").write_bytes(b"A" * 300)
    (tmp_path / "notes.md").write_bytes(b"M" * 300)
    (tmp_path / ".hidden.txt").write_bytes(b"H" * 300)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_bytes("é".encode() * 150)  # UTF-8: two bytes per character
    dm = TextDataModule(str(tmp_path), seq_len=16, val_fraction=0.5)
    assert [p.name for p in dm.files] == ["a.txt", "b.txt", "c.txt"]
    assert bytes(dm.train_data[:300]) == b"A" * 300 and dm.val_data.tolist()[-2:] == [0xC3, 0xA9]
    assert [p.name for p in TextDataModule(str(tmp_path), seq_len=16, pattern="*.md").files] == ["notes.md"]


def test_val_path_holds_out_a_separate_file(tmp_path, corpus):
    path, _ = corpus
    held = tmp_path / "held.txt"
    held.write_bytes(b"held out text " * 40)
    dm = TextDataModule(str(path), seq_len=32, val_path=str(held), allow_binary=True)
    assert len(dm.train_data) == 5000 and bytes(dm.val_data) == held.read_bytes()


@pytest.mark.parametrize(
    ("files", "target", "kwargs", "match"),
    [
        ({}, "missing.txt", {}, r"missing\.txt.*no such file or folder"),
        ({"empty.txt": b""}, "empty.txt", {}, r"empty\.txt.*empty"),
        ({"x.md": b"text"}, ".", {}, r"no file matching '\*\.txt'.*x\.md"),
        ({"short.txt": b"a short text"}, "short.txt", {"seq_len": 64}, r"short\.txt.*shorter than one window of seq_len \+ 1 = 65"),
        ({"ok.txt": b"x" * 1000}, "ok.txt", {"val_fraction": 1.0}, "val_fraction"),
    ],
    ids=["missing", "empty", "no-match", "too-short", "bad-fraction"],
)
def test_bad_input_names_the_path(tmp_path, files, target, kwargs, match):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    dm = TextDataModule(str(tmp_path / target), **kwargs)  # the constructor only records; setup (or any accessor) checks
    with pytest.raises(TextDataError, match=match):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("files", "val_target", "match"),
    [
        ({}, "missing.txt", r"data\.val_path '.*missing\.txt': no such file or folder; pass --data\.init_args\.val_path"),
        ({"empty.txt": b""}, "empty.txt", r"data\.val_path '.*empty\.txt': the file is empty; there is no text to validate on"),
        ({"short.txt": b"tiny"}, "short.txt", r"data\.val_path '.*short\.txt': 4 validation bytes, shorter than one window"),
    ],
    ids=["missing", "empty", "too-short"],
)
def test_bad_val_path_is_named_val_path(tmp_path, files, val_target, match):
    (tmp_path / "train.txt").write_text("x" * 1000)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    dm = TextDataModule(str(tmp_path / "train.txt"), seq_len=16, val_path=str(tmp_path / val_target))
    with pytest.raises(TextDataError, match=match):
        dm.setup("fit")


def test_too_few_windows_for_a_batch_is_explained(tmp_path):
    (tmp_path / "t.txt").write_text("y" * 1000)
    dm = TextDataModule(str(tmp_path / "t.txt"), seq_len=64, batch_size=16, val_fraction=0.5)
    with pytest.raises(TextDataError, match="cannot fill one batch"):
        dm.train_dataloader()


@needs_wikitext
def test_wikitext2_folder_and_held_out_test_split():
    dm = TextDataModule(str(WIKITEXT), seq_len=256)
    assert [p.name for p in dm.files] == ["test.txt", "valid.txt"]  # the README is not text data
    assert len(dm.train_data) + len(dm.val_data) == sum(p.stat().st_size for p in dm.files)
    dm = TextDataModule(str(WIKITEXT / "valid.txt"), seq_len=256, val_path=str(WIKITEXT / "test.txt"))
    assert len(dm.train_data) == (WIKITEXT / "valid.txt").stat().st_size
    first = next(iter(dm.val_dataloader()))
    assert bytes(first["input_ids"][0].numpy().astype(np.uint8)) == (WIKITEXT / "test.txt").read_bytes()[:256]


@pytest.mark.slow
def test_cli_fit_on_text_logs_bits_per_byte_and_perplexity(tmp_path):
    text = tmp_path / "text.txt"  # real text that exists in every checkout: the project's own sources
    text.write_bytes(b"".join(p.read_bytes() for p in sorted((REPO / "hydra_kit").glob("*.py"))))
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["model"]["vocab_size"] = 256
    recipe["data"] = {"class_path": "hydra_kit.data.TextDataModule", "init_args": {"path": str(text), "seq_len": 32, "batch_size": 4}}
    recipe["trainer"].update(max_steps=4, val_check_interval=4, limit_val_batches=3, enable_progress_bar=False)
    recipe["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp_path / "runs"), "name": "text"}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("fit", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join((result.stdout + result.stderr).split())
    values = {k: float(v) for k, v in re.findall(r"val/(\w+) = ([0-9.]+)", out)}
    assert {"bpb", "ppl", "loss"} <= set(values), out[-2000:]
    assert values["bpb"] == pytest.approx(values["loss"] / math.log(2), rel=1e-3)
    assert values["ppl"] == pytest.approx(math.exp(values["loss"]), rel=1e-3)
    assert 0 < values["bpb"] < 8.5  # a byte needs at most 8 bits; a few steps already beat uniform
    last = tmp_path / "runs" / "text" / "version_0" / "checkpoints" / "last.ckpt"
    stream = torch.load(last, weights_only=True)["TextDataModule"]  # the stream position a resume starts from
    assert stream["batches_done"] == 4 and stream["num_bytes"] == len(TextDataModule(str(text), seq_len=32).train_data)


@pytest.mark.slow
def test_cli_reports_a_missing_text_path_in_one_line(tmp_path):
    result = run_cli("fit", "--config", str(REPO / "recipes" / "text.yaml"), "--data.init_args.path", str(tmp_path / "nope.txt"), cwd=tmp_path)
    assert result.returncode != 0
    err = " ".join(result.stderr.split())  # rich wraps long lines
    assert "nope.txt" in err and "no such file or folder" in err
    assert "Traceback" not in err


def test_binary_file_is_refused_naming_the_offset(tmp_path):
    binary = tmp_path / "program.bin"
    binary.write_bytes(b"#!text at first\n" + bytes(range(256)) * 20)
    with pytest.raises(TextDataError, match=r"program\.bin'.*not UTF-8 text \(byte 0x80 at offset 144 is not valid UTF-8\).*allow_binary"):
        TextDataModule(str(binary), seq_len=16).setup("fit")
    (tmp_path / "notes.txt").write_bytes(b"\xff" * 100)  # in a folder, the bad file is named
    with pytest.raises(TextDataError, match=r"notes\.txt'.*offset 0 "):
        TextDataModule(str(tmp_path), seq_len=16).setup("fit")
    assert len(TextDataModule(str(binary), seq_len=16, allow_binary=True).train_data) > 0  # opting in reads any bytes


def test_utf8_check_reads_characters_cut_by_its_chunks():
    from pathlib import Path

    from hydra_kit.data.text import _check_utf8

    text = np.frombuffer(("aé€😀" * 50).encode(), dtype=np.uint8)
    for chunk in (1, 2, 3, 5, 7):  # every way of cutting a 2-, 3- and 4-byte character
        _check_utf8(Path("t.txt"), text, chunk=chunk)
    with pytest.raises(TextDataError, match=r"byte 0xf0 at offset 496 "):  # a character cut off at the end of the file
        _check_utf8(Path("t.txt"), text[:-1], chunk=5)


def test_cli_refuses_a_binary_file_in_one_line(tmp_path, capsys, monkeypatch):
    from hydra_kit.cli import main

    monkeypatch.chdir(tmp_path)
    binary = tmp_path / "model.ckpt"
    binary.write_bytes(bytes(range(256)) * 100)
    assert main(["fit", "--config", str(REPO / "recipes" / "text.yaml"), "--data.init_args.path", str(binary), "--trainer.enable_progress_bar", "false"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.ckpt" in err and "not UTF-8 text" in err and "Traceback" not in err


SAMPLE = REPO / "data" / "wikitext-2-sample"


def test_text_recipe_defaults_to_the_shipped_wikitext_sample_with_its_attribution():
    recipe = yaml.safe_load((REPO / "recipes" / "text.yaml").read_text())
    path = recipe["data"]["init_args"]["path"]
    assert (REPO / path).resolve().parent == SAMPLE.resolve() and not path.startswith("..")  # inside the repository
    size = (REPO / path).stat().st_size
    assert 200_000 <= size <= 500_000
    (REPO / path).read_bytes().decode("utf-8")
    notice = " ".join((SAMPLE / "README.md").read_text().split())
    assert "CC BY-SA 3.0" in notice and "Merity" in notice and "Pointer Sentinel Mixture Models" in notice
    if WIKITEXT.is_dir():  # the sample is the start of the validation split, unmodified
        assert (WIKITEXT / "valid.txt").read_bytes()[:size] == (REPO / path).read_bytes()


@pytest.mark.slow
def test_text_recipe_runs_from_any_directory_and_a_short_run_still_validates(tmp_path):
    # No --data.init_args.path: the recipe's relative sample path is found from outside the checkout. The recipe
    # validates every 200 steps; a 2-step run must still end with a validation of its final weights.
    result = run_cli(
        "fit", "--config", str(REPO / "recipes" / "text.yaml"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
        "--data.init_args.batch_size", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join(result.stdout.split())
    assert re.search(r"final validation \(step 2\): val/acc = [0-9.]+, val/bpb = [0-9.]+", out), out[-2000:]
    assert "last.ckpt" in out.split("checkpoints:")[-1]


def test_a_relative_data_path_missing_here_is_the_shipped_sample(tmp_path, monkeypatch):
    # From a folder without data/, recipes/text.yaml's default names the sample shipped as hydra_kit.sample_data
    # (the checkout's data/ folder, or its copy inside an installed wheel); other missing paths stay errors.
    from hydra_kit.package_data import package_folder

    monkeypatch.chdir(tmp_path)
    module = TextDataModule("data/wikitext-2-sample/valid-sample.txt", seq_len=64, batch_size=2)
    assert module.files == [package_folder("hydra_kit.sample_data") / "wikitext-2-sample" / "valid-sample.txt"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wikitext-2-sample").mkdir()
    (tmp_path / "data" / "wikitext-2-sample" / "valid-sample.txt").write_text("a local file wins over the sample " * 10)
    assert TextDataModule("data/wikitext-2-sample/valid-sample.txt", seq_len=8, batch_size=2).files == [Path("data/wikitext-2-sample/valid-sample.txt")]
    with pytest.raises(TextDataError, match="no such file or folder"):
        TextDataModule("data/missing.txt").load()
