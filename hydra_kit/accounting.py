"""Parameter, FLOP and memory accounting of a Hydra network: what ``summary``, ``fit`` and ``bench`` report.

Counts come from the components themselves (:meth:`~hydra_kit.protocol.TriPathComponent.active_parameters`,
:meth:`~hydra_kit.protocol.TriPathComponent.flops_per_token`), so a plugin reports its own cost; this module adds
the shared parts (embedding, head, norms, LayerScale) and sums per instance and per block.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from hydra_kit.block import TriPathBlock
from hydra_kit.protocol import TriPathComponent


def parameter_report(blocks: Sequence[TriPathBlock], embed: nn.Embedding, head: nn.Linear | None, norm: nn.Module, seq_len: int) -> dict[str, Any]:
    """Total and active (per-token) parameters and forward FLOPs per token, per instance and per block.

    Args:
        blocks: the network's tri-path blocks, in order.
        embed: the token embedding, (vocab_size, d_model); it is the output head too when ``head`` is None.
        head: the untied output head, or None (tied).
        norm: the final norm.
        seq_len: sequence length the FLOPs are counted at (attention costs grow with it).

    Returns:
        ``total_params``, ``active_params``, ``flops_per_token``, ``seq_len``, ``embedding_params``,
        ``head_params`` (0: tied), ``components`` (instance -> totals summed over its blocks) and ``blocks``
        (one row per block: its instances and its shared norm and LayerScale parameters).
    """
    per_instance: dict[str, dict[str, float]] = defaultdict(lambda: {"total_params": 0, "active_params": 0, "flops_per_token": 0.0})
    per_block = []
    for block in blocks:
        row: dict[str, Any] = {"block": block.layer_idx, "components": {}}
        shared = sum(p.numel() for p in block.norm.parameters()) + len(block.layerscale)
        comps: dict[str, TriPathComponent] = dict(block.components())
        if block.router is not None and block.router_name is not None:
            comps[block.router_name] = block.router
        for name, comp in comps.items():
            total = sum(p.numel() for p in comp.parameters())
            active = comp.active_parameters()
            flops = comp.flops_per_token(seq_len)
            per_instance[name]["total_params"] += total
            per_instance[name]["active_params"] += active
            per_instance[name]["flops_per_token"] += flops
            row["components"][name] = {"total_params": total, "active_params": active, "flops_per_token": flops}
        row["norm_and_layerscale_params"] = shared
        per_block.append(row)
    embed_params = embed.weight.numel()
    head_params = 0 if head is None else head.weight.numel()
    final_norm = sum(p.numel() for p in norm.parameters())
    shared_total = embed_params + head_params + final_norm + sum(b["norm_and_layerscale_params"] for b in per_block)
    # Each parameter once, as nn.Module.parameters() counts it: a tensor shared between blocks is one tensor.
    unique = {id(p): p for module in (embed, head, norm, *blocks) if module is not None for p in module.parameters()}
    total = sum(p.numel() for p in unique.values())
    active = shared_total + sum(v["active_params"] for v in per_instance.values())
    head_flops = 2.0 * (head_params or embed_params)  # the output projection; the embedding lookup is free
    flops = head_flops + sum(v["flops_per_token"] for v in per_instance.values())
    return {
        "total_params": total,
        "active_params": int(active),
        "flops_per_token": flops,
        "seq_len": seq_len,
        "embedding_params": embed_params,
        "head_params": head_params,  # 0: tied, the embedding is the head
        "components": dict(per_instance),
        "blocks": per_block,
    }


def embedding_rows(report: dict[str, Any]) -> list[tuple[str, int, float]]:
    """The embedding and output-head lines of a :func:`parameter_report` as (label, params, MFLOP/token).

    One line for a tied head (the embedding is the head), two for an untied one; the embedding lookup itself
    costs no FLOPs, the head a multiply-add per weight.
    """
    embed, head = int(report["embedding_params"]), int(report.get("head_params", 0))
    if not head:
        return [("embedding (tied head)", embed, 2 * embed / 1e6)]
    return [("embedding", embed, 0.0), ("output head", head, 2 * head / 1e6)]


def state_nbytes(state: Any) -> int:
    """Bytes of memory held by the tensors of a (nested) recurrent state: the decoding cache size.

    Counts each storage once and whole: a view into a preallocated buffer holds the entire buffer.
    """
    storages: dict[int, int] = {}

    def visit(node: Any) -> None:
        if isinstance(node, Tensor):
            storage = node.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, list | tuple):
            for v in node:
                visit(v)
        elif hasattr(node, "__dataclass_fields__"):
            for f in node.__dataclass_fields__:
                visit(getattr(node, f))

    visit(state)
    return sum(storages.values())
