"""Recipe files: where a ``--config`` value points, and reading one YAML recipe with one-line errors.

:func:`config_path` is the one place where a ``--config`` value becomes a file path; every command resolves
its recipes through it (:func:`resolve_config_args` for an argument list).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from hydra_kit.errors import RecipeError

__all__ = ["config_path", "config_paths", "load_recipe", "parse_recipe_text", "read_text", "resolve_config_args"]

CONFIG_FLAGS = ("--config", "-c")


def config_path(value: str) -> str:
    """The recipe file a ``--config`` value names.

    Raises:
        RecipeError: no such file.
    """
    if os.path.isfile(value):
        return value
    if os.path.isdir(value):
        raise RecipeError(f"{value}: is a directory, not a recipe file")
    raise RecipeError(f"{value}: recipe file not found")


def config_paths(argv: list[str]) -> list[str]:
    """The ``--config`` values of an argument list, in order (``--config X``, ``-c X`` and ``--config=X``)."""
    paths = []
    for flag, value in itertools.pairwise(["", *argv]):
        if flag in CONFIG_FLAGS:
            paths.append(value)
        elif value.startswith("--config="):
            paths.append(value.split("=", 1)[1])
    return paths


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config`` value replaced by the file :func:`config_path` resolves it to.

    Raises:
        RecipeError: a ``--config`` value names no recipe.
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] in CONFIG_FLAGS and not arg.startswith("-"):
            out.append(config_path(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + config_path(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def parse_recipe_text(path: str, text: str) -> dict[str, Any]:
    """The mapping a recipe's YAML text holds; errors name the file (and the line, for YAML syntax errors).

    Raises:
        RecipeError: invalid YAML, an empty recipe, or a recipe that is not a mapping.
    """
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; a recipe is a YAML mapping with model, data and trainer sections (see recipes/tiny.yaml)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with keys like model, data, trainer; got {type(data).__name__}")
    return data


def read_text(path: str) -> str:
    """The text of a recipe file.

    Raises:
        RecipeError: the file is missing, unreadable or not UTF-8 text.
    """
    try:
        with open(config_path(path), encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a YAML recipe (the file is not UTF-8 text)") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror})") from None


def load_recipe(path: str) -> dict[str, Any]:
    """Load one YAML recipe as a mapping; errors name the file (and the line, for YAML syntax errors).

    Raises:
        RecipeError: see :func:`read_text` and :func:`parse_recipe_text`.
    """
    return parse_recipe_text(path, read_text(path))
