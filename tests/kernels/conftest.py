"""Kernel tests run on CPU in triton's interpreter when no GPU is visible.

``@triton.jit`` picks compiled or interpreted when it runs, and our kernel modules run it on first launch, so
setting TRITON_INTERPRET here (before any test runs) is early enough. It is set only without a GPU: on a GPU
machine the same tests run the compiled kernels, and nothing else in the process gets interpreted. Without a
GPU nothing else in the test suite can run a Triton kernel, so the variable changes nothing outside this folder.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
