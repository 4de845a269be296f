"""Recipe files: read one, list the packaged ones, turn a ``--config`` value into a path, copy one out to edit.

The top-level ``recipes/`` folder of a checkout is installed as the package data of ``hydra_kit.recipes``
(``pyproject.toml``), so an installed wheel carries the same recipes a checkout has. A recipe's name is its path
under that folder without ``.yaml``: ``full``, ``full-29m``, ``experiments/smoke``. A ``--config`` value is a
file when one exists at that path; otherwise it names a packaged recipe, spelled ``full``, ``full.yaml`` or
``recipes/full.yaml`` (so the README's ``--config recipes/full.yaml`` works from any folder).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra_kit.package_data import package_folder
from hydra_kit.recipe import RecipeError

PACKAGE = "hydra_kit.recipes"
SUFFIX = ".yaml"
# Options whose value is a recipe file: every command's --config, and the experiments' --recipe; bench's
# --recipes takes several.
CONFIG_OPTIONS = ("--config", "-c", "--recipe")
MULTI_CONFIG_OPTIONS = ("--recipes",)


@dataclass(frozen=True)
class PackagedRecipe:
    """One recipe shipped with hydra-kit.

    Attributes:
        name: its path under the recipes folder without ``.yaml``, e.g. ``full-29m`` or ``experiments/smoke``.
        description: the first sentence of its leading comment ("" when it has none).
        path: the file.
    """

    name: str
    description: str
    path: Path


def recipes_folder() -> Path:
    """The folder of the packaged recipes (the checkout's ``recipes/``, or ``hydra_kit/recipes`` in a wheel)."""
    return package_folder(PACKAGE)


def describe(path: Path) -> str:
    """The first sentence of a recipe's leading comment block, on one line; "" when the file starts with no comment.

    The block ends at the first line that is not a comment, or a bare ``#``.
    """
    words: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text and not words:
                continue
            if not text.startswith("#") or not text.lstrip("#").strip():
                break
            words.extend(text.lstrip("#").split())
    summary = " ".join(words)
    end = re.search(r"\.(\s|$)", summary)
    return summary[: end.start() + 1] if end else summary


def packaged_recipes() -> list[PackagedRecipe]:
    """Every packaged recipe, sorted by name (top-level ones first, then those in subfolders)."""
    root = recipes_folder()
    found = [
        PackagedRecipe(path.relative_to(root).with_suffix("").as_posix(), describe(path), path)
        for path in root.rglob(f"*{SUFFIX}")
        if path.is_file()
    ]
    return sorted(found, key=lambda r: (r.name.count("/"), r.name))


def _packaged_name(value: str) -> str:
    """The packaged name a ``--config`` value may mean: ``recipes/full.yaml``, ``full.yaml`` and ``full`` give ``full``."""
    name = value.replace(os.sep, "/").removeprefix("./")
    name = name.removeprefix("recipes/")
    return name.removesuffix(SUFFIX)


def find_packaged(name: str) -> PackagedRecipe | None:
    """The packaged recipe ``name`` (``full``, ``full.yaml``, ``recipes/full.yaml``), or None."""
    wanted = _packaged_name(name)
    return next((r for r in packaged_recipes() if r.name == wanted), None)


def available() -> str:
    """The packaged recipe names, comma-separated, for error messages."""
    return ", ".join(r.name for r in packaged_recipes())


def resolve_config(value: str) -> str:
    """The recipe file a ``--config`` value means: the path itself when it is a file, else a packaged recipe's path.

    A value holding ``:``, ``{`` or a line break is inline YAML, which LightningCLI's ``--config`` also accepts,
    and is returned as given.

    Raises:
        RecipeError: neither a file nor a packaged recipe; the message lists the packaged names.
    """
    if os.path.isfile(value) or any(c in value for c in ":{\n"):
        return value
    recipe = find_packaged(value)
    if recipe is None:
        raise RecipeError(
            f"{value}: recipe file not found, and no packaged recipe has that name; packaged recipes: {available()} "
            f"(`hydra-kit recipes` describes them)"
        )
    return str(recipe.path)


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with each recipe option's value turned into a file path (:func:`resolve_config`).

    The options are ``--config``/``-c``/``--recipe`` (one value) and ``--recipes`` (the values up to the next
    option). Values that are already files are kept as given, so saved commands and error messages read as before.

    Raises:
        RecipeError: a value is neither a file nor a packaged recipe.
    """
    out: list[str] = []
    single = multi = False
    for arg in argv:
        if single or (multi and not arg.startswith("-")):
            out.append(resolve_config(arg))
            single = False
            continue
        option, eq, value = arg.partition("=")
        if eq and option in (*CONFIG_OPTIONS, *MULTI_CONFIG_OPTIONS) and option != "-c":
            out.append(f"{option}={resolve_config(value)}")
            single = multi = False
            continue
        out.append(arg)
        single, multi = arg in CONFIG_OPTIONS, arg in MULTI_CONFIG_OPTIONS
    return out


def load_recipe(path: str) -> dict[str, Any]:
    """Load one YAML recipe as a mapping; errors name the file (and the line, for YAML syntax errors).

    Raises:
        RecipeError: the file is missing, not UTF-8, not valid YAML, empty, or not a mapping.
    """
    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a YAML recipe (the file is not UTF-8 text)") from None
    return parse_recipe_text(path, text)


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


def model_section(value: str) -> dict[str, Any]:
    """The ``model`` section of a recipe (a file or a packaged name), unwrapped from ``init_args`` if it has one.

    Raises:
        RecipeError: as :func:`resolve_config` and :func:`load_recipe`, or the model section is not a mapping.
    """
    path = resolve_config(value)
    section = load_recipe(path).get("model") or {}
    if isinstance(section, dict) and "init_args" in section:
        section = section["init_args"] or {}
    if not isinstance(section, dict):
        raise RecipeError(f"{path}: model: expected a mapping, got {section!r}")
    return section


def copy_recipe(name: str, to: str | Path | None = None, force: bool = False) -> Path:
    """Write the packaged recipe ``name`` to a file to edit, and return that file.

    Args:
        name: a packaged recipe (``full``, ``experiments/smoke``).
        to: the file to write, or a folder to write ``<basename>.yaml`` into; None: the working folder.
        force: overwrite an existing file.

    Raises:
        RecipeError: no packaged recipe has that name, the target exists (without ``force``), or its folder is
            missing.
    """
    recipe = find_packaged(name)
    if recipe is None:
        raise RecipeError(f"recipes --copy: no packaged recipe is named {name!r}; packaged recipes: {available()}")
    target = Path(to) if to is not None else Path.cwd()
    if target.is_dir():
        target = target / recipe.path.name
    if target.exists() and not force:
        raise RecipeError(f"recipes --copy: {target} already exists; pass --force to overwrite it, or --to another path")
    if not target.parent.is_dir():
        raise RecipeError(f"recipes --copy: folder {target.parent} does not exist; create it or choose another --to")
    shutil.copyfile(recipe.path, target)
    return target
