"""The user-error type of hydra-kit: a mistake in a recipe, an option or an input file, reported in one line.

This module imports nothing from hydra-kit, so any tier may raise :class:`RecipeError`. The commands catch it
and print its message as the one ``error:`` line of a run, with exit status 2 and no traceback.
"""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe, option or input is malformed; the message names the file or key, the problem and the valid choices."""
