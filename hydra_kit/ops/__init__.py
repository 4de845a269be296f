"""Small building blocks shared by the core and by components (norms, rotary embeddings, SwiGLU, decoding linear)."""

from hydra_kit.nn.decode_linear import Linear, linear
from hydra_kit.nn.layers import RMSNorm, SwiGLU
from hydra_kit.nn.rotary import RotaryEmbedding, apply_rotary

__all__ = ["Linear", "RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary", "linear"]
