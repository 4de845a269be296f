"""Out-of-range values of the documented model, data, trainer and generate options: one line, exit code 2.

Each row is an argv and a piece of the expected message. The message must name the key or flag and the valid
range, arrive as the one ``error:`` line on stderr (besides Lightning's "Seed set to N" status line, printed
before the recipe's classes are built) and never as a traceback; nothing may run.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from support import HYDRA_KIT, quick_recipe

from hydra_kit.checkpoint import AtomicCheckpointIO
from hydra_kit.model import HydraLM


def _exit_code(argv: list[str]) -> int:
    """``hydra-kit ARGV`` in this process; the parser's own errors end in SystemExit."""
    from hydra_kit.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _error_line(err: str) -> str:
    """The one error line of stderr; fails on a traceback or on any other output."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not re.fullmatch(r"(INFO: )?Seed set to \d+", line.strip())]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def byte_ckpt(tmp_path):
    """A byte-level checkpoint (vocabulary 256) of a one-block model, as ``load_model`` reads it."""
    torch.manual_seed(0)
    model = HydraLM(vocab_size=256, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp", "blocks": "all"}})
    path = tmp_path / "byte.ckpt"
    AtomicCheckpointIO().save_checkpoint({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


FIT_CASES = [
    (["--model.lr", "-1"], "model.lr: expected a finite number > 0, got -1.0"),
    (["--model.lr", "0"], "model.lr: expected a finite number > 0, got 0.0"),
    (["--model.lr", "nan"], 'Parser key "model.lr": Expected a <class \'float\'>. Got value: nan'),  # jsonargparse's own check
    (["--model.weight_decay", "-0.1"], "model.weight_decay: expected a finite number >= 0, got -0.1"),
    (["--model.betas", "[0.9, 1.0]"], "model.betas[1]: expected a number in [0, 1), got 1.0"),
    (["--model.betas", "[-0.1, 0.95]"], "model.betas[0]: expected a number in [0, 1), got -0.1"),
    (["--model.warmup_steps", "-5"], "model.warmup_steps: expected an integer >= 0, got -5"),
    (["--model.min_lr_ratio", "1.5"], "model.min_lr_ratio: expected a number in [0, 1], got 1.5"),
    (["--model.init_std", "0"], "model.init_std: expected a finite number > 0, got 0.0"),
    (["--model.d_model", "0"], "--model.d_model: expected a positive integer, got 0"),
    (["--model.n_blocks", "-2"], "--model.n_blocks: expected a positive integer, got -2"),
    (["--data.init_args.batch_size", "0"], "data: batch_size (0), train_size (32768) and val_size (64) must be positive"),
    (["--data.init_args.val_size", "-1"], "val_size (-1)"),
    (["--data.init_args.task.init_args.num_pairs", "0"], "MQAR: num_pairs must lie in 1..num_keys (32), got 0"),
    (["--trainer.strategy", "ddp"], "--trainer.strategy ddp: Hydra's sparse components"),
    (["--trainer.strategy", "ddp_spawn"], "use --trainer.strategy ddp_find_unused_parameters_true"),
]


@pytest.mark.parametrize(("option", "expected"), FIT_CASES, ids=[" ".join(o) for o, _ in FIT_CASES])
def test_fit_option_out_of_range_is_one_line(tmp_path, capsys, lightning_logs_here, option, expected):
    assert _exit_code(["fit", "--config", str(quick_recipe(tmp_path)), *option]) == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.parametrize(("key", "value", "expected"), [("lr", -1.0, "model.lr: expected a finite number > 0"), ("min_lr_ratio", -0.5, "model.min_lr_ratio")])
def test_recipe_value_out_of_range_names_file_and_key(tmp_path, capsys, lightning_logs_here, key, value, expected):
    from hydra_kit.cli import main

    recipe = quick_recipe(tmp_path, **{key: value})
    assert main(["fit", "--config", str(recipe)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{recipe}: {expected}" in line, line


GENERATE_CASES = [
    (["--temperature", "nan"], "--temperature: expected a finite number >= 0 (0: greedy), got nan"),
    (["--temperature", "inf"], "--temperature: expected a finite number >= 0 (0: greedy), got inf"),
    (["--temperature", "-0.5"], "--temperature: expected a finite number >= 0 (0: greedy), got -0.5"),
    (["--top_k", "0"], "--top_k: expected an integer >= 1, got 0"),
    (["--top_k", "257"], "--top_k: expected an integer in 1..256 (the model's vocabulary), got 257"),
    (["--max_new_tokens", "-1"], "--max_new_tokens: expected an integer >= 0, got -1"),
    (["--seed", str(2**64)], "--seed: expected an integer in -2**63..2**64-1"),
]


@pytest.mark.parametrize(("option", "expected"), GENERATE_CASES, ids=[" ".join(o) for o, _ in GENERATE_CASES])
def test_generate_option_out_of_range_is_one_line(byte_ckpt, capsys, option, expected):
    from hydra_kit.cli import main

    assert main(["generate", "--ckpt_path", str(byte_ckpt), "--prompt", "hi", *option]) == 2
    assert expected in _error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_generate_into_a_closed_pipe_exits_quietly(byte_ckpt):
    # `hydra-kit generate ... | head -c 40`: the reader leaves long before the last token.
    proc = subprocess.Popen(
        [*HYDRA_KIT, "generate", "--ckpt_path", str(byte_ckpt), "--prompt-ids", "1", "2", "--max_new_tokens", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(40)) == 40
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == "", err



@pytest.mark.parametrize("command", ["generate", "validate"])
def test_directory_as_ckpt_path_is_named_a_directory(tmp_path, capsys, lightning_logs_here, command):
    folder = tmp_path / "runs-folder"
    folder.mkdir()
    extra = ["--prompt-ids", "1"] if command == "generate" else ["--config", str(quick_recipe(tmp_path))]
    assert _exit_code([command, "--ckpt_path", str(folder), *extra]) == 2
    assert f"checkpoint '{folder}' is a directory, not a checkpoint file" in _error_line(capsys.readouterr().err)


UNKNOWN_OPTION_CASES = {
    "fit": ["fit", "--config", "{recipe}"],
    "summary": ["summary", "--config", "{recipe}"],
    "generate": ["generate", "--ckpt_path", "{ckpt}", "--prompt", "hi"],
    "components": ["components"],
    "inspect": ["inspect", "--ckpt_path", "{ckpt}"],
    "bench": ["bench", "--recipes", "{recipe}"],
    "ablate": ["ablate", "--drop", "sga", "--config", "{recipe}", "--out", "{out}"],
    "experiment": ["experiment", "mqar"],
    "recipes": ["recipes"],
}


@pytest.mark.parametrize("command", sorted(UNKNOWN_OPTION_CASES))
def test_every_command_refuses_an_unknown_option_in_one_line(tmp_path, capsys, lightning_logs_here, byte_ckpt, command):
    files = {"recipe": str(quick_recipe(tmp_path)), "ckpt": str(byte_ckpt), "out": str(tmp_path / "out")}
    argv = [a.format(**files) for a in UNKNOWN_OPTION_CASES[command]]
    assert _exit_code([*argv, "--no-such-option", "1"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--no-such-option" in line and f"hydra-kit {command}" in line, line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # refused before anything ran


def test_a_missing_recipe_is_named_in_one_line(tmp_path, capsys):
    assert _exit_code(["fit", "--config", str(tmp_path / "nowhere.yaml")]) == 2
    assert f"{tmp_path / 'nowhere.yaml'}: recipe file not found" in _error_line(capsys.readouterr().err)
