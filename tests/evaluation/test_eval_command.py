"""`hydra-kit eval` end to end on a tiny checkpoint and the local tasks of tests/evaluation/tasks, offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_kit.checkpoint import AtomicCheckpointIO
from hydra_kit.cli import main
from hydra_kit.commands.eval import OFFLINE_ENVIRONMENT
from hydra_kit.model import HydraLM

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'hydra-kit[eval]' (make setup installs it)")

TASKS = Path(__file__).resolve().parent / "tasks"
TASK_NAMES = ["hydra_tiny_choice", "hydra_tiny_perplexity", "hydra_tiny_generation"]


def hydra_kit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `hydra-kit ARGS` as a user would, with a Hugging Face cache of its own (nothing may be fetched)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HOME": str(cwd / "hf-home")}
    return subprocess.run([sys.executable, "-m", "hydra_kit.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained byte-level model (id 256 ends documents) saved as hydra-kit fit saves one."""
    torch.manual_seed(0)
    model = HydraLM(vocab_size=257, d_model=32, n_blocks=2)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    AtomicCheckpointIO().save_checkpoint({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_eval_prints_the_table_and_writes_json_with_metrics_in_range(checkpoint, tmp_path):
    out = tmp_path / "results" / "eval.json"
    run = hydra_kit(
        "eval", "--ckpt_path", str(checkpoint), "--tasks", ",".join(TASK_NAMES), "--include_path", str(TASKS),
        "--limit", "3", "--bootstrap_iters", "10", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for name in TASK_NAMES:
        assert name in run.stdout  # the harness's table
    results = json.loads(out.read_text())
    assert set(results["results"]) == set(TASK_NAMES)
    assert results["config"]["model"] == str(checkpoint) and results["config"]["tokenizer"] == "bytes"
    assert all(results["n-samples"][name]["effective"] == 3 for name in TASK_NAMES)
    metrics = {task: {k.split(",")[0]: v for k, v in values.items() if "," in k and "stderr" not in k} for task, values in results["results"].items()}
    assert metrics["hydra_tiny_choice"].keys() == {"acc", "acc_norm"}
    assert metrics["hydra_tiny_generation"].keys() == {"exact_match"}
    assert metrics["hydra_tiny_perplexity"].keys() == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for values in metrics.values():
        assert all(isinstance(v, float | int) and math.isfinite(v) for v in values.values()), values
    for name in ("acc", "acc_norm"):
        assert 0 <= metrics["hydra_tiny_choice"][name] <= 1
    assert 0 <= metrics["hydra_tiny_generation"]["exact_match"] <= 1
    ppl = metrics["hydra_tiny_perplexity"]
    assert ppl["byte_perplexity"] >= 1 and ppl["word_perplexity"] >= ppl["byte_perplexity"]
    # An untrained model is about uniform over its 257 ids: about 8 bits per byte.
    assert ppl["bits_per_byte"] == pytest.approx(math.log2(ppl["byte_perplexity"]))
    assert 7 < ppl["bits_per_byte"] < 9


@pytest.fixture
def offline_env(monkeypatch):
    """Undo the offline switches `hydra-kit eval` sets in this process when the test ends."""
    for key in OFFLINE_ENVIRONMENT:
        monkeypatch.setenv(key, os.environ.get(key, "0"))


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "hydra_tiny_choice", "--limit", "abc"], "--limit: expected a number of examples"),
        (["--tasks", "hydra_tiny_choice", "--limit", "-2"], "--limit: expected a number of examples"),
        (["--tasks", "hydra_tiny_choice", "--include_path", "no/such/folder"], "--include_path 'no/such/folder': no such folder"),
        (["--tasks", " , "], "--tasks: give at least one task name"),
        (["--tasks", "hydra_tiny_choice", "--bogus", "1"], "unrecognized arguments: --bogus"),
    ],
    ids=["limit", "negative-limit", "include-path", "no-tasks", "unknown-option"],
)
def test_bad_options_are_one_line(checkpoint, capsys, offline_env, args, message):
    try:
        code = main(["eval", "--ckpt_path", str(checkpoint), *args])
    except SystemExit as exc:  # argparse's own errors leave through sys.exit(2)
        code = exc.code
    assert code == 2
    assert message in error_line(capsys)


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys, offline_env):
    assert main(["eval", "--ckpt_path", str(tmp_path / "none.ckpt"), "--tasks", "hydra_tiny_choice", "--include_path", str(TASKS)]) == 2
    assert "does not exist" in error_line(capsys)


@pytest.mark.slow
def test_an_unknown_task_is_one_line_with_close_names(checkpoint, capsys, offline_env):
    assert main(["eval", "--ckpt_path", str(checkpoint), "--tasks", "hydra_tiny_choise", "--include_path", str(TASKS)]) == 2
    line = error_line(capsys)
    assert "unknown task(s) hydra_tiny_choise" in line and "close names: hydra_tiny_choice" in line


def write_bpe(folder: Path) -> Path:
    """A tiny byte-level BPE with <|endoftext|>, as hydra-kit prepare writes beside its shards."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is not installed: pip install 'hydra-kit[eval]'")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(["the cat sat on the mat"] * 10, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_the_tokenizer_of_the_training_shards_is_found_through_the_runs_config(tmp_path):
    from hydra_kit.commands.eval import _shard_tokenizer

    tokenizer = write_bpe(tmp_path / "shards")
    run = tmp_path / "runs" / "text-bpe" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  class_path: hydra_kit.data.ShardDataModule\n  init_args:\n    path: {tmp_path / 'shards'}\n")
    assert _shard_tokenizer(str(run / "checkpoints" / "last.ckpt"), {}) == str(tokenizer)
    assert _shard_tokenizer(str(tmp_path / "elsewhere.ckpt"), {}) is None
    assert _shard_tokenizer(str(tmp_path / "x.ckpt"), {"datamodule_hyper_parameters": {"path": str(tmp_path / "shards")}}) == str(tokenizer)


def test_a_large_vocabulary_without_its_tokenizer_is_refused_in_one_line(tmp_path, capsys, offline_env):
    torch.manual_seed(0)
    model = HydraLM(vocab_size=4096, d_model=32, n_blocks=1)
    path = tmp_path / "bpe.ckpt"
    AtomicCheckpointIO().save_checkpoint({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    assert main(["eval", "--ckpt_path", str(path), "--tasks", "hydra_tiny_choice", "--include_path", str(TASKS)]) == 2
    assert "has 4096 ids, more than bytes use" in error_line(capsys)
    tokenizer = write_bpe(tmp_path / "tok")
    # A tokenizer with more ids than the model is not its tokenizer.
    small = tmp_path / "small.ckpt"
    model = HydraLM(vocab_size=257, d_model=32, n_blocks=1)
    AtomicCheckpointIO().save_checkpoint({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, small)
    assert main(["eval", "--ckpt_path", str(small), "--tokenizer", str(tokenizer), "--tasks", "x", "--include_path", str(TASKS)]) == 2
    assert "ids but the model's vocabulary is 257" in error_line(capsys)
