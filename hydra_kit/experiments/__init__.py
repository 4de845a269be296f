"""``hydra-kit experiment NAME``: the paper's experiments (HYDRA.md section 4), one command each.

Each experiment trains the models it compares (Hydra, Hydra without the component under study, a
size-matched dense transformer) for several seeds with Lightning, evaluates them per difficulty level on
held-out data, prints a rich table and writes ``NAME.csv``, ``NAME.json`` and ``NAME.png`` (see
:mod:`hydra_kit.experiments.runner`). ``hydra-kit experiment --list`` names them.
"""

from __future__ import annotations

import importlib
import sys

from rich.console import Console
from rich.table import Table

# name -> (module, id and one line); modules are imported only when their experiment runs.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "logic-chains": ("hydra_kit.experiments.logic_chains", "E1  accuracy per proof length, train 1..4 hops, test 1..8: Hydra +- workspace vs transformer"),
    "throughput": ("", "E2  tokens/s and peak memory, Hydra-29M vs Transformer-29M: this is `hydra-kit bench`"),
    "pkm-recall": ("hydra_kit.experiments.pkm_recall", "E3  open- vs closed-book fact recall: accuracy, latency, mean PKM gate, with and without PKM"),
    "distant-premise": ("hydra_kit.experiments.distant_premise", "E4  accuracy, latency, peak memory against premise distance: Hydra, Hydra - SGA, transformer"),
    "expert-specialisation": ("hydra_kit.experiments.expert_specialisation", "E5  domain mixture: held-out accuracy vs equal-active dense models, domain-expert NMI, heatmap"),
    "mqar": ("hydra_kit.experiments.mqar", "E6  multi-query associative recall (Zoology): Hydra vs transformer per number of pairs"),
}

THROUGHPUT_NOTE = (
    "E2 (throughput) is the benchmark command: `hydra-kit bench --seq_lens 1024 2048 4096 8192 16384` measures Hydra-29M "
    "against Transformer-29M (inference and training steps, tokens/s and peak memory, ratios in one run); add "
    "`--text ../shared/data/wikitext-2/...` for real text. See docs/benchmarks.md for the measured runs."
)


def _console() -> Console:
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else 160)


def list_experiments(console: Console) -> None:
    table = Table(title="hydra-kit experiments (hydra-kit experiment NAME --help)")
    table.add_column("name")
    table.add_column("what")
    for name, (_, what) in EXPERIMENTS.items():
        table.add_row(name, what)
    console.print(table)


def main(argv: list[str]) -> int:
    """Run one experiment by name (``--list`` lists them); the experiment parses the remaining options."""
    console = _console()
    if not argv or argv[0] in ("--list", "-l", "list"):
        list_experiments(console)
        return 0 if argv else 2
    if argv[0] in ("-h", "--help"):
        console.print("usage: hydra-kit experiment NAME [--seeds N] [--steps S] [--out DIR] [--size cpu|full] [--eval N] ...")
        list_experiments(console)
        return 0
    name = argv[0].replace("_", "-")
    if name == "expert-specialization":
        name = "expert-specialisation"
    if name not in EXPERIMENTS:
        from hydra_kit.recipe import RecipeError

        raise RecipeError(f"experiment: unknown experiment {argv[0]!r}; available: {', '.join(EXPERIMENTS)}")
    module_name, _ = EXPERIMENTS[name]
    if not module_name:
        console.print(THROUGHPUT_NOTE)
        return 0
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:], console))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
