"""``hydra-kit experiment NAME | --list``: run one of the paper's experiments (:mod:`hydra_kit.experiments`).

The experiment's own options (``--seeds``, ``--steps``, ``--out``, ``--size``, ...) are parsed by its module,
which is imported only when it runs.
"""

from __future__ import annotations

import importlib
import importlib.util

from rich.console import Console
from rich.table import Table

from hydra_kit.errors import RecipeError
from hydra_kit.experiments import EXPERIMENTS, THROUGHPUT_NOTE
from hydra_kit.reporting import console as report_console

__all__ = ["main"]

# Other spellings of experiment names.
ALIASES = {"expert-specialization": "expert-specialisation"}


def list_experiments(console: Console) -> None:
    """A table of the experiments: name and what each measures."""
    table = Table(title="hydra-kit experiments (hydra-kit experiment NAME --help)")
    table.add_column("name")
    table.add_column("what")
    for name, (_, what) in EXPERIMENTS.items():
        table.add_row(name, what)
    console.print(table)


def main(argv: list[str]) -> int:
    """Run one experiment by name (``--list`` lists them); the experiment parses the remaining options."""
    console = report_console()
    if not argv or argv[0] in ("--list", "-l", "list"):
        list_experiments(console)
        return 0 if argv else 2
    if argv[0] in ("-h", "--help"):
        console.print("usage: hydra-kit experiment NAME [--seeds N] [--steps S] [--out DIR] [--size cpu|full] [--eval N] ...")
        list_experiments(console)
        return 0
    name = argv[0].replace("_", "-")
    name = ALIASES.get(name, name)
    if name not in EXPERIMENTS:
        raise RecipeError(f"experiment: unknown experiment {argv[0]!r}; available: {', '.join(EXPERIMENTS)}")
    module_name, _ = EXPERIMENTS[name]
    if not module_name:
        console.print(THROUGHPUT_NOTE)
        return 0
    if importlib.util.find_spec("matplotlib") is None:
        # Checked before training, not when the figure is drawn: a run of an hour would otherwise end in this error.
        raise RecipeError(f"experiment {name}: writes its figure with matplotlib, which is not installed: pip install 'hydra-kit[plots]'")
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:], console))
