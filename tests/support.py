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
