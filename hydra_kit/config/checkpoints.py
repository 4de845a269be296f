"""Whether a checkpoint fits a recipe: the architecture-defining hyper-parameters of both, compared.

A checkpoint's weights only mean something in the model they were trained in. The CLI refuses a
``--ckpt_path`` whose model another recipe built, naming both architectures and the run's saved recipe.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from hydra_kit.checkpoint import safe_torch_load
from hydra_kit.errors import RecipeError
from hydra_kit.model import HydraLM
from hydra_kit.network import DEFAULT_COMPONENTS

__all__ = ["ARCHITECTURE_KEYS", "check_checkpoint_matches", "model_architecture"]

# The model hyper-parameters that decide the shapes and meaning of the weights: a checkpoint only fits a recipe
# that agrees on all of them.
ARCHITECTURE_KEYS = ("vocab_size", "d_model", "n_blocks", "components", "dropped")


def model_architecture(hparams: Any) -> dict[str, Any]:
    """The architecture-defining model hyper-parameters (:data:`ARCHITECTURE_KEYS`) in a comparable form."""
    defaults = {k: p.default for k, p in inspect.signature(HydraLM.__init__).parameters.items() if k in ARCHITECTURE_KEYS}
    get = hparams.get if hasattr(hparams, "get") else (lambda key, default=None: getattr(hparams, key, default))
    out = {key: get(key, defaults[key]) for key in ARCHITECTURE_KEYS}
    if out["components"] is None:
        out["components"] = DEFAULT_COMPONENTS
    out["dropped"] = sorted(out["dropped"] or [])
    as_plain = getattr(out["components"], "as_dict", None)
    if as_plain is not None:
        out["components"] = as_plain()
    # One spelling for tuples/lists and nested namespaces, so that a saved and a parsed recipe compare equal.
    return {k: json.loads(json.dumps(v, default=lambda o: o.as_dict() if hasattr(o, "as_dict") else list(o))) for k, v in out.items()}


def _describe_architecture(arch: dict[str, Any]) -> str:
    components = ", ".join(name for name in arch["components"] if name not in arch["dropped"])
    return f"vocab_size {arch['vocab_size']}, d_model {arch['d_model']}, n_blocks {arch['n_blocks']}, components {components}"


def _architecture_differences(checkpoint: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    diffs = [key for key in ARCHITECTURE_KEYS if key != "components" and checkpoint[key] != recipe[key]]
    a, b = checkpoint["components"], recipe["components"]
    if a != b:
        only_ckpt = [n for n in a if n not in b]
        only_recipe = [n for n in b if n not in a]
        changed = [n for n in a if n in b and a[n] != b[n]]
        parts = [f"only in the checkpoint: {', '.join(only_ckpt)}" if only_ckpt else "",
                 f"only in the recipe: {', '.join(only_recipe)}" if only_recipe else "",
                 f"different settings of {', '.join(changed)}" if changed else ""]
        diffs.append(f"components ({'; '.join(p for p in parts if p) or 'order'})")
    return diffs


def check_checkpoint_matches(ckpt_path: str, config_model: Any, recipe_paths: list[str]) -> None:
    """Refuse a checkpoint whose model another recipe built: its weights would not fit, or mean something else.

    Raises:
        CheckpointError: the file is missing, unreadable or not a hydra-kit checkpoint (from ``safe_torch_load``).
        RecipeError: the checkpoint's architecture differs from the recipe's; the message names both.
    """
    checkpoint = safe_torch_load(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise RecipeError(f"checkpoint {ckpt_path}: not a hydra-kit checkpoint (it has no hyper_parameters or state_dict)")
    trained, wanted = model_architecture(hparams), model_architecture(config_model)
    diffs = _architecture_differences(trained, wanted)
    if not diffs:
        return
    folder = Path(ckpt_path).resolve().parent
    run_config = folder.parent / "config.yaml" if folder.name == "checkpoints" else None
    if run_config is not None and run_config.is_file():  # runs/<recipe name>/version_<n>/checkpoints/<file>
        origin = f"recipe {folder.parent.parent.name!r}"
        fix = f"use --config {_shorten(run_config)} (the run's saved recipe) or the recipe it was trained with"
    else:
        origin, fix = "another recipe", "use the recipe it was trained with as --config"
    recipe = f"--config {', '.join(recipe_paths)}" if recipe_paths else "the default model (no --config)"
    raise RecipeError(
        f"checkpoint {ckpt_path} was trained with {origin} ({_describe_architecture(trained)}), but {recipe} builds "
        f"{_describe_architecture(wanted)}; they differ in {', '.join(diffs)}: {fix}"
    )


def _shorten(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
