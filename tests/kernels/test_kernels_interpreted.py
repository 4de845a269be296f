"""Runs the Triton kernel parity tests on CPU, in a fresh process under triton's interpreter.

TRITON_INTERPRET=1 only takes effect if it is set before triton is imported (``@triton.jit`` picks compiled or
interpreted when it runs, for triton's own ``tl.max`` / ``tl.argmax`` too), and this test process has long
imported triton (lightning does). A child pytest with the variable set from its start runs them instead, so
nothing in this process is switched to the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FILES = ["test_pkm_topk.py"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests run compiled, in this process")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted: they run in this process")
def test_kernel_parity_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(HERE / f) for f in FILES)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Only the GPU-only tests (two) may skip there: a child that silently skipped everything would pass otherwise.
    counts = re.fullmatch(r"(\d+) passed(?:, (\d+) skipped)? in .*", summary)
    assert counts is not None and int(counts[1]) >= 10 and int(counts[2] or 0) <= 2, summary
