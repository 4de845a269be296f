"""scripts/wikitext-compare.py end to end in smoke mode: prepare, fit and validate both models per seed, the three files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

SCRIPT = REPO / "scripts" / "wikitext-compare.py"
SAMPLE = REPO / "data" / "wikitext-2-sample" / "valid-sample.txt"


def slices(folder: Path) -> tuple[Path, Path]:
    """Two small disjoint slices of the WikiText-2 sample, cut at line ends: a training text and a test text."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    valid, test = folder / "valid.txt", folder / "test.txt"
    valid.write_text("".join(lines[:150]), encoding="utf-8")
    test.write_text("".join(lines[150:220]), encoding="utf-8")
    return valid, test


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path: Path) -> None:
    valid, test = slices(tmp_path)
    out = tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), "--smoke", "--seeds", "0,1", "--valid", str(valid), "--test", str(test),
            "--out", str(out), "--work", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with (out / "wikitext.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["model"], r["seed"]) for r in rows) == [("hydra", "0"), ("hydra", "1"), ("transformer", "0"), ("transformer", "1")]
    for r in rows:
        assert int(r["steps"]) == 2
        assert 0 < float(r["loss"]) < 20 and float(r["ppl"]) > 1 and float(r["bpb"]) > 0 and float(r["tokens_per_s"]) > 0

    result = json.loads((out / "wikitext.json").read_text())
    assert result["settings"]["smoke"] is True
    params = result["settings"]["parameters"]
    assert abs(params["hydra"]["total"] - params["transformer"]["total"]) <= 0.05 * params["hydra"]["total"]
    loss = result["summary"]["differences"]["loss"]
    by = {(r["model"], r["seed"]): float(r["loss"]) for r in rows}
    assert loss["per_seed"] == pytest.approx([by["hydra", s] - by["transformer", s] for s in ("0", "1")])

    console = (out / "wikitext.console.txt").read_text()
    assert "paired difference hydra - transformer" in console
    assert "tokens/s ratio hydra / transformer" in console
    assert list((tmp_path / "work").rglob("last.ckpt"))  # checkpoints stay in --work, not in --out
    assert not list(out.rglob("*.ckpt")) and not list(out.rglob("events.out.*"))
