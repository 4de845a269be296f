"""How hydra-kit reports numbers: mean and spread over runs, rich tables, CSV and JSON files, figures.

One module for ``hydra-kit ablate``, ``hydra-kit experiment`` and ``hydra-kit bench``, so that the same
measurements are aggregated, printed and written the same way everywhere.

Numbers are aggregated, never adjusted. A missing measurement stays missing: NaN in memory and in files
(``nan`` in CSV, ``NaN`` in JSON, which Python's ``json`` reads back), ``-`` in tables.

The spread is the sample standard deviation (n - 1 denominator). **For fewer than two values it is undefined
and is NaN**: one seed measures no spread, so tables print the mean without ``±``, files hold NaN, figures
draw no error bar, and a claim that subtracts the spread (``experiments.report.above``) subtracts nothing.
Every caller reads the spread through :func:`mean_spread`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hydra_kit.errors import RecipeError

__all__ = ["PairedTest", "console", "fmt", "holm", "is_missing", "mean_spread", "paired_test", "print_table", "pyplot", "t_two_sided_p", "write_csv", "write_json"]


def is_missing(value: Any) -> bool:
    """Whether ``value`` is a missing measurement: None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def mean_spread(values: Iterable[float | int | None]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1 denominator) of the measured values.

    Missing values (None, NaN) and infinities are left out. With no value left both are NaN; with one value the
    spread is NaN (undefined: one run measures no spread; see the module docstring).

    >>> mean_spread([1.0, 3.0])
    (2.0, 1.4142135623730951)
    >>> mean_spread([2.0, None])
    (2.0, nan)
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def t_two_sided_p(t: float, df: int) -> float:
    """The two-sided p-value of Student's t with ``df`` (a positive integer) degrees of freedom: P(|T| >= |t|).

    Exact, by the finite series of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df) for
    A(t | df) = P(|T| < t), in theta = atan(|t| / sqrt(df)); no SciPy needed. NaN for a NaN ``t``.

    >>> round(t_two_sided_p(4.303, 2), 3), round(t_two_sided_p(2.776, 4), 3), round(t_two_sided_p(12.706, 1), 3)
    (0.05, 0.05, 0.05)
    """
    if df < 1:
        raise ValueError(f"t_two_sided_p: df must be a positive integer, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    series, term = 1.0, 1.0
    if df % 2:  # 1 + 2/3 cos^2 + (2 4)/(3 5) cos^4 + ... up to cos^(df - 3)
        for k in range(1, (df - 3) // 2 + 1):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        inside = 2.0 / math.pi * (theta + (sin * math.cos(theta) * series if df > 1 else 0.0))
    else:  # 1 + 1/2 cos^2 + (1 3)/(2 4) cos^4 + ... up to cos^(df - 2)
        for k in range(1, (df - 2) // 2 + 1):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        inside = sin * series
    return min(1.0, max(0.0, 1.0 - inside))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of A against B over seeds: the differences A - B, one per seed both measured.

    Attributes:
        n: seeds compared.
        mean, std: the mean difference and its sample standard deviation (NaN below two seeds).
        t: mean / (std / sqrt(n)) (+-inf when every difference is the same non-zero value, NaN below two seeds or when
            every difference is 0).
        p: two-sided p-value of ``t`` on n - 1 degrees of freedom (NaN when ``t`` is; 1.0 when every difference is 0).
        ahead, behind: seeds where A is above B, below B.
    """

    n: int
    mean: float
    std: float
    t: float
    p: float
    ahead: int
    behind: int

    def verdict(self, a: str, b: str, alpha: float = 0.05, p: float | None = None) -> str:
        """Say "A ahead of B" or "A behind B" only when p < alpha; otherwise "no difference shown" (or why there is no test).

        ``p`` replaces the test's own p, e.g. by its :func:`holm` adjustment within a table of comparisons.
        """
        if self.n < 2:
            return "no test (one seed)" if self.n == 1 else "no test (no seed measured both)"
        p = self.p if p is None else p
        if not math.isnan(p) and p < alpha:
            return f"{a} {'ahead of' if self.mean > 0 else 'behind'} {b}"
        return "no difference shown"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979): reject where the adjusted p < alpha and the
    chance of any false "ahead" or "behind" in the family stays below alpha. NaN p-values (no test) stay NaN and
    do not count in the family.

    >>> holm([0.01, 0.04, 0.03, float("nan")])
    [0.03, 0.06, 0.06, nan]
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_test(differences: Iterable[float | int | None]) -> PairedTest:
    """Student's paired t over the measured differences (missing ones, None or NaN, left out).

    >>> paired_test([0.1, 0.2, 0.3]).t, paired_test([0.1, 0.2, 0.3]).ahead
    (3.4641016151377544, 3)
    """
    xs = [float(d) for d in differences if d is not None and not math.isnan(d)]
    n = len(xs)
    mean, std = mean_spread(xs)
    ahead, behind = sum(x > 0 for x in xs), sum(x < 0 for x in xs)
    if n < 2:
        return PairedTest(n, mean, std, math.nan, math.nan, ahead, behind)
    if std == 0.0:
        t = math.nan if mean == 0.0 else math.copysign(math.inf, mean)
        return PairedTest(n, mean, std, t, 1.0 if mean == 0.0 else 0.0, ahead, behind)
    t = mean / (std / math.sqrt(n))
    return PairedTest(n, mean, std, t, t_two_sided_p(t, n - 1), ahead, behind)


def fmt(mean: float | None, spread: float | None = None, spec: str = ".3f", signed: bool = False) -> str:
    """``mean ± spread`` in the format ``spec``; the mean alone when the spread is missing; ``-`` when the mean is.

    >>> fmt(0.5, 0.25), fmt(0.5, float("nan")), fmt(None), fmt(3.0, 1.0, ".1f", signed=True)
    ('0.500 ± 0.250', '0.500', '-', '+3.0 ± 1.0')
    """
    if is_missing(mean):
        return "-"
    text = format(mean, ("+" if signed else "") + spec)
    return text if is_missing(spread) else f"{text} ± {format(spread, spec)}"


def console() -> Console:
    """A rich console for reports: as wide as the terminal, or 160 columns when piped (logs, tests), so that
    tables are not folded into unreadable columns."""
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else 160)


def print_table(out: Console, title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], left: Sequence[str] = ()) -> None:
    """A rich table of already formatted cells; columns named in ``left`` are left-aligned, the others right-aligned."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV with a header (``fields``, default the first row's keys; other keys are left out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(fields if fields is not None else (rows[0] if rows else []))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: Path, payload: Any) -> Path:
    """``payload`` as indented JSON (missing values as ``NaN``; objects json cannot write, by ``str``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display).

    Raises:
        RecipeError: matplotlib is not installed (it comes with the ``dev`` and ``plots`` extras).
    """
    try:
        import matplotlib
    except ImportError:
        raise RecipeError("figures need matplotlib: pip install 'hydra-kit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
