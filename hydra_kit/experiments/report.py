"""How ``hydra-kit experiment`` reports: mean and spread over seeds, rich tables, CSV/JSON files, figures.

Numbers are aggregated, never adjusted: a cell's mean and sample standard deviation come from the per-seed
records as measured (:func:`hydra_kit.reporting.mean_spread`: one seed has no spread), and missing measurements
stay missing ("-" in tables, empty cells in CSV, null in JSON).

Every accuracy is reported beside what needs no skill: chance and the best of the task's no-skill
heuristics (:meth:`~hydra_kit.data.SyntheticTask.heuristics`), scored on the same held-out examples per level
(:func:`baseline_rows`). :func:`with_baselines` adds them to each summary row with ``above_no_skill``: "yes"
only when the model's accuracy, mean minus one standard deviation over seeds, exceeds the best no-skill
accuracy p by more than two standard errors of p on the n held-out examples, 2 sqrt(p (1 - p) / n) (so 20
examples cannot make a claim of one lucky answer). That column is computed, never asserted: a cell is a claim
only where it says "yes".

Models are compared the same way: :func:`paired_rows` pairs the first model (the full Hydra) with every other one
seed by seed (same seed, same held-out examples) and gives Student's paired t, its two-sided p and the number of
seeds each is ahead in. Its verdict says "ahead" or "behind" only where p, Holm-adjusted over all the table's
comparisons, is below 0.05; otherwise "no difference shown".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hydra_kit.data.task import Example, SyntheticTask, best_no_skill
from hydra_kit.experiments.models import ModelSpec
from hydra_kit.reporting import PairedTest, fmt, holm, mean_spread, paired_test, pyplot, write_csv, write_json

__all__ = [
    "BASELINE_COLUMNS", "above", "baseline_rows", "draw_baselines", "errorbar_plot", "paired_rows", "print_baselines", "print_paired",
    "print_table", "pyplot", "report_files", "seeds_phrase", "summarise", "with_baselines", "write_outputs",
]

#: The columns :func:`with_baselines` adds to a summary row.
BASELINE_COLUMNS = ("chance", "best_no_skill", "best_no_skill_accuracy", "above_no_skill")


def summarise(records: list[dict[str, Any]], group: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per ``group`` value (e.g. model, level): ``<metric>_mean``, ``<metric>_std``, ``n_seeds``.

    ``n_examples`` (examples per seed in the cell) is carried over when the records have it.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    rows = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(group, key, strict=True))
        for m in metrics:
            mean, std = mean_spread(r.get(m) for r in rs)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        if "n_examples" in rs[0]:
            row["n_examples"] = rs[0]["n_examples"]
        row["n_seeds"] = len({r["seed"] for r in rs})
        rows.append(row)
    return rows


def seeds_phrase(records: Sequence[Mapping[str, Any]]) -> str:
    """How many seeds a table's means are over: "3 seeds", or per model when models differ (a partial or merged run).

    >>> seeds_phrase([{"model": "a", "seed": 0}, {"model": "a", "seed": 1}, {"model": "b", "seed": 0}])
    'seeds per model: a 2, b 1'
    """
    per_model: dict[str, set[Any]] = {}
    for record in records:
        per_model.setdefault(str(record["model"]), set()).add(record["seed"])
    counts = {model: len(seeds) for model, seeds in per_model.items()}
    if len(set(counts.values())) <= 1:
        n = next(iter(counts.values()), 0)
        return f"{n} seed{'' if n == 1 else 's'}"
    return "seeds per model: " + ", ".join(f"{model} {n}" for model, n in counts.items())


def baseline_rows(
    task_or_tasks: SyntheticTask | Mapping[Any, SyntheticTask], examples_per_level: Mapping[Any, Sequence[Example]], level_key: str
) -> list[dict[str, Any]]:
    """Chance and every no-skill heuristic's accuracy per level, on the held-out examples the models are scored on.

    Args:
        task_or_tasks: the task whose heuristics are scored (the training instance: what a model trained on it
            could have learnt), or one task per level where each level is its own instance (MQAR's pairs).
        examples_per_level: level -> its held-out examples (e.g. :func:`hydra_kit.experiments.runner.eval_set`).
        level_key: the name of the level column (``"hops"``, ``"book"``, ...).

    Returns:
        One row per level: ``{level_key: level, "chance", "best_no_skill" (name), "best_no_skill_accuracy",
        "baselines" ({name: accuracy}, chance included), "n_examples"}``.
    """
    rows = []
    for level, examples in examples_per_level.items():
        task = task_or_tasks[level] if isinstance(task_or_tasks, Mapping) else task_or_tasks
        scores = task.no_skill_baselines(examples)
        name, accuracy = best_no_skill(scores)
        rows.append({level_key: level, "chance": scores["chance"], "best_no_skill": name, "best_no_skill_accuracy": accuracy, "baselines": scores, "n_examples": len(examples)})
    return rows


def above(mean: float, std: float, baseline: float, n_examples: int) -> str:
    """Whether an accuracy is a claim: "yes" if mean - std (over seeds; nothing subtracted for one seed, which has no spread) exceeds ``baseline``
    by more than two of its standard errors on ``n_examples``, "no" if not, "-" if unmeasured."""
    if math.isnan(mean) or math.isnan(baseline) or n_examples <= 0:
        return "-"
    margin = 2.0 * math.sqrt(baseline * (1.0 - baseline) / n_examples)
    return "yes" if mean - (0.0 if math.isnan(std) else std) > baseline + margin else "no"


def with_baselines(
    summary: list[dict[str, Any]], baselines: list[dict[str, Any]], level_key: str, metric: str = "accuracy", pooled: Mapping[Any, str] | None = None
) -> list[dict[str, Any]]:
    """The summary rows with :data:`BASELINE_COLUMNS` added, matched on ``level_key``.

    Args:
        summary: rows of :func:`summarise` (``<metric>_mean`` and ``<metric>_std``).
        baselines: rows of :func:`baseline_rows`.
        level_key: the level column both share.
        metric: the accuracy metric compared with the baseline.
        pooled: levels that pool others (e.g. E5's domain ``"all"``, the mean over domains) -> a name; such a row
            gets the mean of the per-level chance and best accuracies (a heuristic may pick per level, as it
            reads the input), named ``"<name>"``, over all their examples.

    Rows whose level has no baseline get NaN and "-". ``above_no_skill`` is :func:`above`.
    """
    by_level = {b[level_key]: b for b in baselines}
    out = []
    for row in summary:
        level = row[level_key]
        if level in by_level:
            b = by_level[level]
            chance, name, best, n = b["chance"], b["best_no_skill"], b["best_no_skill_accuracy"], b["n_examples"]
        elif pooled is not None and level in pooled and baselines:
            chance = statistics.fmean(b["chance"] for b in baselines)
            name, best = pooled[level], statistics.fmean(b["best_no_skill_accuracy"] for b in baselines)
            n = sum(b["n_examples"] for b in baselines)
        else:
            chance, name, best, n = math.nan, "-", math.nan, 0
        claim = above(row.get(f"{metric}_mean", math.nan), row.get(f"{metric}_std", math.nan), best, n)
        out.append({**row, "chance": chance, "best_no_skill": name, "best_no_skill_accuracy": best, "above_no_skill": claim})
    return out


def paired_rows(records: Sequence[Mapping[str, Any]], level_key: str, specs: Sequence[ModelSpec], metric: str = "accuracy") -> list[dict[str, Any]]:
    """The first of ``specs`` against each later one, per level, paired by seed (:func:`hydra_kit.reporting.paired_test`).

    Args:
        records: per-seed records with ``model``, ``seed``, ``level_key`` and ``metric``.
        level_key: the level column (``"hops"``, ``"book"``, ...).
        specs: the experiment's models in its order (the full Hydra first); models without records are left out.
        metric: the metric compared.

    Returns:
        One row per (other model, level): ``model`` (the first), ``versus``, the level, ``metric``, ``n_seeds``
        (seeds both have), ``mean_difference`` (first - versus), ``std_difference``, ``differences`` ({seed:
        difference}), ``t``, ``p``, ``p_holm`` (``p`` adjusted by :func:`hydra_kit.reporting.holm` over every row
        with a t), ``ahead``, ``behind`` (seeds the first is above, below) and ``verdict`` (on ``p_holm``).
    """
    present = {str(r["model"]) for r in records}
    chosen = [s.label for s in specs if s.label in present]
    if len(chosen) < 2 or chosen[0] != specs[0].label:
        return []
    reference = chosen[0]
    value = {(str(r["model"]), r[level_key], r["seed"]): r.get(metric) for r in records}
    levels = list(dict.fromkeys(r[level_key] for r in records))
    rows: list[dict[str, Any]] = []
    tests: list[tuple[PairedTest, str]] = []
    for other in chosen[1:]:
        for level in levels:
            seeds = sorted({s for (m, lv, s) in value if m == reference and lv == level} & {s for (m, lv, s) in value if m == other and lv == level})
            differences = {}
            for seed in seeds:
                a, b = value[(reference, level, seed)], value[(other, level, seed)]
                differences[seed] = None if a is None or b is None else float(a) - float(b)
            test = paired_test(differences.values())
            tests.append((test, other))
            rows.append({
                "model": reference, "versus": other, level_key: level, "metric": metric, "n_seeds": test.n,
                "mean_difference": test.mean, "std_difference": test.std, "differences": differences,
                "t": test.t, "p": test.p, "ahead": test.ahead, "behind": test.behind,
            })
    # Every level of every pair is one family: eight hop counts would otherwise give a false "ahead" in a third of
    # the tables by chance alone. A test without a t (all differences 0) is not part of it.
    in_family = [test.p if not math.isnan(test.t) else math.nan for test, _ in tests]
    for row, (test, other), adjusted in zip(rows, tests, holm(in_family), strict=True):
        row["p_holm"] = test.p if math.isnan(adjusted) else adjusted
        row["verdict"] = test.verdict(reference, other, p=row["p_holm"])
    return rows


def print_paired(console: Console, rows: Sequence[Mapping[str, Any]], level_key: str) -> None:
    """The rows of :func:`paired_rows` as a rich table: per-seed differences, mean, t, p, seeds ahead, verdict."""
    if not rows:
        return
    metric = rows[0]["metric"]
    table = Table(title=f"paired by seed: difference in {metric} (first - second model), Student's paired t; \"ahead\" or \"behind\" only at two-sided p < 0.05 after Holm's adjustment over the table")
    for column in ("comparison", level_key, "per seed", "mean difference", "t", "p", "p (Holm)", "ahead in", "verdict"):
        table.add_column(column, justify="left" if column in ("comparison", "per seed", "verdict") else "right")

    def number(x: float, spec: str) -> str:
        return "-" if math.isnan(x) else format(x, spec)

    for row in rows:
        per_seed = " / ".join("-" if d is None else format(d, "+.3f") for d in row["differences"].values())
        table.add_row(
            f"{row['model']} vs {row['versus']}", str(row[level_key]), per_seed or "-", number(row["mean_difference"], "+.3f"),
            number(row["t"], ".2f"), number(row["p"], ".3f"), number(row["p_holm"], ".3f"), f"{row['ahead']} of {row['n_seeds']}", row["verdict"],
        )
    console.print(table)


def print_table(console: Console, title: str, rows: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[tuple[str, str, int]]) -> None:
    """A rich table: the key columns, then each metric as mean ± std (label, name, digits).

    Rows that carry :data:`BASELINE_COLUMNS` (:func:`with_baselines`) get "chance", "best no-skill" (accuracy
    and heuristic) and "above no-skill" after the metrics.
    """
    table = Table(title=title)
    for k in keys:
        table.add_column(k)
    for label, _, _ in metrics:
        table.add_column(label, justify="right")
    baselined = bool(rows) and all(c in rows[0] for c in BASELINE_COLUMNS)
    if baselined:
        table.add_column("chance", justify="right")
        table.add_column("best no-skill", justify="right")
        table.add_column("above no-skill", justify="center")
    extra = [c for c in ("n_examples", "n_seeds") if rows and c in rows[0]]
    for c in extra:
        table.add_column(c, justify="right")
    for row in rows:
        cells = [str(row[k]) for k in keys]
        cells += [fmt(row[f"{name}_mean"], row[f"{name}_std"], f".{digits}f") for _, name, digits in metrics]
        if baselined:
            best = row["best_no_skill_accuracy"]
            cells += ["-" if math.isnan(row["chance"]) else f"{row['chance']:.3f}", "-" if math.isnan(best) else f"{best:.3f} ({row['best_no_skill']})", row["above_no_skill"]]
        cells += [str(row[c]) for c in extra]
        table.add_row(*cells)
    console.print(table)


def print_baselines(console: Console, title: str, baselines: list[dict[str, Any]], level_key: str) -> None:
    """Every no-skill heuristic's accuracy per level (rows of :func:`baseline_rows`), the best marked."""
    names = list(dict.fromkeys(name for b in baselines for name in b["baselines"]))
    table = Table(title=title)
    table.add_column(level_key)
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("n_examples", justify="right")
    for b in baselines:
        cells = [str(b[level_key])]
        for name in names:
            value = b["baselines"].get(name)
            text = "-" if value is None else f"{value:.3f}"
            cells.append(f"[bold]{text}[/]" if name == b["best_no_skill"] else text)
        table.add_row(*cells, str(b["n_examples"]))
    console.print(table)


def write_outputs(out: Path, name: str, summary: list[dict[str, Any]], payload: dict[str, Any]) -> tuple[Path, Path]:
    """``<name>.csv`` (the summary rows) and ``<name>.json`` (payload plus the summary) in ``out``."""
    csv_path = write_csv(out / f"{name}.csv", summary)
    json_path = write_json(out / f"{name}.json", {**payload, "summary": summary})
    return csv_path, json_path


def draw_baselines(
    ax: Any, baselines: list[dict[str, Any]], level_key: str, positions: Mapping[Any, float | Sequence[float]] | None = None, width: float = 0.8
) -> None:
    """Chance (dotted) and the best no-skill accuracy (dashed) per level on ``ax``.

    Numeric levels are joined by lines along the x axis (a single level gets a horizontal line); categorical ones (``positions``: level -> the x of its
    bar, or of each of its bars) get a segment of ``width`` over each bar.
    """
    if not baselines:
        return
    styles = (("chance", "chance", {"color": "gray", "linestyle": ":", "linewidth": 1.2}),
              ("best_no_skill_accuracy", "best no-skill", {"color": "black", "linestyle": "--", "linewidth": 1.2}))
    for key, label, style in styles:
        if positions is None and len(baselines) == 1:  # one level: a line through one point would not show
            ax.axhline(baselines[0][key], label=label, **style)
            continue
        if positions is None:
            rows = sorted(baselines, key=lambda b: b[level_key])
            ax.plot([b[level_key] for b in rows], [b[key] for b in rows], label=label, **style)
            continue
        first = True
        for b in baselines:
            where = positions.get(b[level_key])
            for x in [] if where is None else [where] if isinstance(where, (int, float)) else where:
                ax.hlines(b[key], x - width / 2, x + width / 2, label=label if first else None, **style)
                first = False


def errorbar_plot(
    path: Path, summary: list[dict[str, Any]], x_key: str, metric: str, ylabel: str, title: str, xlabel: str | None = None, logx: bool = False,
    baselines: list[dict[str, Any]] | None = None,
) -> None:
    """One line per model: ``metric`` mean with std error bars against ``x_key``; ``baselines`` (rows of
    :func:`baseline_rows`) drawn as dashed lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = sorted((r for r in summary if r["model"] == model), key=lambda r: r[x_key])
        ax.errorbar([r[x_key] for r in rows], [r[f"{metric}_mean"] for r in rows], yerr=[r[f"{metric}_std"] for r in rows], marker="o", capsize=3, label=model)
    draw_baselines(ax, baselines or [], x_key)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel or x_key)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_files(console: Console, paths: Sequence[Path]) -> None:
    console.print("wrote " + "  ".join(str(p) for p in paths))
