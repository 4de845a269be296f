"""E4: a premise far beyond the attention window (paper Fig. 5, "sparse attention captures long-range dependencies").

Every model is trained on :class:`~hydra_kit.data.DistantPremise` with every premise at least ``D`` tokens
before the question (a region of premises of the same form, the asked one any of them, then D - 3 filler
tokens), D drawn per example from ``--distances`` (all longer than Hydra's SGA window except possibly the
first), all at one sequence length (the longest distance plus the region and the questions). By default
every value is stated once per example (``num_values - 1`` distractors), so no value stands out, and every
example asks ``--questions`` (default 8) different premises, each answer scored (with one question per
example no model left chance on the CPU budget: ``docs/calibration/2026-12-05-distant-premise``).

Training starts on a warm-up task (:mod:`hydra_kit.experiments.warmup`; ``--easy-steps``, default 40% of
``--steps`` on the CPU: 400 of 1,000): the same
vocabulary and format with 4 premises back to back and the questions 4 tokens after them, 21 tokens in all
(:data:`EASY_TASK`), then switches to the task above (a :class:`~hydra_kit.callbacks.Curriculum` data
stage). On the 141-token task alone the transformer stayed at chance for 4,000 CPU steps, with 8 questions,
with 8 or 4 premises, with D = 4 and with no filler in the region; on the warm-up task it learns the key
lookup within 300 steps and then answers the full task (the calibration logs). Evaluated per distance on
held-out examples of the full task:

* accuracy at the answer position, beside chance (1 / num_values) and the best no-skill heuristic (the value
  at a fixed offset, the nearest premise's, the most frequent value, ..., see
  :meth:`DistantPremise.heuristics`) scored on the same examples, and whether the model is above it;
* latency: median wall time (ms) of one batch-1 forward over the shortest sequence that holds the premise
  region at distance D (D + region length - 1 tokens), i.e. the cost of looking D tokens back;
* peak memory: peak RSS growth (MB) of that forward in a fresh subprocess (``hydra-kit bench``'s probe),
  measured once per model and distance (it does not depend on the weights).

Compared: Hydra, Hydra without SGA (the ``sga`` instance removed: no attention path at all, so only the SSM,
the workspace and the memories can carry the premise), and a dense transformer of Hydra's total size.

::

    hydra-kit experiment distant-premise                                  # CPU default
    hydra-kit experiment distant-premise --size full --distances 512 1024 2048 4096 8192 --steps 20000   # full (GPU)

Outputs: ``distant_premise.csv`` (model, distance, accuracy/latency_ms/peak_mem_mb mean and std, chance,
best_no_skill, best_no_skill_accuracy, above_no_skill, n_examples, n_seeds), ``distant_premise.json`` (also
every heuristic's accuracy per distance), ``distant_premise.png`` (three panels against distance; dashed on
the accuracy panel: the best no-skill accuracy, dotted: chance).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.experiments import models, report, runner, warmup

NAME = "distant_premise"
DEFAULTS: dict[str, dict[str, Any]] = {
    # distractors None: num_values - 1, every value stated once per example (DistantPremise's default).
    "cpu": {"steps": 1000, "batch_size": 32, "distances": [16, 32, 64], "distractors": None, "num_values": 16, "questions": 8, "easy_fraction": 0.4},
    "full": {"steps": 20000, "batch_size": 16, "distances": [512, 1024, 2048, 4096, 8192], "distractors": None, "num_values": 32, "questions": 8, "lr": 1e-3, "easy_fraction": 0.05},
}
# The warm-up task of the curriculum (--easy-steps): 4 premises back to back, 4 tokens before the questions, so
# a sequence is 21 tokens long. On the full task (16 premises in 141 tokens) the transformer stayed at chance for
# 4,000 CPU steps; after 300 steps here it answers the full task too (docs/calibration/2026-12-05-distant-premise).
EASY_TASK = {"distance": 4, "num_distractors": 3, "num_questions": 4, "region_len": 12}


def main(argv: list[str], console: Console) -> int:
    """Premise D tokens before the question: accuracy, latency and peak memory against D for three models."""
    from hydra_kit.data import DistantPremise

    parser = ArgumentParser(prog="hydra-kit experiment distant-premise", description=main.__doc__)
    runner.add_common_arguments(parser)
    parser.add_argument("--distances", type=int, nargs="+", default=None, help="premise-to-question distances D (tokens)")
    parser.add_argument("--distractors", type=int, default=None, help="distractor premises per example (default: every value stated once)")
    parser.add_argument("--questions", type=int, default=None, help="questions per example, each about a different premise (default 8, or every premise if fewer)")
    warmup.add_argument(parser, "4 premises back to back, D = 4, 21 tokens; default 40%% of --steps on the CPU, 5%% at full size")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    settings = runner.resolve_settings(args, NAME, DEFAULTS)
    d = DEFAULTS[settings.size]
    distances = sorted(set(args.distances or d["distances"]))
    distractors = args.distractors if args.distractors is not None else d["distractors"]
    if distractors is None:
        distractors = d["num_values"] - 1
    num_keys, questions = max(32, distractors + 1), args.questions or min(d["questions"], distractors + 1)
    shape = {"num_distractors": distractors, "num_keys": num_keys, "num_values": d["num_values"], "num_questions": questions}
    task = runner.build_task(DistantPremise, distance=distances, **shape)
    easy_task = dict(EASY_TASK, num_questions=min(EASY_TASK["num_questions"], questions))
    easy_steps = warmup.set_stages("distant-premise", settings, args.easy_steps, d["easy_fraction"], task, easy_task)
    console.print(
        f"[bold]E4 distant premise[/]: distances {distances}, {distractors} distractor premises in a region of {task.region_len} tokens, "
        f"{questions} questions per example, "
        f"length {task.seq_len}; {settings.seeds} seeds, {settings.steps} steps"
        f"{f' (the first {easy_steps} on the 21-token warm-up task)' if easy_steps else ''}, {settings.eval_per_level} held-out examples per distance"
    )
    examples = runner.eval_set(task, "distance", distances, settings.eval_per_level)
    baselines = report.baseline_rows(task, examples, "distance")
    report.print_baselines(console, "no-skill baselines per distance (held-out accuracy; bold: the best)", baselines, "distance")
    # The shortest sequence holding each distance: what a model pays to look D tokens back.
    probes = {D: DistantPremise(distance=D, **shape) for D in distances}
    probe_examples = {D: t.sample(runner.EVAL_SEED, "val", 0) for D, t in probes.items()}
    hydra = models.hydra_config(settings.size, task.vocab_size, settings.recipe)
    sga_names = [n for n, s in hydra["components"].items() if s.get("component") in ("sga", "SparseGlobalAttention")]
    if not sga_names:
        raise runner.RecipeError("experiment distant-premise: the Hydra recipe has no sga component instance to study")
    window = (hydra["components"][sga_names[0]].get("args") or {}).get("window", 256)
    transformer, _ = models.dense_transformer(hydra)
    specs = [
        models.ModelSpec("hydra", hydra, f"full layout, SGA window {window}"),
        models.ModelSpec("hydra - sga", models.without(hydra, *sga_names), "sga instance removed"),
        models.ModelSpec("transformer", transformer, "dense attention + SwiGLU, total params matched", lr=settings.transformer_lr),
    ]
    counts = runner.describe_models(console, specs)
    memory: dict[tuple[str, int], float | None] = {}

    def measure(trained: runner.TrainedModel, spec: models.ModelSpec, seed: int) -> list[dict[str, Any]]:
        rows = []
        for D in distances:
            cell = runner.evaluate(trained.model, examples[D])
            if args.memory and (spec.label, D) not in memory:
                memory[(spec.label, D)] = runner.peak_memory_mb(spec.config, probes[D].seq_len)
            rows.append(
                {
                    "distance": D,
                    "accuracy": cell.accuracy,
                    "latency_ms": runner.latency_ms(trained.model, probe_examples[D]),
                    "probe_seq_len": probes[D].seq_len,
                    "peak_mem_mb": memory.get((spec.label, D)) if args.memory else None,
                    "n_examples": cell.examples,
                }
            )
        return rows

    def write(records: list[dict[str, Any]], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Summarise the seeds done so far and (re)write the CSV, JSON and PNG."""
        summary = report.with_baselines(report.summarise(records, ("model", "distance"), ("accuracy", "latency_ms", "peak_mem_mb")), baselines, "distance")
        extra = {
            "task": {"easy_steps": easy_steps, "easy_task": easy_task if easy_steps else None, "distances": distances, "distractors": distractors, "num_keys": num_keys, "num_values": d["num_values"], "questions": questions, "seq_len": task.seq_len,
                     "region_len": task.region_len, "sga_window": window, "chance": task.chance},
            "baselines": baselines,
            "records": records,
            "paired": report.paired_rows(records, "distance", specs),
            "runs": runs,
        }
        csv_path, json_path = report.write_outputs(settings.out, NAME, summary, runner.payload(NAME, settings, specs, counts, extra))
        png = settings.out / f"{NAME}.png"
        plot(png, summary, window, baselines)
        return summary, [csv_path, json_path, png]

    records, runs = runner.run_grid(console, specs, task, settings, measure, on_seed=write, name=NAME, baselines=baselines)
    summary, paths = write(records, runs)
    report.print_table(
        console,
        f"E4 distant premise: held-out accuracy, latency and peak memory against distance (SGA window {window}; mean ± std over "
        f"{report.seeds_phrase(records)}; an accuracy is a claim only where above no-skill)",
        summary,
        ("model", "distance"),
        [("accuracy", "accuracy", 3), ("latency ms", "latency_ms", 2), ("peak MB", "peak_mem_mb", 1)],
    )
    report.print_paired(console, report.paired_rows(records, "distance", specs), "distance")
    report.report_files(console, paths)
    return 0


def plot(path: Any, summary: list[dict[str, Any]], window: int, baselines: list[dict[str, Any]]) -> None:
    """Accuracy, latency and peak memory against distance, one line per model; the SGA window and, on the
    accuracy panel, chance and the best no-skill accuracy marked."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("accuracy", "held-out accuracy"), ("latency_ms", "latency (ms, batch 1, length D + 2)"), ("peak_mem_mb", "peak memory (MB)"))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for model in dict.fromkeys(r["model"] for r in summary):
            rows = sorted((r for r in summary if r["model"] == model), key=lambda r: r["distance"])
            ax.errorbar([r["distance"] for r in rows], [r[f"{metric}_mean"] for r in rows], yerr=[r[f"{metric}_std"] for r in rows], marker="o", capsize=3, label=model)
        ax.axvline(window, color="gray", linestyle=":", label=f"SGA window {window}")
        if metric == "accuracy":
            report.draw_baselines(ax, baselines, "distance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("premise distance D (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("E4 distant premise")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
