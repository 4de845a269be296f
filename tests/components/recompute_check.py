"""Shared check for the ``recompute`` option of components: recomputing in backward must not change a gradient."""

from __future__ import annotations

from typing import Any

import torch

from hydra_kit.protocol import ComponentContext


def assert_recompute_keeps_gradients(cls: type, args: dict[str, Any], length: int = 19, scored: bool = False) -> None:
    """Gradients of the input, the router score (when ``scored``) and every parameter agree to 1e-12 (float64)."""
    torch.manual_seed(0)
    plain = cls(16, 0, **args, recompute=False).double()
    recomputed = cls(16, 0, **args, recompute=True).double()
    recomputed.load_state_dict(plain.state_dict())
    x, score = torch.randn(2, length, 16, dtype=torch.float64), torch.randn(2, length, dtype=torch.float64)
    grads = []
    for layer in (plain, recomputed):
        xi, si = x.clone().requires_grad_(True), score.clone().requires_grad_(True)
        out = layer(xi, ComponentContext(global_score=si) if scored else None)
        (out.update.square().sum() + sum(out.aux_losses.values(), torch.zeros((), dtype=x.dtype))).backward()
        grads.append([xi.grad, *([si.grad] if scored else []), *(p.grad for p in layer.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
