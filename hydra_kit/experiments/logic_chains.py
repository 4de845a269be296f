"""E1: multi-step logical composition with length generalisation (paper Fig. 2, the "10x" claim).

Every model is trained on :class:`~hydra_kit.data.LogicChains` with proof lengths 1..``--train-hops`` (default
4) and evaluated on held-out chains of 1..``--test-hops`` (default 8) hops, built with the same node
vocabulary, chains and branches (the same prompts; only the query differs), so hops 5..8 measure length
generalisation. A training example asks ``--queries`` questions of its facts (default 8, each from another
start node with its own length; the first is the one a held-out example asks), a held-out example one.
Training supervises every ``HOP`` of a query (the ``i``-th ``HOP``'s target is the node ``i`` hops on, never
in the input; ``--last-hop-only`` trains on the last as the paper's task states it); evaluation scores the
last ``HOP`` only. Compared: Hydra, Hydra without its workspace memory (the recipe's
``workspace`` instance removed) and a dense transformer with Hydra's total parameter count (within 5 percent).

Beside every model the table prints, per proof length, chance (1 / num_nodes) and the best no-skill
heuristic of the training task (most frequent node, chain end, ..., see :meth:`LogicChains.heuristics`) scored
on the same held-out examples, and whether the model is above it. At one hop the "one hop" heuristic *is*
the rule, so that row can never be a claim: it is the control, composition starts at two.

::

    hydra-kit experiment logic-chains                                   # CPU default (hours: run seeds in parallel, --first-seed)
    hydra-kit experiment logic-chains --size full --steps 20000 --num-nodes 64 --distractors 16   # full (GPU)

Outputs: ``logic_chains.csv`` (model, hops, accuracy mean/std over seeds, chance, best_no_skill (its name),
best_no_skill_accuracy, above_no_skill, n_examples, n_seeds), ``logic_chains.json`` (also every heuristic's
accuracy per hop count) and ``logic_chains.png`` (accuracy against proof length; dashed: the best no-skill
baseline, dotted: chance and the longest trained length).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.experiments import models, report, runner, warmup

NAME = "logic_chains"
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"steps": 8000, "batch_size": 32, "num_nodes": 32, "distractors": 8, "train_hops": 4, "test_hops": 8, "queries": 8, "easy_steps": [1500, 5000], "easy_fraction": 0.4, "rehearse": 0.25},
    "full": {"steps": 20000, "batch_size": 64, "num_nodes": 64, "distractors": 16, "train_hops": 4, "test_hops": 8, "queries": 8, "lr": 1e-3, "easy_fraction": 0.05, "rehearse": 0.25},
}
# The warm-up tasks (--easy-steps, :mod:`hydra_kit.experiments.warmup`; on the CPU 1,500 and 5,000 steps, from the
# calibration in docs/calibration/2026-12-05-distant-premise): one hop over two 2-node chains and no branch, every
# node asked (4 facts, 4 queries, 24 tokens), then exactly 2 hops over two 4-node chains and 2 branches (10 facts,
# 8 queries, 62 tokens); then the task itself. The second asks two hops in every query because with a mix of one-
# and two-hop queries the transformer never left the plateau of "answer one hop, guess the second" (8,000 steps),
# and it is small because on four 4-node chains it left that plateau within 3,500 steps in 1 seed of 3, on this
# task in all 3 (after 1,500-3,000 steps). Composition learned there carries over to the full task at once, in
# most seeds; in one of three (transformer, seed 2) the first full-task batches drove the model to uniform
# predictions (loss ln 32 within 50 steps) and it never recovered. With a quarter of the batches after the switch
# still drawn from the two-hop task (--rehearse 0.25, Curriculum ``rehearse``), the same model, from the same
# step-6,400 checkpoint, answered one hop 1.000 and two hops 0.92 within 300 steps.
EASY_TASKS = (
    {"min_hops": 1, "max_hops": 1, "num_chains": 2, "chain_len": 2, "num_distractors": 0, "seq_len": None, "num_queries": 4},
    {"min_hops": 2, "max_hops": 2, "num_chains": 2, "chain_len": 4, "num_distractors": 2, "num_queries": 8},
)


def main(argv: list[str], console: Console) -> int:
    """Train on 1..4-hop chains, test on 1..8 hops: accuracy per proof length, Hydra +- workspace vs transformer."""
    from hydra_kit.data import LogicChains

    parser = ArgumentParser(prog="hydra-kit experiment logic-chains", description=main.__doc__)
    runner.add_common_arguments(parser)
    parser.add_argument("--num-nodes", type=int, default=None, help="node vocabulary size")
    parser.add_argument("--distractors", type=int, default=None, help="branch facts (~>) per example, besides the closed chains")
    parser.add_argument("--train-hops", type=int, default=None, help="longest proof length in training")
    parser.add_argument("--test-hops", type=int, default=None, help="longest proof length evaluated")
    parser.add_argument("--queries", type=int, default=None, help="questions per training example, each from another start node (held-out examples ask one)")
    warmup.add_argument(parser, "1 hop among 4 facts, then 2 hops among 10; default 1500 5000 on the CPU, 5%% of --steps at full size")
    parser.add_argument(
        "--rehearse", type=float, default=None,
        help="share of the batches after the warm-up still drawn from the last warm-up task (default 0.25; 0: none)",
    )
    parser.add_argument("--last-hop-only", dest="every_hop", action="store_false", help="train on the last HOP's target only (default: every HOP's)")
    args = parser.parse_args(argv)
    settings = runner.resolve_settings(args, NAME, DEFAULTS)
    d = DEFAULTS[settings.size]
    num_nodes = args.num_nodes or d["num_nodes"]
    distractors = args.distractors if args.distractors is not None else d["distractors"]
    train_hops, test_hops = args.train_hops or d["train_hops"], args.test_hops or d["test_hops"]
    if test_hops < train_hops:
        raise runner.RecipeError(f"experiment logic-chains: --test-hops ({test_hops}) must be at least --train-hops ({train_hops})")
    queries = args.queries or d["queries"]
    # The same facts either way (one prompt distribution, split by a hash of the facts); training asks more of them.
    test_task = runner.build_task(LogicChains, num_nodes=num_nodes, min_hops=1, max_hops=test_hops, num_distractors=distractors)
    seq_len = test_task.seq_len
    train_task = runner.build_task(
        LogicChains, num_nodes=num_nodes, min_hops=1, max_hops=train_hops, num_distractors=distractors, supervise_every_hop=args.every_hop, num_queries=queries
    )
    # The size's calibrated counts where they fit in --steps; in a shorter run its share of --steps.
    default_easy = d.get("easy_steps") if sum(d.get("easy_steps", [])) < settings.steps else None
    easy = args.easy_steps if args.easy_steps is not None else default_easy
    rehearse = args.rehearse if args.rehearse is not None else d["rehearse"]
    easy_steps = warmup.set_stages("logic-chains", settings, easy, d["easy_fraction"], train_task, *EASY_TASKS, rehearse=rehearse)
    levels = list(range(1, test_hops + 1))
    console.print(
        f"[bold]E1 logic chains[/]: train hops 1..{train_hops}, test hops 1..{test_hops}, {num_nodes} nodes, {distractors} distractors, "
        f"length {seq_len} ({train_task.seq_len} with {queries} queries in training), training targets at {'every HOP' if args.every_hop else 'the last HOP'}; {settings.seeds} seeds, {settings.steps} steps"
        f"{f' (the first {easy_steps} on the warm-up tasks' + (f', then {rehearse:.0%} of batches still on the last' if rehearse else '') + ')' if easy_steps else ''}, {settings.eval_per_level} held-out examples per hop count"
    )
    examples = runner.eval_set(test_task, "hops", levels, settings.eval_per_level)
    # What a model trained on train_task could learn without following edges, scored on the same examples.
    baselines = report.baseline_rows(train_task, examples, "hops")
    report.print_baselines(console, "no-skill baselines per proof length (held-out accuracy; bold: the best)", baselines, "hops")
    hydra = models.hydra_config(settings.size, train_task.vocab_size, settings.recipe)
    transformer, _ = models.dense_transformer(hydra)
    specs = [
        models.ModelSpec("hydra", hydra, "full layout"),
        models.ModelSpec("hydra - workspace", models.without(hydra, "workspace"), "workspace instance removed"),
        models.ModelSpec("transformer", transformer, "attention + SwiGLU, total params matched", lr=settings.transformer_lr),
    ]
    counts = runner.describe_models(console, specs)

    def measure(trained: runner.TrainedModel, spec: models.ModelSpec, seed: int) -> list[dict[str, Any]]:
        rows = []
        for hops in levels:
            cell = runner.evaluate(trained.model, examples[hops])
            rows.append({"hops": hops, "accuracy": cell.accuracy, "n_examples": cell.examples, "trained_length": hops <= train_hops})
        return rows

    def write(records: list[dict[str, Any]], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Summarise the seeds done so far and (re)write the CSV, JSON and PNG."""
        summary = report.with_baselines(report.summarise(records, ("model", "hops"), ("accuracy",)), baselines, "hops")
        extra = {
            "task": {"num_nodes": num_nodes, "distractors": distractors, "num_chains": test_task.num_chains, "chain_len": test_task.chain_len,
                     "easy_steps": easy_steps, "easy_tasks": list(EASY_TASKS) if easy_steps else None, "rehearse": rehearse if easy_steps else 0.0,
                     "train_hops": train_hops, "test_hops": test_hops, "seq_len": seq_len, "train_seq_len": train_task.seq_len, "queries": queries,
                     "supervise_every_hop": args.every_hop, "chance": test_task.chance},
            "baselines": baselines,
            "records": records,
            "paired": report.paired_rows(records, "hops", specs),
            "runs": runs,
        }
        csv_path, json_path = report.write_outputs(settings.out, NAME, summary, runner.payload(NAME, settings, specs, counts, extra))
        png = settings.out / f"{NAME}.png"
        plot(png, summary, train_hops, baselines)
        return summary, [csv_path, json_path, png]

    records, runs = runner.run_grid(console, specs, train_task, settings, measure, on_seed=write, name=NAME, baselines=baselines)
    summary, paths = write(records, runs)
    title = f"E1 logic chains: held-out accuracy per proof length (trained on 1..{train_hops}; mean ± std over {report.seeds_phrase(records)}; a claim only where above no-skill)"
    report.print_table(console, title, summary, ("model", "hops"), [("accuracy", "accuracy", 3)])
    report.print_paired(console, report.paired_rows(records, "hops", specs), "hops")
    report.report_files(console, paths)
    return 0


def plot(path: Any, summary: list[dict[str, Any]], train_hops: int, baselines: list[dict[str, Any]]) -> None:
    """Accuracy against proof length per model, the trained range and the no-skill baselines marked (Fig. 2, honestly)."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = sorted((r for r in summary if r["model"] == model), key=lambda r: r["hops"])
        ax.errorbar([r["hops"] for r in rows], [r["accuracy_mean"] for r in rows], yerr=[r["accuracy_std"] for r in rows], marker="o", capsize=3, label=model)
    ax.axvline(train_hops + 0.5, color="gray", linestyle=":", label=f"trained on 1..{train_hops}")
    report.draw_baselines(ax, baselines, "hops")
    for b in baselines:
        if b["best_no_skill"] == "one hop" and b["hops"] == 1:
            ax.annotate("one hop: the rule at L = 1", (1, b["best_no_skill_accuracy"]), textcoords="offset points", xytext=(8, -12), fontsize=8)
    ax.set_xlabel("proof length (hops)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("E1 logic chains: accuracy vs proof length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
