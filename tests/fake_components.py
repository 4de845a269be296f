"""Components used only by the tests: a well-behaved one, broken ones, and things that are not components."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hydra_kit.protocol import ComponentContext, ComponentOutput, ComponentPath, TriPathComponent


class CumulativeMeanMixer(TriPathComponent):
    """A correct stateful sequence mixer: the running mean of a projection of the past."""

    path: ClassVar[ComponentPath] = ComponentPath.SEQUENCE

    def __init__(self, d_model: int, layer_idx: int, *, scale: float = 1.0) -> None:
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)
        self.scale = scale

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, int]:
        return torch.zeros(batch_size, self.d_model, device=device, dtype=dtype), 0

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: Any = None) -> ComponentOutput:
        total, count = state if state is not None else (x.new_zeros(x.shape[0], x.shape[2]), 0)
        sums = total[:, None] + self.proj(x).cumsum(1)  # (B, L, D)
        counts = count + torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return ComponentOutput(self.scale * sums / counts, state=(sums[:, -1], count + x.shape[1]))


class LookAheadMixer(CumulativeMeanMixer):
    """Broken on purpose: every position also sees the next token."""

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: Any = None) -> ComponentOutput:
        out = super().forward(x, context, state)
        ahead = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        return ComponentOutput(out.update + ahead, state=out.state)


class ForgetfulMixer(CumulativeMeanMixer):
    """Broken on purpose: ignores the carried state, so chunked processing differs from the full forward."""

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: Any = None) -> ComponentOutput:
        return super().forward(x, context, None)


class StepDriftMixer(CumulativeMeanMixer):
    """Broken on purpose: ``step`` adds 1e-3 to what ``forward`` gives for the same token and state."""

    def step(self, x_t: Tensor, state: Any, context: ComponentContext | None = None) -> ComponentOutput:
        out = super().step(x_t, state, context)
        return ComponentOutput(out.update + 1e-3, state=out.state)


class NotAComponent(nn.Module):
    """An nn.Module that does not implement the contract."""
