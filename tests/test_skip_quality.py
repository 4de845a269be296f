"""scripts/skip-quality.py end to end in smoke mode: a recipe dense and skipping, fit and validate, the paired report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO

SCRIPT = REPO / "scripts" / "skip-quality.py"


@pytest.mark.slow
def test_smoke_run_compares_the_skipping_model_with_the_dense_one(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [sys.executable, str(SCRIPT), "--smoke", "--recipes", "full", "--seeds", "0", "--out", str(out), "--work", str(work)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    router = yaml.safe_load((work / "recipes" / "full-skip.yaml").read_text())["model"]["components"]["router"]["args"]
    assert router == {"gate_threshold": 0.5, "skip_in_training": True, "explore": 0.1, "budget_weight": 1.0, "target_usage": 0.5}
    with (out / "skip_quality.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense", "skip"}
    assert not rows["dense"]["kept_moe"]  # no threshold: every token computed, nothing reported
    assert 0 < float(rows["skip"]["kept_moe"]) < 1  # the skipping model validated with its threshold in force
    summary = json.loads((out / "skip_quality.json").read_text())["summary"]["full"]
    expected = float(rows["skip"]["val_loss"]) / float(rows["dense"]["val_loss"]) - 1
    assert summary["relative_difference"] == pytest.approx([expected])
    assert "within 1% in" in (out / "skip_quality.console.txt").read_text()
    # Run again: the finished runs are reused, not trained again.
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reused from") == 2, again.stdout[-2000:] + again.stderr[-2000:]
    # A finished row of another recipe text (or another commit) is never reported as this run's.
    row_file = work / "runs" / "full-skip-seed0.row.json"
    row = json.loads(row_file.read_text())
    assert set(row) >= {"recipe_sha256", "code"}
    row_file.write_text(json.dumps({**row, "recipe_sha256": "0" * 64}))
    stale = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert stale.returncode != 0 and "a finished run of other recipe_sha256" in stale.stderr and "Traceback" not in stale.stderr, stale.stderr[-2000:]


def test_a_recipe_without_a_router_is_refused_in_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--recipes", "transformer", "--seeds", "0", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "has no router" in done.stderr and "Traceback" not in done.stderr
