"""hydra-kit-gla: a gated linear attention sequence mixer for hydra-kit (a third-party component package)."""

from hydra_kit_gla.gla import GatedLinearAttention, GLAState

__version__ = "0.1.0"

__all__ = ["GLAState", "GatedLinearAttention", "__version__"]
