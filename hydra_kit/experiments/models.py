"""The models an experiment compares, as recipes: Hydra's layout, Hydra with a component removed, a size-matched
dense transformer.

Every compared model is the ``model`` section of a recipe (a dict of :class:`~hydra_kit.model.HydraLM` keyword
arguments), so an experiment trains exactly what ``hydra-kit fit`` would build from a YAML file. Hydra is a
packaged recipe (``experiments/hydra-cpu`` for ``--size cpu``, ``full-29m`` for ``--size full``) or the one
``--recipe`` names; an ablation drops instances through the recipe's ``dropped`` list (the model allocates nothing
for them); the transformer baseline has attention + SwiGLU in every block, Hydra's width and depth, and the SwiGLU
hidden width that brings its total (or active) parameter count within 5 percent of Hydra's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hydra_kit.model import HydraLM
from hydra_kit.recipe import RecipeError
from hydra_kit.recipe_files import model_section, resolve_config

# The packaged recipe that holds Hydra's model for each experiment size (hydra-kit recipes lists them).
SIZE_RECIPES = {"cpu": "experiments/hydra-cpu", "full": "full-29m"}


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
    """The Hydra model section for an experiment: the size's packaged recipe, or ``recipe`` (a file or a name).

    Args:
        size: ``cpu`` or ``full`` (:data:`SIZE_RECIPES`); unused when ``recipe`` is given.
        vocab_size: the task's vocabulary, which replaces the recipe's.
        recipe: a recipe file or packaged recipe name to use instead of the size's.

    Raises:
        RecipeError: an unknown size, a recipe that is neither a file nor packaged, or one without
            ``model.components``.
    """
    if recipe is None:
        if size not in SIZE_RECIPES:
            raise RecipeError(f"experiment: unknown size {size!r}; choose one of {', '.join(SIZE_RECIPES)}")
        recipe = SIZE_RECIPES[size]
    path = resolve_config(recipe)
    config = copy.deepcopy(model_section(path))
    if "components" not in config:
        raise RecipeError(f"{path}: model.components is missing; an experiment needs a Hydra recipe")
    # The compared models get their own output head unless the recipe says otherwise: with a tied head the
    # recall tasks stay on their no-skill plateau (HydraLM.tie_embeddings says why).
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
