"""Folders that hydra-kit installs inside its package from top-level folders of a checkout, found through importlib.

A checkout keeps ``components/``, ``recipes/`` and ``data/`` at its top level; ``pyproject.toml`` installs them as
``hydra_kit.components``, ``hydra_kit.recipes`` and ``hydra_kit.sample_data``. A wheel copies them inside the
``hydra_kit`` folder; an editable install maps each name to the checkout's folder. So a mapped folder is either
inside the ``hydra_kit`` folder (a wheel) or beside it (a checkout). Anywhere else it comes from another source
tree: an editable install of checkout A while ``hydra_kit`` itself is imported from checkout B (the working folder
or PYTHONPATH put B first), which would silently run A's components or recipes with B's code.
:func:`check_same_tree` refuses that in one line naming both folders.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

from hydra_kit.recipe import RecipeError


class MixedSourceTreesError(ImportError):
    """A package that hydra-kit maps from a top-level folder was imported from another source tree than hydra_kit."""


def check_same_tree(package: str, folder: Path, hydra_kit_folder: Path | None = None) -> None:
    """Refuse a mapped package whose folder is neither inside nor beside the folder of the running ``hydra_kit``.

    Args:
        package: the package's name, e.g. ``hydra_kit.components`` (named in the error).
        folder: the folder the package was loaded from.
        hydra_kit_folder: the folder of the ``hydra_kit`` package; None: the one this process imported.

    Raises:
        MixedSourceTreesError: the two folders belong to different installs or checkouts.
    """
    if hydra_kit_folder is None:
        hydra_kit_folder = Path(sys.modules["hydra_kit"].__file__ or "").parent
    folder, hydra_kit_folder = folder.resolve(), hydra_kit_folder.resolve()
    if folder.parent in (hydra_kit_folder, hydra_kit_folder.parent):
        return
    raise MixedSourceTreesError(
        f"{package} was loaded from {folder} but hydra_kit from {hydra_kit_folder}: two hydra-kit source trees are "
        f"mixed (an editable install of one checkout while running another's code); reinstall the checkout you run "
        f"(pip install -e {hydra_kit_folder.parent}) or run from the installed one"
    )


def package_folder(package: str) -> Path:
    """The folder of a package hydra-kit installs from a top-level folder (``hydra_kit.recipes``, ...), checked.

    Raises:
        RecipeError: the package is not importable as a folder of files (hydra-kit must be installed unpacked,
            as pip does), or it comes from another source tree than ``hydra_kit`` (:func:`check_same_tree`).
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise RecipeError(f"{package} is not installed: reinstall hydra-kit (pip install hydra-kit, or pip install -e . in a checkout)") from None
    if not isinstance(root, Path):  # e.g. imported from a zip file: the recipes and the text must be real files
        raise RecipeError(f"{package} is not a folder on disk ({root}); install hydra-kit unpacked, as pip does")
    try:
        check_same_tree(package, root)
    except MixedSourceTreesError as exc:
        raise RecipeError(str(exc)) from None
    return root
