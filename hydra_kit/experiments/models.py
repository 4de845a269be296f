"""The models an experiment compares, as recipes: Hydra's layout, Hydra with a component removed, a size-matched
dense transformer.

Every compared model is the ``model`` section of a recipe (a dict of :class:`~hydra_kit.model.HydraLM` keyword
arguments), so an experiment trains exactly what ``hydra-kit fit`` would build from a YAML file. Hydra is the CPU
layout below or a recipe; an ablation drops instances through the recipe's ``dropped`` list (the model allocates
nothing for them); the transformer baseline has attention + SwiGLU in every block, Hydra's width and depth, and
the SwiGLU hidden width that brings its total (or active) parameter count within 5 percent of Hydra's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hydra_kit.model import HydraLM
from hydra_kit.recipe import RecipeError

# The Hydra layout of recipes/full.yaml at the experiments' CPU size (d_model 64, 4 blocks): SSM everywhere,
# sparse global attention every 2nd block (blocks 1 and 3), top-2 of 4 experts everywhere, the workspace after
# the first SGA block and product-key memory in block 2, a router in every block.
CPU_HYDRA: dict[str, Any] = {
    "d_model": 64,
    "n_blocks": 4,
    "tie_embeddings": False,
    "components": {
        "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 16, "headdim": 16, "chunk_size": 16}},
        "sga": {"component": "sga", "blocks": "every 2", "args": {"n_heads": 4, "window": 16, "max_global": 32, "globals_per_chunk": 2}},
        "moe": {"component": "moe", "blocks": "all", "args": {"n_experts": 4, "top_k": 2}},
        "workspace": {"component": "workspace", "blocks": [1], "args": {"n_slots": 8, "chunk_size": 8}},
        "pkm": {"component": "pkm", "blocks": [2], "args": {"heads": 2, "n_keys": 16, "top_k": 8, "d_key": 32}},
        "router": {"component": "router", "blocks": "all"},
    },
}

REPO_ROOT = Path(__file__).resolve().parents[2]
FULL_RECIPE = REPO_ROOT / "recipes" / "full-29m.yaml"


@dataclass
class ModelSpec:
    """One compared model: a label, the HydraLM keyword arguments (a recipe's model section), its learning rate.

    ``lr`` None trains with the experiment's ``--lr``; the transformer baselines get ``--transformer-lr``.
    """

    label: str
    config: dict[str, Any]
    note: str = ""
    lr: float | None = None


def hydra_config(size: str, vocab_size: int, recipe: str | None = None) -> dict[str, Any]:
    """The Hydra model section for an experiment: the CPU layout, ``recipes/full-29m.yaml`` or a given recipe.

    Raises:
        RecipeError: the recipe file is missing or has no model section.
    """
    if recipe is None and size == "cpu":
        config = copy.deepcopy(CPU_HYDRA)
    else:
        from hydra_kit.config import load_recipe

        path = recipe or str(FULL_RECIPE)
        section = load_recipe(path).get("model") or {}
        if "init_args" in section:
            section = section["init_args"] or {}
        if "components" not in section:
            raise RecipeError(f"{path}: model.components is missing; an experiment needs a Hydra recipe")
        config = copy.deepcopy(section)
        # The compared models get their own output head unless the recipe says otherwise: with the tied head
        # neither Hydra nor the transformer left MQAR's no-skill plateau in 2,500 steps (HydraLM.tie_embeddings).
        config.setdefault("tie_embeddings", False)
    config["vocab_size"] = vocab_size
    return config


def without(config: dict[str, Any], *names: str) -> dict[str, Any]:
    """The recipe with component instances removed (HydraLM's ``dropped``), e.g. Hydra without its workspace.

    Raises:
        RecipeError: a name is not an instance of the recipe; the message lists the instances.
    """
    missing = [n for n in names if n not in config["components"]]
    if missing:
        raise RecipeError(f"experiment: cannot drop {missing}: not component instances of the recipe ({', '.join(config['components'])})")
    out = copy.deepcopy(config)
    out["dropped"] = sorted(set(out.get("dropped") or []) | set(names))
    return out


def count_parameters(config: dict[str, Any], seq_len: int = 256) -> dict[str, int]:
    """Total and active (per-token) parameters of a model section, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = HydraLM(**config)
    report = model.parameter_report(seq_len)
    return {"total_params": int(report["total_params"]), "active_params": int(report["active_params"])}


def _attention_heads(config: dict[str, Any]) -> int:
    for spec in config["components"].values():
        if spec.get("component") in ("sga", "attention") and "n_heads" in (spec.get("args") or {}):
            return int(spec["args"]["n_heads"])
    return 4


def match_hidden(make: Callable[[int], dict[str, Any]], target: int, match: str, what: str, tolerance: float = 0.05) -> tuple[dict[str, Any], dict[str, int]]:
    """The model section ``make(hidden)`` whose ``match`` count is closest to ``target``, hidden a multiple of 16.

    Raises:
        RecipeError: no hidden width comes within ``tolerance`` of the target.
    """
    # The count grows with the hidden width: bisect for the first width at or above the target, then take
    # the closer of it and the width below.
    lo, hi = 1, 1024  # hidden = 16 * step
    while lo < hi:
        mid = (lo + hi) // 2
        if count_parameters(make(16 * mid))[match] >= target:
            hi = mid
        else:
            lo = mid + 1
    best: tuple[float, dict[str, Any], dict[str, int]] | None = None
    for step in sorted({max(1, lo - 1), lo}):
        candidate = make(16 * step)
        counts = count_parameters(candidate)
        gap = abs(counts[match] - target) / target
        if best is None or gap < best[0]:
            best = (gap, candidate, counts)
    assert best is not None
    if best[0] > tolerance:
        raise RecipeError(f"experiment: no {what} matches the target {match} ({target:,}) within {tolerance:.0%} (best {best[2][match]:,})")
    return best[1], best[2]


def dense_transformer(config: dict[str, Any], match: str = "total_params") -> tuple[dict[str, Any], dict[str, int]]:
    """A dense transformer (attention + SwiGLU MLP in every block) with Hydra's width and depth, size-matched.

    The MLP's hidden width is chosen (steps of 16) so the transformer's ``match`` count is the closest to
    Hydra's: ``total_params`` for an equal-size model, ``active_params`` for an equal-active-parameter one.

    Returns:
        The transformer's model section and its parameter counts.
    """
    target = count_parameters(config)[match]
    d_model = int(config["d_model"])
    base = {k: v for k, v in config.items() if k not in ("components", "dropped")}
    heads = _attention_heads(config)

    def make(hidden: int) -> dict[str, Any]:
        return dict(
            base,
            components={
                "attn": {"component": "attention", "blocks": "all", "args": {"n_heads": heads}},
                "mlp": {"component": "mlp", "blocks": "all", "args": {"hidden_mult": hidden / d_model, "multiple_of": 16}},
            },
        )

    return match_hidden(make, target, match, f"dense transformer of width {d_model}")
