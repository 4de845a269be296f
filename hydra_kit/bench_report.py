"""What ``hydra-kit bench`` reports: the measurement records, the ratio table, the target checks, the files.

Every number here is read from the records of one run; nothing is adjusted. A target whose lengths or modes
were not measured is left out rather than guessed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hydra_kit.errors import RecipeError
from hydra_kit.ops import native
from hydra_kit.reporting import pyplot, write_csv, write_json


@dataclass
class Record:
    """One measurement row: a model at one length in one mode.

    ``gflops`` is the model's counted FLOPs (:func:`hydra_kit.bench.flops_per_token`) over the measured time, and
    ``roof_share`` that rate over the float32 matmul roof measured in the same run. A model whose router skips
    tokens (a gate threshold) is credited with its dense FLOPs, so its rate is dense-equivalent; ``kept`` says what
    share of the tokens each gated component computed in the timed step.
    """

    model: str
    seq_len: int
    mode: str  # "infer" (prefill forward), "train" (forward + backward) or "decode" (128 tokens after seq_len)
    tokens_per_s: float
    seconds: float
    repeats: list[float]
    gflops: float
    peak_mem_mb: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)  # component instance -> share of forward time
    roof_seconds: dict[str, float] = field(default_factory=dict)  # component instance -> time at the matmul roof
    cache_mb: float | None = None  # decode: bytes held by the recurrent state / key-value cache after the prompt
    roof_share: float | None = None  # gflops / the run's matmul roof
    breakdown_gflops: dict[str, float] = field(default_factory=dict)  # component instance -> achieved GFLOP/s
    compiled: bool = False  # the model ran with compile=True (its name ends in "+compile")
    compile_speedup: float | None = None  # compiled: tokens/s over the eager model's of the same run
    kept: dict[str, float] = field(default_factory=dict)  # under a gate threshold: component -> share of tokens computed


CSV_FIELDS = ["model", "seq_len", "mode", "tokens_per_s", "seconds", "gflops", "roof_share", "peak_mem_mb", "cache_mb", "compiled", "compile_speedup", "kept"]
COMPONENT_CSV_FIELDS = ["model", "seq_len", "mode", "component", "time_share", "gflops", "roof_time_share"]


def component_rows(records: list[Record]) -> list[dict[str, object]]:
    """One row per record and component instance of its breakdown: time share, GFLOP/s, time at the roof / measured."""
    rows: list[dict[str, object]] = []
    for r in records:
        for name, share in sorted(r.breakdown.items(), key=lambda kv: -kv[1]):
            at_roof = r.roof_seconds.get(name)
            rows.append({
                "model": r.model, "seq_len": r.seq_len, "mode": r.mode, "component": name, "time_share": share,
                "gflops": r.breakdown_gflops.get(name), "roof_time_share": None if at_roof is None else at_roof / r.seconds,
            })  # fmt: skip
    return rows


def print_table(records: list[Record], names: list[str], roof: float | None, console: Console) -> None:
    by_key = {(r.model, r.seq_len, r.mode): r for r in records}
    title = "throughput (tokens/s), achieved GFLOP/s (share of the matmul roof) and memory (MB: peak for infer/train, cache for decode)"
    table = Table(title=title + (f"; matmul roof {roof:.0f} GFLOP/s" if roof else ""))
    table.add_column("L", justify="right")
    table.add_column("mode")
    for name in names:
        table.add_column(f"{name} tok/s", justify="right")
        table.add_column(f"{name} GFLOP/s", justify="right")
        table.add_column(f"{name} MB", justify="right")
    if len(names) >= 2:
        table.add_column(f"speed {names[0]}/{names[1]}", justify="right")
        table.add_column(f"memory {names[0]}/{names[1]}", justify="right")
    for seq_len in sorted({r.seq_len for r in records}):
        for mode in sorted({r.mode for r in records}):
            rows = [by_key.get((n, seq_len, mode)) for n in names]
            if any(r is None for r in rows):
                continue
            cells = [str(seq_len), mode]
            for r in rows:
                assert r is not None
                memory = r.cache_mb if r.mode == "decode" else r.peak_mem_mb
                rate = f"{r.gflops:,.1f}" + ("" if r.roof_share is None else f" ({r.roof_share:.0%})")
                cells += [f"{r.tokens_per_s:,.1f}", rate, "-" if memory is None else f"{memory:,.1f}"]
            if len(rows) >= 2:
                a, b = rows[0], rows[1]
                assert a is not None and b is not None
                cells.append(f"{a.tokens_per_s / b.tokens_per_s:.2f}x")
                ma, mb = (a.cache_mb, b.cache_mb) if mode == "decode" else (a.peak_mem_mb, b.peak_mem_mb)
                cells.append("-" if ma is None or not mb else f"{ma / mb:.2f}")
            table.add_row(*cells)
    console.print(table)
    print_compile_table(records, console)
    for r in records:
        if r.breakdown:
            parts = ", ".join(
                f"{row['component']} {row['time_share']:.0%}"
                + ("" if row["gflops"] is None else f" {row['gflops']:.1f} GFLOP/s")
                + ("" if row["roof_time_share"] is None else f" (roof {row['roof_time_share']:.0%})")
                for row in component_rows([r])
            )
            console.print(f"[dim]{r.model} L={r.seq_len} forward by component: time share, GFLOP/s (time at matmul roof / measured forward): {parts}[/]")


def print_compile_table(records: list[Record], console: Console) -> None:
    """The compiled models against their eager selves (``bench --compile``); nothing when none was compiled."""
    compiled = [r for r in records if r.compiled]
    if not compiled:
        return
    table = Table(title="torch.compile against eager (same run, same weights)")
    for column in ("model", "L", "mode", "eager tok/s", "compiled tok/s", "compiled/eager"):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for r in compiled:
        eager = r.tokens_per_s / r.compile_speedup if r.compile_speedup else None
        table.add_row(
            r.model, str(r.seq_len), r.mode, "-" if eager is None else f"{eager:,.1f}", f"{r.tokens_per_s:,.1f}",
            "-" if r.compile_speedup is None else f"{r.compile_speedup:.2f}x",
        )  # fmt: skip
    console.print(table)


@dataclass
class TargetCheck:
    """One of the project's speed or memory targets (docs/benchmarks.md), read from the records of this run."""

    target: str
    measured: float | None
    bound: float
    higher_is_better: bool

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.bound if self.higher_is_better else self.measured <= self.bound


# The speed targets (issue 36): (length, mode, least ratio of tokens/s against the baseline).
SPEED_TARGETS = ((8192, "infer", 3.0), (16384, "infer", 5.0), (8192, "train", 3.0), (16384, "decode", 5.0))


def check_targets(records: list[Record], names: list[str]) -> list[TargetCheck]:
    """The project's targets for the first recipe against the second (the baseline), where this run measured what
    they need; the speed targets also for every further recipe against the baseline (e.g. a skipping variant).

    Ratios only ever compare numbers of this run. A target whose lengths or modes were not run is left out.
    """
    if len(names) < 2:
        return []
    checks = _checks(records, names[0], names[1])
    for other in names[2:]:
        checks += _speed_checks(records, other, names[1])
    return checks


def _speed_checks(records: list[Record], a: str, b: str) -> list[TargetCheck]:
    """The speed targets of recipe ``a`` against the baseline ``b``."""
    by_key = {(r.model, r.seq_len, r.mode): r for r in records}
    checks = []
    for seq_len, mode, bound in SPEED_TARGETS:
        ra, rb = by_key.get((a, seq_len, mode)), by_key.get((b, seq_len, mode))
        if ra is not None and rb is not None:
            label = f"{mode} tokens/s {a}/{b} at L={seq_len}" + (" (128 tokens after the prompt)" if mode == "decode" else "")
            checks.append(TargetCheck(label, ra.tokens_per_s / rb.tokens_per_s, bound, True))
    return checks


def _checks(records: list[Record], a: str, b: str) -> list[TargetCheck]:
    """Every target of recipe ``a`` against the baseline ``b``: speed, memory, scaling, decoding cache."""
    by_key = {(r.model, r.seq_len, r.mode): r for r in records}

    def get(model: str, seq_len: int, mode: str) -> Record | None:
        return by_key.get((model, seq_len, mode))

    checks = _speed_checks(records, a, b)
    for mode in ("infer", "train"):
        for seq_len in sorted({r.seq_len for r in records if r.mode == mode}):
            ra, rb = get(a, seq_len, mode), get(b, seq_len, mode)
            if ra and rb and ra.peak_mem_mb is not None and rb.peak_mem_mb:
                checks.append(TargetCheck(f"{mode} peak memory {a}/{b} at L={seq_len}", ra.peak_mem_mb / rb.peak_mem_mb, 1.0, False))
        r8, r16 = get(a, 8192, mode), get(a, 16384, mode)
        if r8 and r16 and r8.peak_mem_mb and r16.peak_mem_mb is not None:
            checks.append(TargetCheck(f"{mode} peak memory of {a}, L=16384 / L=8192", r16.peak_mem_mb / r8.peak_mem_mb, 2.2, False))
    r2, r16 = get(a, 2048, "infer"), get(a, 16384, "infer")
    if r2 and r16:
        checks.append(TargetCheck(f"infer tokens/s of {a}, L=16384 / L=2048 (linear scaling)", r16.tokens_per_s / r2.tokens_per_s, 0.8, True))
    ra, rb = get(a, 16384, "decode"), get(b, 16384, "decode")
    if ra and rb and ra.cache_mb is not None and rb.cache_mb:
        checks.append(TargetCheck(f"decode cache bytes {a}/{b} after L=16384", ra.cache_mb / rb.cache_mb, 0.1, False))
    return checks


def print_targets(checks: list[TargetCheck], console: Console) -> None:
    if not checks:
        return
    table = Table(title="targets (measured in this run; never adjusted)")
    for column in ("target", "measured", "bound", "met"):
        table.add_column(column)
    for c in checks:
        sign = ">=" if c.higher_is_better else "<="
        met = "-" if c.met is None else ("[green]yes[/]" if c.met else "[red]no[/]")
        table.add_row(c.target, "-" if c.measured is None else f"{c.measured:.2f}", f"{sign} {c.bound:g}", met)
    console.print(table)


def write_outputs(
    records: list[Record], out: Path, json_path: str | None, roof: float, checks: list[TargetCheck] | None = None
) -> list[Path]:
    """Write the run's files into ``out``; the paths written.

    ``bench.json`` (the matmul roof, threads, records and targets), ``bench.csv`` (one row per record,
    :data:`CSV_FIELDS`), ``bench_components.csv`` (the per-component breakdown, :data:`COMPONENT_CSV_FIELDS`; only
    when one was measured) and, with matplotlib, PNG plots of throughput and memory against length; the records
    also as a JSON list at ``json_path``.
    """
    rows = [asdict(r) for r in records]
    targets = [{**asdict(c), "met": c.met} for c in checks or []]
    payload = {
        "matmul_gflops": roof,
        "threads": torch.get_num_threads(),
        "cpu_kernels": native.enabled(),  # the C kernels of hydra_kit.ops (both models alike)
        "records": rows,
        "targets": targets,
    }
    written = [write_json(out / "bench.json", payload)]
    if json_path:
        written.append(write_json(Path(json_path), rows))
    flat = [{**row, "kept": " ".join(f"{k}={v:.3f}" for k, v in row["kept"].items())} for row in rows]  # one CSV cell
    written.insert(1, write_csv(out / "bench.csv", flat, CSV_FIELDS))
    if parts := component_rows(records):
        written.insert(2, write_csv(out / "bench_components.csv", parts, COMPONENT_CSV_FIELDS))
    try:
        plt = pyplot()
    except RecipeError:  # matplotlib is optional here: the plots are left out
        return written
    for metric, label in (("tokens_per_s", "tokens / s"), ("peak_mem_mb", "peak memory (MB)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (model, mode), group in sorted(_group(records).items()):
            points = [(r.seq_len, getattr(r, metric)) for r in group if getattr(r, metric)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=f"{model} ({mode})")
        if not ax.lines:  # nothing measured for this metric (e.g. decode only: no peak memory)
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out / f"bench_{'throughput' if metric == 'tokens_per_s' else 'memory'}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _group(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.model, r.mode)].append(r)
    return groups
