"""``hydra-kit recipes``: list the recipes shipped with hydra-kit, or copy one out to edit.

::

    hydra-kit recipes                                   # name and description of each packaged recipe
    hydra-kit recipes --copy full-29m [--to my.yaml]    # write it out (never over a file without --force)

Any command's ``--config`` takes a packaged name as well as a file: ``hydra-kit fit --config full``.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.recipe_files import copy_recipe, packaged_recipes


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="hydra-kit recipes", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--copy", metavar="NAME", help="packaged recipe to write out, e.g. full or experiments/smoke")
    parser.add_argument("--to", metavar="PATH", help="file or existing folder to write it to (default: the working folder)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def main(argv: list[str]) -> int:
    """Run ``hydra-kit recipes`` with the arguments after the command name; returns the exit status.

    Raises:
        RecipeError: an unknown recipe name, or a target file that exists (without ``--force``).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    if args.copy is None:
        if args.to is not None or args.force:
            parser.error("--to and --force go with --copy NAME")
        table = Table(title="packaged recipes (hydra-kit fit --config NAME; hydra-kit recipes --copy NAME to edit one)")
        table.add_column("name")
        table.add_column("description")
        for recipe in packaged_recipes():
            table.add_row(recipe.name, recipe.description)
        Console(highlight=False, width=None if console.is_terminal else 200).print(table)
        return 0
    target = copy_recipe(args.copy, args.to, force=args.force)
    console.print(f"wrote {target} (the packaged recipe {args.copy}); edit it and pass it as --config {target}")
    return 0
