"""Per-block diagnostics in the training logs every N steps: gates, LayerScale, update and gradient norms.

The model's logged ``stats/<instance>.<stat>`` are averages over the blocks holding an instance, logged every
step. This callback logs, on every ``every_n_steps``-th optimizer step only, the same things per block and more,
under ``diag/block<i>.<instance>/<stat>``:

* ``gate_mean`` (and a ``gate`` histogram): the router's gates r of a gated instance;
* ``layerscale``: its LayerScale g;
* ``update_rel_norm``: ||g * r * update|| / ||x||, how much it writes relative to the residual stream x;
* ``grad_norm``: the L2 norm of the gradient of its parameters (before clipping), the router's too;
* the component's own statistics, including those it computes only when asked (``context.diagnostics``):
  SGA ``global_attn_share``, workspace ``read_entropy`` and ``slot_usage``, PKM ``usage_entropy``, MoE
  ``load_e<i>`` and ``router_entropy``, the router's ``gate_<instance>``.

The other steps cost nothing: the model computes the diagnostics only in the forward of a step the callback
asked for (:meth:`hydra_kit.model.HydraLM.request_diagnostics`). Scalars go to every logger at the step's
``global_step``; histograms to loggers whose ``experiment`` has ``add_histogram`` (TensorBoard). Only rank 0 asks.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from hydra_kit.network import HydraNetwork


def grad_norm(parameters: Any) -> Tensor | None:
    """L2 norm of the gradients of ``parameters`` (sparse ones included); None when none has a gradient."""
    squares = []
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        values = grad.coalesce().values() if grad.is_sparse else grad
        squares.append(values.detach().float().square().sum())
    return torch.stack(squares).sum().sqrt() if squares else None


class Diagnostics(Callback):
    """Log per-block, per-instance diagnostics every ``every_n_steps`` training steps (0 switches it off).

    Args:
        every_n_steps: log at the optimizer steps whose ``global_step`` is a multiple of this (0: never).
        histograms: also log the distribution of each gated instance's gates (TensorBoard histograms).
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"Diagnostics: every_n_steps must be >= 0 (0 switches it off), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self._requested_at: int | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return self.every_n_steps > 0 and trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Once per optimizer step: with gradient accumulation the first micro-batch is the one diagnosed.
        request = getattr(pl_module, "request_diagnostics", None)
        if self._due(trainer) and self._requested_at != trainer.global_step and callable(request):
            request()
            self._requested_at = trainer.global_step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if self._requested_at != trainer.global_step:
            return
        self._requested_at = None
        network = getattr(pl_module, "network", None)
        if not isinstance(network, HydraNetwork):  # not a HydraLM: nothing of its kind to diagnose
            return
        per_block: list[dict[str, dict[str, Tensor]]] = pl_module.take_diagnostics()  # type: ignore[operator]
        scalars: dict[str, float] = {}
        histograms: dict[str, Tensor] = {}
        for i, (layer_idx, owners) in enumerate(network.block_instances()):
            found = per_block[i] if i < len(per_block) else {}
            for name, module in owners.items():
                stats = dict(found.get(name, {}))
                norm = grad_norm(module.parameters())
                if norm is not None:
                    stats["grad_norm"] = norm
                for stat, value in stats.items():
                    key = f"diag/block{layer_idx}.{name}/{stat}"
                    if value.dim() == 0:
                        scalars[key] = float(value)
                    else:
                        histograms[key] = value.detach().float().cpu()
        if not scalars and not histograms:
            return
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=trainer.global_step)
            add_histogram = getattr(getattr(logger, "experiment", None), "add_histogram", None)
            if self.histograms and callable(add_histogram):
                for key, values in histograms.items():
                    add_histogram(key, values, global_step=trainer.global_step)
