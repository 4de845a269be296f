"""E3: product-key memory and selective retrieval, closed- vs open-book fact recall (paper Fig. 4).

Every model is trained on :class:`~hydra_kit.data.FactRecall` in mixed mode (half the questions closed-book:
the fact is only in the fixed table, so it must have been stored in the weights; half open-book: the fact is
in the prompt, counterfactual half of the time, so it must be read). Evaluated per book on held-out prompts
(new prompts about the same table: a closed-book fact never seen in training could not be recalled), and on a
third set, ``counterfactual``: held-out open-book prompts whose every answer contradicts the table. A model that
recalls the table and ignores the prompt scores about 0.5 on ``open`` but 0 there, so only that row shows
reading; the command prints that recall-only accuracy per book beside the no-skill baselines.

* accuracy at the answer positions;
* latency: median wall time of one batch-1 forward over a prompt of that book (prompts of both books have the
  same length, so a difference would come from the model, not the input);
* mean PKM gate: the router's ``gate_pkm`` statistic (``ModelOutput.stats["router.gate_pkm"]``), the mean over
  all positions of the prompts of that book of the gate r^pkm (the paper's beta). The paper's claim is that it
  opens for closed-book questions and stays low when the fact is in the prompt.

Compared: Hydra, Hydra without PKM (the ``pkm`` instance removed), and a transformer of Hydra's total size.
Beside every model the table prints, per book, chance (1 / num_values) and the best no-skill heuristic (a
bigram from one subject token, the most frequent prompt value, ..., see :meth:`FactRecall.heuristics`) scored
on the same held-out prompts, and whether the model's accuracy is above it.

::

    hydra-kit experiment pkm-recall                                          # CPU default
    hydra-kit experiment pkm-recall --size full --num-facts 4096 --steps 20000   # full size (GPU)

Outputs: ``pkm_recall.csv`` (model, book, accuracy/latency_ms/pkm_gate mean and std, chance, best_no_skill,
best_no_skill_accuracy, above_no_skill, n_examples, n_seeds), ``pkm_recall.json`` (also every heuristic's
accuracy per book, and ``recall_only``), ``pkm_recall.png`` (accuracy, latency and gate per book, one bar group per model; dashed:
the best no-skill accuracy of each book, dotted: chance).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.console import Console

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.experiments import models, report, runner

NAME = "pkm_recall"
GATE_STAT = "router.gate_pkm"
# The reported levels: the two books, and the open-book prompts whose every answer is counterfactual (the prompt
# states a value other than the table's). A model that recalls the table and ignores the prompt scores about
# 1 - counterfactual on "open" (0.5 by default) but 0 on "counterfactual": only there is accuracy evidence of reading.
BOOKS = ("closed", "open", "counterfactual")
DEFAULTS: dict[str, dict[str, Any]] = {
    # context_facts None: every value is stated once per prompt (FactRecall's default), so no value stands out.
    "cpu": {"steps": 300, "batch_size": 32, "num_facts": 256, "num_values": 16, "context_facts": None, "num_queries": 2},
    "full": {"steps": 20000, "batch_size": 64, "num_facts": 4096, "num_values": 64, "context_facts": None, "num_queries": 2, "lr": 1e-3},
}


def main(argv: list[str], console: Console) -> int:
    """Closed- vs open-book fact recall: accuracy, latency and mean PKM gate, with and without PKM."""
    from hydra_kit.data import FactRecall

    parser = ArgumentParser(prog="hydra-kit experiment pkm-recall", description=main.__doc__)
    runner.add_common_arguments(parser)
    parser.add_argument("--num-facts", type=int, default=None, help="two-token subjects in the fixed fact table, n * n with n a multiple of --num-values")
    parser.add_argument("--num-values", type=int, default=None, help="value vocabulary (chance = 1 / num_values)")
    parser.add_argument("--context-facts", type=int, default=None, help="distractor facts per open-book prompt (default: every value stated once)")
    parser.add_argument("--table-seed", type=int, default=0, help="seed of the fact table")
    args = parser.parse_args(argv)
    settings = runner.resolve_settings(args, NAME, DEFAULTS)
    d = DEFAULTS[settings.size]
    task = runner.build_task(
        FactRecall,
        num_facts=args.num_facts or d["num_facts"],
        num_values=args.num_values or d["num_values"],
        table_seed=args.table_seed,
        mode="mixed",
        open_fraction=0.5,
        num_queries=d["num_queries"],
        context_facts=args.context_facts if args.context_facts is not None else d["context_facts"],
    )
    console.print(
        f"[bold]E3 PKM recall[/]: {task.num_facts} facts, {task.num_values} values, {task.context_facts} context facts, length {task.seq_len}; "
        f"{settings.seeds} seeds, {settings.steps} steps, {settings.eval_per_level} held-out prompts per book"
    )
    examples = runner.eval_set(task, "book", BOOKS[:2], settings.eval_per_level)
    examples["counterfactual"] = counterfactual_examples(task, settings.eval_per_level)
    baselines = report.baseline_rows(task, examples, "book")
    report.print_baselines(console, "no-skill baselines per book (held-out accuracy; bold: the best)", baselines, "book")
    recall_only = {book: recall_only_accuracy(task, examples[book]) for book in BOOKS}
    console.print(
        "recalling the table and ignoring the prompt (not a no-skill baseline: it needs every fact stored) scores "
        + ", ".join(f"{book} {acc:.3f}" for book, acc in recall_only.items())
    )
    hydra = models.hydra_config(settings.size, task.vocab_size, settings.recipe)
    pkm_names = [n for n, s in hydra["components"].items() if s.get("component") in ("pkm", "ProductKeyMemory")]
    if not pkm_names:
        raise runner.RecipeError("experiment pkm-recall: the Hydra recipe has no pkm component instance to study")
    transformer, _ = models.dense_transformer(hydra)
    specs = [
        models.ModelSpec("hydra", hydra, "full layout"),
        models.ModelSpec("hydra - pkm", models.without(hydra, *pkm_names), "pkm instance removed"),
        models.ModelSpec("transformer", transformer, "attention + SwiGLU, total params matched", lr=settings.transformer_lr),
    ]
    counts = runner.describe_models(console, specs)

    def measure(trained: runner.TrainedModel, spec: models.ModelSpec, seed: int) -> list[dict[str, Any]]:
        rows = []
        for book in BOOKS:
            cell = runner.evaluate(trained.model, examples[book])
            gate_key = next((k for k in cell.stats if k.endswith("gate_" + pkm_names[0])), None)
            rows.append(
                {
                    "book": book,
                    "accuracy": cell.accuracy,
                    "latency_ms": runner.latency_ms(trained.model, examples[book][0]),
                    "pkm_gate": cell.stats[gate_key] if gate_key is not None else math.nan,
                    "n_examples": cell.examples,
                }
            )
        return rows

    def write(records: list[dict[str, Any]], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Summarise the seeds done so far and (re)write the CSV, JSON and PNG."""
        summary = report.with_baselines(report.summarise(records, ("model", "book"), ("accuracy", "latency_ms", "pkm_gate")), baselines, "book")
        extra = {
            "task": {"num_facts": task.num_facts, "num_values": task.num_values, "context_facts": task.context_facts, "num_queries": task.num_queries,
                     "seq_len": task.seq_len, "table_seed": args.table_seed, "chance": task.chance},
            "baselines": baselines,
            "recall_only": recall_only,
            "gate_stat": GATE_STAT,
            "records": records,
            "paired": report.paired_rows(records, "book", specs),
            "runs": runs,
        }
        csv_path, json_path = report.write_outputs(settings.out, NAME, summary, runner.payload(NAME, settings, specs, counts, extra))
        png = settings.out / f"{NAME}.png"
        plot(png, summary, baselines)
        return summary, [csv_path, json_path, png]

    records, runs = runner.run_grid(console, specs, task, settings, measure, on_seed=write, name=NAME, baselines=baselines)
    summary, paths = write(records, runs)
    report.print_table(
        console,
        f"E3 PKM recall per book: accuracy, latency (batch 1), mean PKM gate (mean ± std over {report.seeds_phrase(records)}; "
        "an accuracy is a claim only where above no-skill)",
        summary,
        ("model", "book"),
        [("accuracy", "accuracy", 3), ("latency ms", "latency_ms", 2), ("mean PKM gate", "pkm_gate", 3)],
    )
    report.print_paired(console, report.paired_rows(records, "book", specs), "book")
    report.report_files(console, paths)
    return 0


def counterfactual_examples(task: Any, n: int) -> list[Any]:
    """The first ``n`` held-out open-book prompts (in index order) whose every answer is counterfactual.

    Raises:
        RecipeError: fewer than ``n`` such prompts among the first 8 * n held-out open prompts (with the default
            ``counterfactual`` 0.5 and 2 questions a quarter of them qualify).
    """
    found = [e for e in runner.eval_set(task, "book", ["open"], 8 * n)["open"] if e.meta["counterfactual"] == task.num_queries][:n]
    if len(found) < n:
        raise runner.RecipeError(
            f"experiment pkm-recall: only {len(found)} of the {n} held-out open-book prompts wanted have every answer counterfactual "
            f"(among the first {8 * n}); the task's counterfactual probability is {task.counterfactual}"
        )
    return found


def recall_only_accuracy(task: Any, examples: list[Any]) -> float:
    """Accuracy of answering every question with the table's value for its subject, whatever the prompt says."""
    correct = total = 0
    for e in examples:
        for t in np.flatnonzero(e.targets != runner.IGNORE_INDEX):
            a, b = int(e.input_ids[t - 1]), int(e.input_ids[t])  # the subject's two tokens, the answer's position is b's
            correct += int(task.table[a - 1, b - 1] == e.targets[t])
            total += 1
    return correct / max(1, total)


def plot(path: Any, summary: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> None:
    """Three panels (accuracy, latency, mean PKM gate), closed and open book side by side per model; the accuracy
    panel marks each book's chance and best no-skill accuracy over that book's bars."""
    plt = report.pyplot()
    models = list(dict.fromkeys(r["model"] for r in summary))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    width = 0.8 / len(BOOKS)
    for ax, (metric, label) in zip(axes, (("accuracy", "held-out accuracy"), ("latency_ms", "latency (ms, batch 1)"), ("pkm_gate", "mean PKM gate")), strict=True):
        positions: dict[str, list[float]] = {}
        for j, book in enumerate(BOOKS):
            rows = [next(r for r in summary if r["model"] == m and r["book"] == book) for m in models]
            xs = [i + (j - (len(BOOKS) - 1) / 2) * width for i in range(len(models))]
            values = [0.0 if math.isnan(r[f"{metric}_mean"]) else r[f"{metric}_mean"] for r in rows]
            errors = [0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"] for r in rows]
            ax.bar(xs, values, width, yerr=errors, capsize=3, label=book if book == "counterfactual" else f"{book} book")
            positions[book] = xs
        if metric == "accuracy":
            report.draw_baselines(ax, baselines, "book", positions, width)
        ax.set_xticks(range(len(models)), models, rotation=15)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[2].set_title("(no PKM: no gate)", fontsize=8)
    fig.suptitle("E3 PKM recall: closed vs open book")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
