"""The mamba-ssm SSD backend: selection messages (always), parity with ssd_chunked_scan (when mamba-ssm is here).

CI has no mamba-ssm (it is a GPU feature with its own install script), so there only the messages and the
argument checks run. The interpreter parity check runs when mamba-ssm is importable or when
HYDRA_KIT_MAMBA_SSM_PATH names a folder it was installed into, for instance on a CPU machine with
``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps --target DIR
mamba-ssm einops`` (about a minute; the check takes ~25 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_kit.ops.mamba_ssd import mamba_ssd_scan, unavailable_reason
from hydra_kit.ops.scan import ssd_chunked_scan

HERE = Path(__file__).resolve().parent
MAMBA_PATH = os.environ.get("HYDRA_KIT_MAMBA_SSM_PATH")


def inputs(b: int = 1, L: int = 12, H: int = 4, P: int = 8, G: int = 2, N: int = 16, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, L, H, P, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, generator=gen) - 1)
    A = -torch.rand(H, generator=gen) - 0.5
    B, C = torch.randn(b, L, G, N, generator=gen), torch.randn(b, L, G, N, generator=gen)
    s0 = torch.randn(b, H, P, N, generator=gen)
    return [t.to(device) for t in (x, dt, A, B, C)], s0.to(device)


def test_without_mamba_ssm_the_message_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # what an environment without mamba-ssm looks like
    reason = unavailable_reason()
    assert reason is not None and "mamba-ssm is not installed" in reason and "scripts/install-gpu.sh" in reason
    (x, dt, A, B, C), s0 = inputs()
    with pytest.raises(RuntimeError, match=r"mamba_ssd_scan cannot run: mamba-ssm is not installed.*install-gpu"):
        mamba_ssd_scan(x, dt, A, B, C, 8, s0)


def test_bad_shapes_are_named() -> None:
    (x, dt, A, B, C), s0 = inputs()
    with pytest.raises(ValueError, match=r"expected dt \(b, L, H\) = \(1, 12, 4\).*got dt \(1, 12, 3\)"):
        mamba_ssd_scan(x, dt[..., :3], A, B, C, 8)
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of the B/C groups \(3\)"):
        mamba_ssd_scan(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1), 8)
    with pytest.raises(ValueError, match=r"initial_state must be \(1, 4, 8, 16\), got \(1, 4, 8, 15\)"):
        mamba_ssd_scan(x, dt, A, B, C, 8, s0[..., :15])
    with pytest.raises(ValueError, match=r"chunk_size must be positive, got 0"):
        mamba_ssd_scan(x, dt, A, B, C, 0)


def test_empty_sequence_keeps_the_state() -> None:
    (x, dt, A, B, C), s0 = inputs(L=0)
    y, final = mamba_ssd_scan(x, dt, A, B, C, 8, s0)
    assert y.shape == (1, 0, 4, 8)
    assert torch.equal(final, s0)


def _mamba_reachable() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None or MAMBA_PATH is not None


@pytest.mark.slow
@pytest.mark.skipif(not _mamba_reachable(), reason="mamba-ssm not installed (see this file's docstring)")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_interpreter_parity_with_ssd_chunked_scan() -> None:
    """Forward and all six gradients (x, dt, A, B, C, initial state) against our scan, in a separate process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if MAMBA_PATH:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), MAMBA_PATH) if p)
    proc = subprocess.run(
        [sys.executable, str(HERE / "_mamba_interpreter_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "unavailable" not in report, report
    assert set(report) == {"y", "final_state", *(f"grad_{n}" for n in ("x", "dt", "A", "B", "C", "s0"))}
    for key, (err, scale, same_dtype) in report.items():
        assert same_dtype, key
        assert scale > 0.1, key  # the comparison compares something
        assert err <= 1e-5 * max(1.0, scale), (key, err, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_gpu_parity_with_ssd_chunked_scan() -> None:
    """Compiled kernels at a model-like shape: 2 x 1000 tokens (not a chunk multiple), 16 heads of 64, N = 64."""
    (x, dt, A, B, C), s0 = inputs(b=2, L=1000, H=16, P=64, G=1, N=64, device="cuda")
    for t in (x, dt, A, B, C, s0):
        t.requires_grad_()
    w = torch.randn_like(x)
    outs, grads = [], []
    for scan in (mamba_ssd_scan, ssd_chunked_scan):
        y, final = scan(x, dt, A, B, C, 256, s0)
        outs.append((y, final))
        grads.append(torch.autograd.grad((y * w).sum() + final.sum(), (x, dt, A, B, C, s0)))
    for got, ref in zip(outs[0] + grads[0], outs[1] + grads[1], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
