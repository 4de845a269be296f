"""The paper's experiments (docs/design.md section 4), one ``hydra-kit experiment NAME`` command each.

Each experiment trains the models it compares (Hydra, Hydra without the component under study, a
size-matched dense transformer) for several seeds with Lightning, evaluates them per difficulty level on
held-out data, prints a rich table and writes ``NAME.csv``, ``NAME.json`` and ``NAME.png`` (see
:mod:`hydra_kit.experiments.runner`). ``hydra-kit experiment --list`` names them
(:mod:`hydra_kit.commands.experiment`).
"""

from __future__ import annotations

__all__ = ["EXPERIMENTS", "THROUGHPUT_NOTE"]

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
