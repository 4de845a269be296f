"""The ops tier: every op hydra-kit computes, each with its PyTorch reference beside its C and Triton versions.

The lowest tier of the package: it imports nothing of hydra-kit above it, and the core, the components and
plugins build on it. One module per op; a module with a C kernel keeps its ``.c`` source beside it, compiled on
first use (:mod:`.native`); :mod:`.dispatch` alone decides, per call, whether the C kernel or the PyTorch path runs.

Public building blocks for component and plugin authors (importable from ``hydra_kit.ops``):
:class:`Linear` / :func:`linear`, :class:`RMSNorm` / :func:`rms_norm`, :class:`SwiGLU`,
:class:`RotaryEmbedding` / :func:`apply_rotary`, and :class:`PackedWeights` (a module's weights packed once for a
kernel, rebuilt whenever they change).

The ops, by module (reference: the PyTorch function the tests hold the faster versions to):

- :mod:`.linear` (``linear.c``), :mod:`.norm` (``norm.c``), :mod:`.rotary` (``rotary.c``: the rotary q/k/v
  projection of a decoding step), :mod:`.decode_attention` (``decode_attention.c``), :mod:`.residual`
  (``residual.c``: a block's gated residual sum): the decoding ops of the core and of every attention.
- :mod:`.scan` (the SSD and diagonal chunked scans, PyTorch), :mod:`.mamba_ssd` (mamba-ssm's fused Triton SSD
  scan, GPU), :mod:`.conv` (the causal depthwise convolution), :mod:`.ssm_step` (``ssm_step.c``, and its
  ``ssm_step_reference``).
- :mod:`.ssm_mix` (``ssm_mix.c``: the SSM's convolution-and-SiLU stage and its skip-gate-norm stage) and
  :mod:`.chunk_carry` (``chunk_carry.c``: the SSD scan's pass across chunks): the C ops of a sequence forward,
  each an autograd function whose backward is C too, so training takes them as well as inference; each has its
  ``*_reference`` in PyTorch ops.
- :mod:`.moe_step`, :mod:`.router_step`, :mod:`.workspace_step`, :mod:`.pkm_step` (each with its ``.c``): the
  one-token step of the mixture of experts, the router, the workspace read and the product-key memory read. Each
  step module has its ``*_reference`` in PyTorch ops, tested against both the kernel and the component's own
  PyTorch step (which is what runs whenever the kernel does not).
- :mod:`.pkm_topk` (``product_topk``, PyTorch) with its Triton kernel (``_pkm_topk_triton``).
- :mod:`.segments`: the document-boundary masks of a packed window (``document_starts``, ``document_offsets``).

``hydra_kit.ops.linear`` names the function (as ``torch.nn.functional.linear`` does); the module's other names
are imported from it directly (``from hydra_kit.ops.linear import LIBRARY``).

Nothing here imports triton or mamba-ssm at import time: each accelerated module loads its accelerator on first
use and says, in words, why it cannot run on this machine (``*unavailable_reason``).
"""

from hydra_kit.ops.linear import Linear, linear
from hydra_kit.ops.norm import RMSNorm, rms_norm
from hydra_kit.ops.packed import PackedWeights
from hydra_kit.ops.rotary import RotaryEmbedding, apply_rotary
from hydra_kit.ops.swiglu import SwiGLU

__all__ = ["Linear", "PackedWeights", "RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary", "linear", "rms_norm"]
