"""Shared test helpers: a tiny recipe written on the fly and a runner for the real `hydra-kit` console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.fixture
def cli():
    return run_cli


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written (pytest swaps it between tests and phases)."""

    def write(self, text: str) -> int:
        import sys

        return sys.stderr.write(text)

    def flush(self) -> None:
        import sys

        sys.stderr.flush()


@pytest.fixture
def lightning_logs_here(monkeypatch):
    """Lightning's log handlers write to this test's captured stderr, not to the closed stream of the test that
    first imported Lightning in this process."""
    import logging

    import lightning.pytorch  # noqa: F401  (creates the handlers)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", _CurrentStderr())
