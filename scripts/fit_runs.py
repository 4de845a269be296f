"""What the comparison scripts share: run ``hydra-kit`` as a subprocess, read a run's TensorBoard scalars, write
the report files.

Imported by ``scripts/wikitext-compare.py`` and ``scripts/skip-quality.py`` (a script's folder is first on
``sys.path``, so ``import fit_runs`` finds this file).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def hydra_kit(*args: str) -> list[str]:
    """The command line of ``hydra-kit ARGS`` in this interpreter (the environment the script runs in)."""
    return [sys.executable, "-c", "import sys; from hydra_kit.cli import main; sys.exit(main())", *args]


def run(argv: list[str], log: Path, threads: int) -> float:
    """Run ``argv`` with its output in ``log``; the wall seconds it took. Exits naming the log when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise SystemExit(f"{' '.join(argv[3:6])} ... failed (exit {code}); log {log}:\n{tail}")
    return seconds


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``: tag -> [(step, wall time, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def write_report(out: Path, stem: str, rows: list[dict[str, Any]], settings: dict[str, Any], summary: Any, text: str) -> None:
    """Write ``<stem>.csv`` (a row per run; columns in order of first appearance), ``<stem>.json`` (settings, runs,
    summary) and ``<stem>.console.txt`` (``text``) into ``out``, and print ``text``."""
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "runs": rows, "summary": summary}, indent=1) + "\n")
    (out / f"{stem}.console.txt").write_text(text)
    print(text, end="")

