"""The real `hydra-kit` CLI in subprocesses: components, fit, validate, resume after SIGKILL, recipe errors."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
import yaml
from conftest import HYDRA_KIT, REPO, quick_recipe, run_cli


def test_components_lists_first_party_with_distribution(tmp_path):
    result = run_cli("components", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("ssm", "sga", "moe", "workspace", "pkm", "router", "attention", "mlp"):
        assert f"\n│ {name} " in result.stdout or f"│ {name}" in result.stdout
    assert "hydra-kit" in result.stdout and "0.1.0" in result.stdout


def test_fit_writes_events_and_checkpoints_then_validate_accepts_them(tmp_path):
    recipe = quick_recipe(tmp_path)
    result = run_cli("fit", "--config", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quick" / "version_0"
    assert f"run directory: {run_dir}" in result.stdout.replace("\n", "")
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists() and list((run_dir / "checkpoints").glob("best-step=*.ckpt"))
    checkpoint = torch.load(last, weights_only=True)  # loads without executing pickled code
    assert checkpoint["global_step"] == 20
    result = run_cli("validate", "--config", str(recipe), "--ckpt_path", str(last), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/acc" in result.stdout


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = ["--trainer.max_steps", "30", "--last_checkpoint.every_n_train_steps", "4"]
    straight = quick_recipe(tmp_path, "straight")
    assert run_cli("fit", "--config", str(straight), *steps, cwd=tmp_path).returncode == 0
    killed = quick_recipe(tmp_path, "killed")
    proc = subprocess.Popen([*HYDRA_KIT, "fit", "--config", str(killed), *steps], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = torch.load(last, weights_only=True)["global_step"]
    assert interrupted_at < 30, "the run finished before it could be killed; the test proves nothing"
    resumed = run_cli("fit", "--config", str(killed), *steps, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 30
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=f"{key} differs after resume")


def _bad_recipe(tmp_path, mutate) -> str:
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    mutate(recipe)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["model"]["components"]["mlp"].update(component="mpl"), r"bad\.yaml: model\.components\.mlp\.component: unknown component 'mpl'.*available:.*mlp \(SwiGLUMLP\)"),
        (lambda r: r["model"]["components"]["mlp"].update(args={"hidden": 3}), r"bad\.yaml: model\.components\.mlp\.args: unknown argument\(s\) 'hidden'.*valid: hidden_mult, multiple_of"),
        (lambda r: r["model"]["components"]["mlp"].update(blocks=[7]), r"bad\.yaml: model\.components\.mlp\.blocks: block index 7 is out of range.*n_blocks=2"),
        (lambda r: r["model"].update(n_layers=3), r"bad\.yaml: model: unknown key\(s\) 'n_layers'; valid:.*n_blocks"),
        (lambda r: r["model"].update(d_model="wide"), r"bad\.yaml: model\.d_model: expected a positive integer, got 'wide'"),
        # Caught while LightningCLI builds the model or sets up the data; the file is still named.
        (lambda r: r["model"]["components"]["sga"]["args"].update(n_heads=3), r"bad\.yaml: model\.components\.sga\.args: building block 1 failed: sga: n_heads=3 must divide d_model=64"),
        (lambda r: r["model"].update(vocab_size=10), r"bad\.yaml: model\.vocab_size is 10 but the data uses 66 token ids; set model\.vocab_size >= 66"),
    ],
)
def test_recipe_errors_name_file_key_and_choices(tmp_path, mutate, expected):
    result = run_cli("fit", "--config", _bad_recipe(tmp_path, mutate), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    import re

    assert re.search(expected, " ".join(result.stderr.split())), result.stderr


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  d_model: 64\n   n_blocks: 2\n")
    result = run_cli("fit", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "broken.yaml: line 3" in " ".join(result.stderr.split())
