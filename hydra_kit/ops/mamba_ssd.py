"""The mamba-ssm package's fused Mamba-2 SSD scan behind the signature of our chunked scan (docs/design.md 3.3).

:func:`mamba_ssd_scan` takes and returns exactly what :func:`hydra_kit.ops.scan.ssd_chunked_scan` does, so
the SSM component can pick either per call. It calls ``mamba_chunk_scan_combined`` from
``mamba_ssm.ops.triton.ssd_combined`` (Dao & Gu 2024, arXiv 2405.21060): Triton kernels for the chunk
cumulative decay, the per-chunk states, the state passing across chunks and the output, forward and backward.

mamba-ssm is a GPU accelerator, never needed on CPU. It is not a pip extra: it is a source distribution that
must be built against the installed torch (``--no-build-isolation``) with build flags, which
``scripts/install-gpu.sh`` sets. It is imported on first use only; :func:`unavailable_reason` says, in words,
why it cannot run here.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["INSTALL_HINT", "mamba_ssd_scan", "unavailable_reason"]

INSTALL_HINT = "run scripts/install-gpu.sh on a CUDA machine (mamba-ssm needs build flags, so it is no pip extra)"
_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def _triton_interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), as triton itself reads it."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    return bool(knobs is not None and knobs.runtime.interpret)


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the mamba-ssm SSD kernels cannot run, in words, or None when they can.

    Args:
        device: the device the tensors live on; None asks whether a CUDA device is visible at all.
    """
    if importlib.util.find_spec("mamba_ssm") is None:
        return f"mamba-ssm is not installed; {INSTALL_HINT}"
    if importlib.util.find_spec("triton") is None:
        return f"mamba-ssm's SSD kernels are written in Triton, which is not installed; {INSTALL_HINT}"
    # Triton's CPU interpreter runs them on CPU tensors (slowly); only tests use it.
    if not _triton_interpreting():
        if device is None and not torch.cuda.is_available():
            return f"no CUDA GPU is visible (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        if device is not None and device.type != "cuda":
            return f"the tensors are on {device.type}, and mamba-ssm's kernels run on CUDA devices only"
    try:
        importlib.import_module(_MODULE)
    except Exception as err:  # mamba_ssm/__init__ imports its CUDA extension and more: any failure is possible
        return f"mamba-ssm is installed but {_MODULE} fails to import ({type(err).__name__}: {err}); {INSTALL_HINT}"
    return None


def _kernel() -> Callable[..., tuple[Tensor, Tensor]]:
    return importlib.import_module(_MODULE).mamba_chunk_scan_combined  # type: ignore[no-any-return]


def mamba_ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan by mamba-ssm: S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t (no D skip).

    Same contract as :func:`hydra_kit.ops.scan.ssd_chunked_scan`; differentiable in every tensor argument,
    the initial state included.

    Args:
        x: (b, L, H, P) inputs per head.
        dt: (b, L, H) positive step sizes (softplus and bias already applied).
        A: (H,) negative decay rates.
        B, C: (b, L, G, N) input and output projections; head h uses group h // (H / G).
        chunk_size: tokens per chunk; L need not be a multiple.
        initial_state: (b, H, P, N) state before the first token, or None for zeros.
        resets: (b, L) bool document starts, or None; passed to the kernels as ``seq_idx`` (the number of starts
            up to each token), whose id 0 the initial state belongs to, as in :func:`ssd_chunked_scan`.

    Returns:
        y: (b, L, H, P) in x's dtype; final_state: (b, H, P, N) in x's dtype.
    """
    b, seq_len, H, P = x.shape
    G, N = B.shape[-2:]
    if dt.shape != (b, seq_len, H) or A.shape != (H,) or B.shape != (b, seq_len, G, N) or C.shape != B.shape:
        raise ValueError(
            f"mamba_ssd_scan: expected dt (b, L, H) = {(b, seq_len, H)}, A ({H},), B and C (b, L, G, N); got dt "
            f"{tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if H % G:
        raise ValueError(f"mamba_ssd_scan: heads ({H}) must be a multiple of the B/C groups ({G})")
    if initial_state is not None and initial_state.shape != (b, H, P, N):
        raise ValueError(f"mamba_ssd_scan: initial_state must be {(b, H, P, N)}, got {tuple(initial_state.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"mamba_ssd_scan: chunk_size must be positive, got {chunk_size}")
    if resets is not None and resets.shape != (b, seq_len):
        raise ValueError(f"mamba_ssd_scan: resets must be (b, L) = {(b, seq_len)}, got {tuple(resets.shape)}")
    if seq_len == 0:  # nothing to scan; the kernels do not launch empty grids
        final = x.new_zeros(b, H, P, N) if initial_state is None else initial_state.to(x.dtype)
        return x.new_zeros(x.shape), final
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"mamba_ssd_scan cannot run: {reason}")
    # dt is already positive here (dt_softplus=False, no dt_bias, no clamp): the kernel only scans.
    seq_idx = None if resets is None else resets.cumsum(1, dtype=torch.int32)  # (b, L), contiguous
    y, final_state = _kernel()(
        x, dt, A, B, C, chunk_size, initial_states=initial_state, seq_idx=seq_idx, dt_softplus=False, return_final_states=True
    )
    # mamba-ssm keeps the final state in C's dtype; ssd_chunked_scan's contract is x's dtype.
    return y, final_state.to(x.dtype)
