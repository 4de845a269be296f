"""The checks of a recipe that jsonargparse's types cannot express, each failing in one line that names the key.

Two moments: :func:`check_recipe_file` runs on each recipe file as the parser reads it (so the message names
that file), and :func:`check_model_section` and the trainer checks run once on the merged configuration, after
the command-line overrides are applied and before any class is built.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra_kit.errors import RecipeError

__all__ = ["POSITIVE_MODEL_KEYS", "check_model_section", "check_recipe_file", "check_step_limits", "check_strategy", "init_args", "model_keys"]

# Model hyper-parameters that size the network: a non-positive value would fail deep inside torch.
POSITIVE_MODEL_KEYS = ("vocab_size", "d_model", "n_blocks")


def model_keys() -> set[str]:
    """The keys a recipe's ``model`` section may hold: HydraLM's constructor keywords."""
    from hydra_kit.model import HydraLM

    return set(inspect.signature(HydraLM.__init__).parameters) - {"self"}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def init_args(section: Any) -> Any:
    """A section's constructor keywords: its ``init_args`` in the ``class_path`` form, else the section itself."""
    if isinstance(section, dict) and "class_path" in section:
        return section.get("init_args") or {}
    return section


def check_recipe_file(path: str, recipe: dict[str, Any]) -> None:
    """Check one recipe file's model section and callbacks, naming the file.

    Raises:
        RecipeError: ``<file>: model: unknown key(s) ...``, ``<file>: model.d_model: expected a positive
            integer ...``, a malformed Curriculum stage, ...
    """
    from hydra_kit.callbacks import check_recipe_callbacks

    model = init_args(recipe.get("model") or {})
    if not isinstance(model, dict):
        raise RecipeError(f"{path}: model: expected a mapping, got {model!r}")
    valid = model_keys()
    unknown = sorted(set(model) - valid)
    if unknown:
        raise RecipeError(f"{path}: model: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(valid))}")
    for key in POSITIVE_MODEL_KEYS:
        if key in model and not _positive_int(model[key]):
            raise RecipeError(f"{path}: model.{key}: expected a positive integer, got {model[key]!r}")
    check_recipe_callbacks(path, recipe)


def check_model_section(model: dict[str, Any], paths: list[str]) -> None:
    """Check the merged model section (recipe files and ``--model.*`` overrides) before the model is built.

    A non-positive size left here came from the command line (each file was checked as it was read), so the
    message names the option. The components are resolved with the final ``n_blocks``.

    Raises:
        RecipeError: ``--model.n_blocks: expected a positive integer ...``, or ``<files>: model.components...``
            (an unknown component, argument or placement, see :func:`hydra_kit.recipe.resolve_components`).
    """
    from hydra_kit import model as model_module
    from hydra_kit.recipe import resolve_components

    for key in POSITIVE_MODEL_KEYS:
        if key in model and not _positive_int(model[key]):
            raise RecipeError(f"--model.{key}: expected a positive integer, got {model[key]}")
    components = model.get("components")
    if components is not None:
        where = f"{', '.join(paths)}: model.components" if paths else "--model.components"
        n_blocks = int(model.get("n_blocks") or 4)
        resolve_components(components, n_blocks, model_module.default_registry(), where)


def check_step_limits(trainer: Any, *, fitting: bool) -> None:
    """Refuse step limits that make no run; clamp the validation interval so a short run still validates.

    Raises:
        RecipeError: ``max_steps`` below -1, or 0 when fitting.
    """
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, int) and (max_steps < -1 or (fitting and max_steps == 0)):
        what = "trains nothing (the run would only leave an empty run directory)" if max_steps == 0 else "is negative"
        raise RecipeError(f"--trainer.max_steps {max_steps} {what}: give a positive number of steps, or -1 for no step limit")
    interval = trainer.get("val_check_interval")
    if fitting and isinstance(max_steps, int) and max_steps > 0 and isinstance(interval, int) and not isinstance(interval, bool):
        batches = max_steps * int(trainer.get("accumulate_grad_batches") or 1)  # the interval counts batches
        if interval > batches:
            trainer["val_check_interval"] = batches


# Lightning's DDP strategies that register DDPStrategy with find_unused_parameters=False.
_PLAIN_DDP = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def check_strategy(strategy: Any) -> None:
    """Refuse DDP without unused-parameter detection, which fails at the second step with a page of traceback.

    Sparse components (experts not chosen, gates of absent paths, global tokens not picked) leave some
    parameters without a gradient in a given step, and plain DDP waits for every gradient.

    Raises:
        RecipeError: a plain DDP strategy; the message names the one to use.
    """
    if isinstance(strategy, str):
        name = strategy
        if name not in _PLAIN_DDP:
            return
    elif hasattr(strategy, "get") and str(strategy.get("class_path", "")).rsplit(".", 1)[-1] == "DDPStrategy":
        init = strategy.get("init_args") or {}
        if init.get("find_unused_parameters"):
            return
        name = "DDPStrategy without find_unused_parameters"
    else:
        return
    raise RecipeError(
        f"--trainer.strategy {name}: Hydra's sparse components leave some parameters without a gradient in a step, which "
        f"plain DDP cannot handle; use --trainer.strategy ddp_find_unused_parameters_true"
    )
