"""Which component instances a HydraLM holds, and their parameters: shared by the callbacks."""

from __future__ import annotations

import lightning as L
from torch import nn


def instance_names(model: L.LightningModule) -> tuple[set[str], set[str]]:
    """(all instance names, router instance names) of a HydraLM; TypeError for other modules."""
    resolved = getattr(model, "resolved", None)
    if resolved is None or not hasattr(model, "set_knocked_out"):
        raise TypeError(f"this callback needs a hydra_kit HydraLM, got {type(model).__name__}")
    return {r.name for r in resolved}, {r.name for r in resolved if r.is_router}


def instance_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every parameter of instance ``name`` in every block: its weights, its LayerScale g, or the router's."""
    params: list[nn.Parameter] = []
    for block in getattr(model, "blocks", []):
        if name in block.mixers:
            params.extend(block.mixers[name].parameters())
        if name in block.layerscale:
            params.append(block.layerscale[name])
        if block.router is not None and block.router_name == name:
            params.extend(block.router.parameters())
    return params
