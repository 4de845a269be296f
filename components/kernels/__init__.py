"""Optional kernels behind the components, each with the PyTorch path it must match (HYDRA.md 1, 3.3, 3.7).

Nothing here imports triton or mamba-ssm at import time: each kernel module loads its accelerator on first use,
and each exposes an ``*unavailable_reason`` function that says, in words, why it cannot run on this machine
(package missing, no GPU) so a component can turn a request for it into a clear error.

- :mod:`.pkm_topk`: our own Triton kernel for the product-key memory's scoring and top-k (forward fused,
  backward in PyTorch from the selected indices).
- :mod:`.mamba_ssd`: the Mamba-2 chunked SSD scan of the mamba-ssm package, behind the signature of
  ``hydra_kit.components.ssm.ssd_chunked_scan``.

CPU decoding kernels, C compiled on first use by :mod:`hydra_kit.nn.native` (a wrapper returns None when a
kernel cannot take its tensors, and the component runs its PyTorch step; tensors whose shapes do not fit together
raise a ValueError before C reads them; weights read on every token are checked once, in a pack the component
caches):

- :mod:`.ssm_step`, :mod:`.moe_step`, :mod:`.router_step`, :mod:`.pkm_step`, :mod:`.workspace_step`: the
  one-token step of the SSM, the mixture of experts, the router, the product-key memory read and the workspace
  read, each as one call.
"""
