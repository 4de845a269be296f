"""Small building blocks shared by the core and by components (norms, rotary embeddings, SwiGLU, weight layout)."""

from hydra_kit.nn.layers import RMSNorm, SwiGLU
from hydra_kit.nn.layout import store_tall_linears_column_major
from hydra_kit.nn.rotary import RotaryEmbedding, apply_rotary

__all__ = ["RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary", "store_tall_linears_column_major"]
