"""E6: multi-query associative recall (Zoology's MQAR, arXiv 2312.04927): Hydra, Hydra without its router, a size-matched transformer.

Each number of key-value pairs is its own task instance (MQAR has one sequence length per instance), so
every model is trained once per level; accuracy is over all query positions of the first ``--eval`` held-out
examples (each example asks for every listed key: ``num_queries = num_pairs``).

::

    hydra-kit experiment mqar                      # CPU default: 8 pairs, 3 seeds
    hydra-kit experiment mqar --size full --pairs 16 32 64 --steps 20000 --seeds 3   # the full size (GPU)

Outputs: ``mqar.csv`` (model, pairs, accuracy mean/std, n_examples, n_seeds, chance, the best no-skill baseline and
whether the model is above it), ``mqar.json``, ``mqar.png`` (accuracy against the number of pairs, as in Zoology's
figures, with chance and the best no-skill baseline drawn: guessing among the pairs no earlier query asked,
H_n / n for n pairs, 0.340 at 8; see :meth:`hydra_kit.data.MQAR.heuristics`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.data import MQAR
from hydra_kit.experiments import models, report, runner

NAME = "mqar"
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"steps": 300, "batch_size": 32, "pairs": [8], "num_keys": 32, "num_values": 32},
    "full": {"steps": 20000, "batch_size": 64, "pairs": [16, 32, 64], "num_keys": 256, "num_values": 256, "lr": 1e-3},
}


def main(argv: list[str], console: Console) -> int:
    """Train Hydra and the transformer on MQAR at each number of pairs; accuracy table and figure."""
    parser = ArgumentParser(prog="hydra-kit experiment mqar", description=main.__doc__)
    runner.add_common_arguments(parser)
    parser.add_argument("--pairs", type=int, nargs="+", default=None, help="numbers of key-value pairs (one trained model per value)")
    args = parser.parse_args(argv)
    settings = runner.resolve_settings(args, NAME, DEFAULTS)
    d = DEFAULTS[settings.size]
    pairs = args.pairs or d["pairs"]
    num_keys, num_values = d["num_keys"], d["num_values"]
    if max(pairs) > num_keys:
        raise runner.RecipeError(f"experiment mqar: --pairs {max(pairs)} exceeds the {num_keys} keys of --size {settings.size}")
    console.print(f"[bold]E6 MQAR[/]: pairs {pairs}, {settings.seeds} seeds, {settings.steps} steps, {settings.eval_per_level} held-out examples per cell")
    vocab = MQAR(num_pairs=1, num_queries=1, num_keys=num_keys, num_values=num_values).vocab_size
    hydra = models.hydra_config(settings.size, vocab, settings.recipe)
    transformer, _ = models.dense_transformer(hydra)
    routers = [n for n, spec in hydra["components"].items() if spec.get("component") in ("router", "TokenRouter")]
    specs = [
        models.ModelSpec("hydra", hydra, "full layout"),
        # Without its router every gate is 1 and SGA has no score (a sliding window): what the router adds.
        *([models.ModelSpec("hydra - router", models.without(hydra, *routers), "router instance removed")] if routers else []),
        models.ModelSpec("transformer", transformer, "attention + SwiGLU, total params matched", lr=settings.transformer_lr),
    ]
    counts = runner.describe_models(console, specs)
    records: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    tasks = {p: MQAR(num_pairs=p, num_queries=p, num_keys=num_keys, num_values=num_values) for p in pairs}
    examples_per_level = {p: [tasks[p].sample(runner.EVAL_SEED, "val", i) for i in range(settings.eval_per_level)] for p in pairs}
    baselines = report.baseline_rows(tasks, examples_per_level, "pairs")
    report.print_baselines(console, "no-skill baselines per number of pairs (held-out accuracy; bold: the best)", baselines, "pairs")

    def write(done: list[dict[str, Any]], done_runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Summarise what has finished (earlier levels plus this level's seeds) and (re)write the outputs."""
        summary = report.with_baselines(report.summarise(done, ("model", "pairs"), ("accuracy",)), baselines, "pairs")
        extra = {"task": {"num_keys": num_keys, "num_values": num_values, "pairs": pairs, "chance": 1 / num_values}, "baselines": baselines, "records": done, "paired": report.paired_rows(done, "pairs", specs), "runs": done_runs}
        csv_path, json_path = report.write_outputs(settings.out, NAME, summary, runner.payload(NAME, settings, specs, counts, extra))
        png = settings.out / f"{NAME}.png"
        report.errorbar_plot(png, summary, "pairs", "accuracy", "held-out accuracy", "E6 MQAR: accuracy vs number of key-value pairs", "key-value pairs", baselines=baselines)
        return summary, [csv_path, json_path, png]

    for p in pairs:
        task, examples = tasks[p], examples_per_level[p]

        def measure(trained: runner.TrainedModel, spec: models.ModelSpec, seed: int, p: int = p, examples: list = examples) -> list[dict[str, Any]]:
            cell = runner.evaluate(trained.model, examples)
            return [{"pairs": p, "accuracy": cell.accuracy, "n_examples": cell.examples, "n_answers": cell.answers}]

        def partial(r: list[dict[str, Any]], t: list[dict[str, Any]], p: int = p, before: tuple = (records, runs)) -> None:
            write(before[0] + r, before[1] + [dict(row, pairs=p) for row in t])

        console.print(f"pairs = {p} (sequence length {task.seq_len}, chance {1 / num_values:.3f})")
        r, t = runner.run_grid(console, specs, task, settings, measure, on_seed=partial, name=NAME, baselines=baselines, where={"pairs": p})
        records += r
        runs += [dict(row, pairs=p) for row in t]
    summary, paths = write(records, runs)
    report.print_table(console, f"E6 MQAR: held-out accuracy (mean ± std over {report.seeds_phrase(records)}; a claim only where above no-skill)", summary, ("model", "pairs"), [("accuracy", "accuracy", 3)])
    report.print_paired(console, report.paired_rows(records, "pairs", specs), "pairs")
    report.report_files(console, paths)
    return 0
