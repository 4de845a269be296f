"""SwiGLU feed-forward: the dense channel path of the transformer and of the ``ssm_only`` baseline."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from hydra_kit.ops import SwiGLU
from hydra_kit.protocol import ComponentContext, ComponentOutput, ComponentPath, TriPathComponent


class SwiGLUMLP(TriPathComponent):
    """Position-wise SwiGLU MLP (Shazeer 2020, arXiv 2002.05202); stateless.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        hidden_mult: hidden width as a multiple of d_model (8/3 keeps the parameter count of a 4x GELU MLP).
        multiple_of: round the hidden width up to a multiple of this.
    """

    path: ClassVar[ComponentPath] = ComponentPath.CHANNEL
    layerscale_init: ClassVar[float] = 1.0
    example_init_args: ClassVar[dict[str, Any]] = {"hidden_mult": 2.0}
    supports_resets: ClassVar[bool] = True  # pointwise: no token reads another, so documents cannot mix

    def __init__(self, d_model: int, layer_idx: int, *, hidden_mult: float = 8 / 3, multiple_of: int = 16) -> None:
        super().__init__(d_model, layer_idx)
        if hidden_mult <= 0 or multiple_of <= 0:
            raise ValueError(f"mlp: hidden_mult ({hidden_mult}) and multiple_of ({multiple_of}) must be positive")
        hidden = int(hidden_mult * d_model)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.ffn = SwiGLU(d_model, hidden)

    @property
    def pointwise(self) -> bool:
        return True

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: Any = None) -> ComponentOutput:
        return ComponentOutput(update=self.ffn(x))
