"""What several test files share: the checkout's root, and running the real `hydra-kit` console script on a tiny recipe.

A plain module (tests import it by name, as they import ``fake_components``), so conftest.py holds only fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HYDRA_KIT = [sys.executable, "-m", "hydra_kit.cli"]

# Every mechanism, sized so that 40 tokens cross every internal boundary: SSM chunks of 8, an SGA window of 8
# that fills and slides with globals promoted from 4 chunks, workspace writes every 8 tokens.
EVERY_COMPONENT = {
    "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 8, "headdim": 8, "chunk_size": 8}},
    "sga": {"component": "sga", "blocks": [1], "args": {"n_heads": 2, "window": 8, "max_global": 6}},
    "moe": {"component": "moe", "blocks": "all", "args": {"n_experts": 4, "top_k": 2, "expert_hidden": 16}},
    "workspace": {"component": "workspace", "blocks": [0], "args": {"n_slots": 4, "chunk_size": 8}},
    "pkm": {"component": "pkm", "blocks": [2], "args": {"heads": 2, "n_keys": 8, "top_k": 4, "d_key": 16}},
    "router": {"component": "router", "blocks": "all"},
}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `hydra-kit ARGS` in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*HYDRA_KIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def quick_recipe(tmp_path: Path, name: str = "quick", **model_overrides) -> Path:
    """A recipe that trains in a few seconds: attention + MLP + router, MQAR with 4 pairs."""
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["model"].update(model_overrides)
    recipe["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp_path / "runs"), "name": name}
    recipe["trainer"]["enable_progress_bar"] = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def kill_once_written(proc: subprocess.Popen[bytes], path: Path, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (or it exits, or ``timeout`` seconds pass): a run killed mid-training."""
    import signal
    import time

    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
