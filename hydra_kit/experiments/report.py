"""How ``hydra-kit experiment`` reports: mean and spread over seeds, rich tables, CSV/JSON files, figures.

Numbers are aggregated, never adjusted: a cell's mean and sample standard deviation come from the per-seed
records as measured, and missing measurements stay missing ("-" in tables, NaN in files).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hydra_kit.recipe import RecipeError


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 denominator; 0 for a single value)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


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
            mean, std = mean_std(r.get(m) for r in rs)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        if "n_examples" in rs[0]:
            row["n_examples"] = rs[0]["n_examples"]
        row["n_seeds"] = len({r["seed"] for r in rs})
        rows.append(row)
    return rows


def fmt(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def print_table(console: Console, title: str, rows: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[tuple[str, str, int]]) -> None:
    """A rich table: the key columns, then each metric as mean ± std (label, name, digits)."""
    table = Table(title=title)
    for k in keys:
        table.add_column(k)
    for label, _, _ in metrics:
        table.add_column(label, justify="right")
    extra = [c for c in ("n_examples", "n_seeds") if rows and c in rows[0]]
    for c in extra:
        table.add_column(c, justify="right")
    for row in rows:
        cells = [str(row[k]) for k in keys]
        cells += [fmt(row[f"{name}_mean"], row[f"{name}_std"], digits) for _, name, digits in metrics]
        cells += [str(row[c]) for c in extra]
        table.add_row(*cells)
    console.print(table)


def write_outputs(out: Path, name: str, summary: list[dict[str, Any]], payload: dict[str, Any]) -> tuple[Path, Path]:
    """``<name>.csv`` (the summary rows) and ``<name>.json`` (payload plus the summary) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    json_path.write_text(json.dumps({**payload, "summary": summary}, indent=2, default=str), encoding="utf-8")
    return csv_path, json_path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display).

    Raises:
        RecipeError: matplotlib is not installed (it comes with the ``dev`` and ``plots`` extras).
    """
    try:
        import matplotlib
    except ImportError:
        raise RecipeError("experiment figures need matplotlib: pip install 'hydra-kit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def errorbar_plot(
    path: Path, summary: list[dict[str, Any]], x_key: str, metric: str, ylabel: str, title: str, xlabel: str | None = None, logx: bool = False,
) -> None:
    """One line per model: ``metric`` mean with std error bars against ``x_key``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = sorted((r for r in summary if r["model"] == model), key=lambda r: r[x_key])
        ax.errorbar([r[x_key] for r in rows], [r[f"{metric}_mean"] for r in rows], yerr=[r[f"{metric}_std"] for r in rows], marker="o", capsize=3, label=model)
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
