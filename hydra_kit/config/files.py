"""Recipe files: where a ``--config`` value points, and reading one YAML recipe with one-line errors.

A ``--config`` value becomes a file path in one place, :func:`hydra_kit.recipe_files.resolve_config` (a file,
or a packaged recipe's name); :func:`config_path` and :func:`resolve_config_args` (an argument list) call it.
"""

from __future__ import annotations

import itertools
from typing import Any

from hydra_kit import recipe_files
from hydra_kit.errors import RecipeError
from hydra_kit.recipe_files import parse_recipe_text, resolve_config

__all__ = ["config_path", "config_paths", "load_recipe", "parse_recipe_text", "read_text", "resolve_config_args"]

CONFIG_FLAGS = ("--config", "-c")


def config_path(value: str) -> str:
    """The recipe file a ``--config`` value names: the path itself when it is a file, else a packaged recipe's file
    (:func:`hydra_kit.recipe_files.resolve_config`: ``full``, ``full.yaml`` or ``recipes/full.yaml``).

    Raises:
        RecipeError: neither a file nor a packaged recipe; the message lists the packaged names.
    """
    return resolve_config(value)


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
    """``argv`` with every recipe option's value (``--config``, ``-c``, ``--recipe``, ``--recipes``) turned into a
    file path by :func:`config_path`.

    Raises:
        RecipeError: a value names no recipe.
    """
    return recipe_files.resolve_config_args(argv)


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
