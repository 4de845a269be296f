"""HydraLM's optimizer and learning-rate schedule: dense and sparse gradients in one optimizer, a scalable schedule.

One optimizer for a model with both dense and sparse gradients (PKM value tables with ``sparse_values``):
``torch.optim.AdamW`` rejects sparse gradients and ``torch.optim.SparseAdam`` accepts nothing else. Lightning's
automatic optimization wants a single optimizer, so :class:`DenseSparseAdam` runs AdamW on the dense
parameters and SparseAdam (which updates only the rows a batch touched) on parameters marked
``_hydra_sparse_grad = True``, behind one ``Optimizer`` whose ``param_groups`` are both children's, so learning
rate schedulers drive both.

:class:`ScaledLambdaLR` is the schedule (warm-up and cosine decay, :func:`warmup_cosine`) whose learning rates also
follow a scale kept in each param group (``curriculum_lr_scale``), so a callback scales the learning rate through
the optimizer's public param groups and never rewrites the scheduler's state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import AdamW, Optimizer, SparseAdam
from torch.optim.lr_scheduler import LambdaLR

#: The param-group entry :class:`ScaledLambdaLR` multiplies each group's learning rate by (default 1). It travels
#: with the optimizer's state in checkpoints, so a scale is never applied twice on resume.
LR_SCALE_KEY = "curriculum_lr_scale"


class DenseSparseAdam(Optimizer):
    """AdamW for dense parameter groups and SparseAdam for sparse ones, as one optimizer.

    Args:
        dense_groups: parameter groups (dicts with ``params``, optional ``lr`` and ``weight_decay``) for AdamW.
        sparse_groups: parameter groups for SparseAdam (no weight decay: SparseAdam has none).
        lr: default learning rate.
        betas: Adam betas, shared.
        eps: Adam epsilon, shared.
    """

    def __init__(self, dense_groups: list[dict[str, Any]], sparse_groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.dense = AdamW(dense_groups, lr=lr, betas=betas, eps=eps)
        sparse_groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in sparse_groups]
        self.sparse = SparseAdam(sparse_groups, lr=lr, betas=betas, eps=eps) if sparse_groups else None
        # Optimizer.__init__ is not called: the children own the parameters. Give the base class what its
        # hooks and schedulers read.
        self.defaults = dict(self.dense.defaults)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def _children(self) -> list[Optimizer]:
        return [o for o in (self.dense, self.sparse) if o is not None]

    # The base class stores these as attributes; here they are views of the two children's.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for o in self._children for g in o.param_groups]

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        return {k: v for o in self._children for k, v in o.state.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self._children:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self._children:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"dense": self.dense.state_dict(), "sparse": None if self.sparse is None else self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.dense.load_state_dict(state_dict["dense"])
        if self.sparse is not None and state_dict.get("sparse") is not None:
            self.sparse.load_state_dict(state_dict["sparse"])

    def __repr__(self) -> str:
        return f"DenseSparseAdam(dense={self.dense!r}, sparse={self.sparse!r})"


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``step``: linear warm-up to 1, then cosine decay to ``min_lr_ratio``.

    Args:
        total_steps: optimizer steps of the whole run (the decay ends there).
        warmup_steps: steps of linear warm-up (capped at ``total_steps - 1``).
        min_lr_ratio: the multiplier at the end of the decay.
    """
    total = max(1, total_steps)
    warmup = min(warmup_steps, max(0, total - 1))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


class ScaledLambdaLR(LambdaLR):
    """``LambdaLR`` whose rates also follow each param group's ``curriculum_lr_scale`` entry (:data:`LR_SCALE_KEY`).

    ``lr_i(step) = base_lr_i * lambda_i(step) * param_groups[i].get("curriculum_lr_scale", 1)``. A callback that
    sets the entry (and the group's current ``lr`` for the step under way) changes the rate from then on; the
    warm-up and decay continue unchanged on the scaled rate.
    """

    def get_lr(self) -> list[float | Tensor]:  # type: ignore[override]
        rates = super().get_lr()
        return [rate * group.get(LR_SCALE_KEY, 1.0) for rate, group in zip(rates, self.optimizer.param_groups, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scale_key"] = LR_SCALE_KEY  # marks base rates that do not include the scale
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "scale_key" not in state_dict:
            # Saved by a plain LambdaLR whose base rates a curriculum had already multiplied by the scale that the
            # restored param groups hold too: divide it out, or it would apply twice.
            self.base_lrs = [base / group.get(LR_SCALE_KEY, 1.0) for base, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)]
