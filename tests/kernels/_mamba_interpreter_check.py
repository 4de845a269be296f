"""Run mamba-ssm's SSD kernels on CPU in triton's interpreter and compare them with ssd_chunked_scan.

Run as a script, in its own process (tests/kernels/test_mamba_ssd.py does that): it installs process-wide
stand-ins for the three CUDA-only things mamba-ssm touches outside its kernels (ENVIRONMENT.md), plus one for
triton's autotuner, which benchmarks configurations through a GPU driver. Prints one JSON object: for y, the
final state and every gradient, the largest absolute difference and the largest reference magnitude.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"  # before triton defines any kernel

import torch

# 1. mamba_ssm/__init__ imports its Mamba-1 CUDA extension (and transformers) unguarded; the SSD kernels need
# neither. Register the package without running its __init__, so its submodules import from the real files.
_spec = importlib.util.find_spec("mamba_ssm")
if _spec is not None:
    sys.modules["mamba_ssm"] = importlib.util.module_from_spec(_spec)  # has __path__; __init__ never runs
# 2-3. Its Triton wrappers select the launching device and read the multiprocessor count.
torch.cuda.device = lambda index: contextlib.nullcontext()  # type: ignore[assignment,misc]
torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=4)  # type: ignore[assignment]
# 4. The autotuner times configurations on a GPU; take each kernel's first configuration instead.
from triton.runtime.autotuner import Autotuner  # noqa: E402

Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]  # type: ignore[method-assign]

from hydra_kit.ops.mamba_ssd import mamba_ssd_scan, unavailable_reason  # noqa: E402
from hydra_kit.ops.scan import ssd_chunked_scan  # noqa: E402


def main() -> None:
    reason = unavailable_reason(torch.device("cpu"))
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return
    gen = torch.Generator().manual_seed(0)
    # 4 heads in 2 groups of B/C, 20 tokens in chunks of 8: two full chunks and a tail of 4.
    b, L, H, P, G, N, chunk = 1, 20, 4, 8, 2, 16, 8
    x = torch.randn(b, L, H, P, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, generator=gen) - 1)
    A = -torch.rand(H, generator=gen) - 0.5
    B, C = torch.randn(b, L, G, N, generator=gen), torch.randn(b, L, G, N, generator=gen)
    s0 = torch.randn(b, H, P, N, generator=gen)
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C, s0)]
    w_y, w_s = torch.randn(b, L, H, P, generator=gen), torch.randn(b, H, P, N, generator=gen)
    report = {}
    results = {}
    for name, scan in (("mamba", mamba_ssd_scan), ("torch", ssd_chunked_scan)):
        y, final = scan(*inputs[:5], chunk, inputs[5])
        grads = torch.autograd.grad((y * w_y).sum() + (final * w_s).sum(), inputs)
        results[name] = {
            "y": y,
            "final_state": final,
            **{f"grad_{n}": g for n, g in zip("x dt A B C s0".split(), grads, strict=True)},
        }
    for key, ref in results["torch"].items():
        got = results["mamba"][key]
        report[key] = [(got - ref).abs().max().item(), ref.abs().max().item(), got.dtype == ref.dtype]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
