#!/usr/bin/env python
"""What trained compute skipping costs in quality: each recipe with and without it, same seeds, same steps.

For every recipe (default the MQAR demo ``full`` and the byte-level ``text``) and seed:

1. the recipe as it is (the dense model: every token through every component), and
2. the same recipe with its router set to skip in training and at inference (``gate_threshold`` 0.5,
   ``skip_in_training``, exploration ``--explore``, the usage budget at ``--budget-weight`` with a target share
   of ``--target`` per gated component, as ``recipes/full-29m-skip.yaml``), written to ``--work``;

each trained by ``hydra-kit fit --seed_everything S`` for the recipe's steps, then ``hydra-kit validate`` of its
final checkpoint (the skipping model validates skipping: the threshold is in force in evaluation). The quality
bar of trained skipping is the skipping model's validation loss within 1 percent of the dense model's; the
script reports, per recipe, the paired relative difference per seed, its mean, a paired t over seeds and
whether every seed is within 1 percent, beside the share of tokens each gated component computed (the
``kept_*`` statistics of the validation) and the fit's wall time (a comparison at one moment on a possibly
shared machine, not a benchmark: ``hydra-kit bench`` measures speed).

Writes ``skip_quality.csv`` (a row per run), ``skip_quality.json`` and ``skip_quality.console.txt`` to ``--out``.
A finished run leaves ``<run>.row.json`` in ``--work``; run the same command again after an interruption and the
finished runs are reused, the others trained afresh. A row is reused only if it was trained from the same recipe
text and the same hydra-kit commit (``git describe --always --dirty``); otherwise the script stops and names the
row, rather than report a run of other settings or other code as this one's.

    nice -n 5 .venv/bin/python scripts/skip-quality.py --out docs/figures/skip-quality --work /tmp/skip
    .venv/bin/python scripts/skip-quality.py --smoke --out /tmp/s     # the pipeline in a minute; measures nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from fit_runs import hydra_kit, run, scalars, write_report

from hydra_kit.recipe_files import resolve_config

VARIANTS = ("dense", "skip")
BAR = 0.01  # the skipping model's validation loss may exceed the dense model's by at most this fraction
SMOKE = {"steps": 2, "val_batches": 2}


def skip_recipe(recipe: Path, out: Path, args: argparse.Namespace) -> Path:
    """``recipe`` with its router skipping in training and at inference, written to ``out``."""
    config = yaml.safe_load(recipe.read_text())
    components = (config.get("model") or {}).get("components") or {}
    routers = [name for name, spec in components.items() if (spec or {}).get("component") == "router"]
    if not routers:
        raise SystemExit(f"{recipe}: model.components has no router (component: router), so nothing can skip; components: {', '.join(components)}")
    for name in routers:
        spec = components[name]
        spec["args"] = {**(spec.get("args") or {}), "gate_threshold": args.threshold, "skip_in_training": True,
                        "explore": args.explore, "budget_weight": args.budget_weight, "target_usage": args.target}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {recipe} with trained compute skipping (scripts/skip-quality.py)\n" + yaml.safe_dump(config, sort_keys=False))
    return out


def code_version() -> str:
    """The hydra-kit commit the runs train with (``git describe --always --dirty``), or "unknown" outside a checkout."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return described.stdout.strip()


def fit_and_validate(name: str, variant: str, recipe: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``recipe`` with ``seed`` and validate its final checkpoint; the run's row."""
    label = f"{name}-{variant}-seed{seed}"
    runs = args.work / "runs"
    done = runs / f"{label}.row.json"  # written last: a run with one is finished, and a rerun reuses it
    origin = {"recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(), "code": code_version()}
    if done.is_file():
        row: dict[str, Any] = json.loads(done.read_text())
        stale = [key for key, value in origin.items() if row.get(key) != value]
        if stale:
            raise SystemExit(
                f"{done}: a finished run of other {' and '.join(stale)} ({', '.join(f'{k} {row.get(k)!r}, now {origin[k]!r}' for k in stale)}); "
                "remove it (or pass another --work) to train it afresh"
            )
        sys.stdout.write(f"{label}: reused from {done}\n")
        return row
    common = ["--config", str(recipe), "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", label]  # fmt: skip
    steps = ["--trainer.max_steps", str(SMOKE["steps"])] if args.smoke else []
    fit_seconds = run(
        hydra_kit("fit", *common, *steps, "--seed_everything", str(seed), "--trainer.limit_val_batches", "0",
                  "--diagnostics.every_n_steps", "0", "--trainer.logger.init_args.version", "fit"),
        runs / f"{label}.fit.log",
        args.threads,
    )  # fmt: skip
    checkpoint = runs / label / "fit" / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise SystemExit(f"{label}: the fit wrote no {checkpoint}")
    val_limit = ["--trainer.limit_val_batches", str(SMOKE["val_batches"])] if args.smoke else []
    run(
        hydra_kit("validate", *common, *val_limit, "--ckpt_path", str(checkpoint), "--trainer.logger.init_args.version", "validate"),
        runs / f"{label}.validate.log",
        args.threads,
    )  # fmt: skip
    validated = scalars(runs / label / "validate")
    if "val/loss" not in validated:
        raise SystemExit(f"{label}: validate logged no val/loss (logged: {', '.join(sorted(validated))})")
    trained = scalars(runs / label / "fit")
    row = {"recipe": name, "variant": variant, "seed": seed, **origin, "val_loss": validated["val/loss"][-1][2],
                           "fit_seconds": round(fit_seconds, 2), "steps": trained["train/loss"][-1][0] + 1 if "train/loss" in trained else None}  # fmt: skip
    for tag, values in sorted(validated.items()):  # the share of tokens each gated component computed
        if "kept_" in tag:
            row[tag.split("/")[-1].split(".")[-1]] = round(values[-1][2], 4)
    done.write_text(json.dumps(row) + "\n")
    sys.stdout.write(f"{label}: val loss {row['val_loss']:.4f}, fit {fit_seconds:.0f} s\n")
    sys.stdout.flush()
    return row


def paired(rows: list[dict[str, Any]], name: str, seeds: list[int]) -> dict[str, Any]:
    """The skipping model against the dense one on recipe ``name``: relative validation-loss differences per seed."""
    loss = {(r["variant"], r["seed"]): r["val_loss"] for r in rows if r["recipe"] == name}
    seconds = {(r["variant"], r["seed"]): r["fit_seconds"] for r in rows if r["recipe"] == name}
    relative = [loss["skip", s] / loss["dense", s] - 1 for s in seeds]
    mean = statistics.fmean(relative)
    t = None
    if len(relative) >= 2 and statistics.stdev(relative) > 0:
        t = mean / (statistics.stdev(relative) / math.sqrt(len(relative)))
    return {
        "dense_val_loss": [loss["dense", s] for s in seeds],
        "skip_val_loss": [loss["skip", s] for s in seeds],
        "relative_difference": relative,
        "mean_relative_difference": mean,
        "paired_t": t,
        "seeds_within_bar": sum(d <= BAR for d in relative),
        "fit_seconds_ratio_skip_over_dense": statistics.fmean(seconds["skip", s] / seconds["dense", s] for s in seeds),
    }


def table(summary: dict[str, Any], rows: list[dict[str, Any]], seeds: list[int], settings: dict[str, Any]) -> str:
    """The console report: every run, then per recipe the paired comparison against the 1 percent bar."""
    kept_columns = sorted({k for r in rows for k in r if k.startswith("kept_")})
    lines = [f"trained compute skipping: threshold {settings['threshold']}, exploration {settings.get('explore', 0.0)}, budget weight {settings['budget_weight']}, "
             f"target share {settings['target']}; seeds {', '.join(map(str, seeds))}; recipes' own steps", ""]  # fmt: skip
    lines.append(f"{'recipe':<8} {'variant':<7} {'seed':>4} {'val loss':>9} {'fit s':>7} " + " ".join(f"{k:>15}" for k in kept_columns))
    for r in rows:
        kept = " ".join(f"{r[k]:>15.3f}" if k in r else f"{'-':>15}" for k in kept_columns)
        lines.append(f"{r['recipe']:<8} {r['variant']:<7} {r['seed']:>4} {r['val_loss']:>9.4f} {r['fit_seconds']:>7.0f} {kept}")
    lines.append("")
    for name, s in summary.items():
        per_seed = ", ".join(f"{d:+.2%}" for d in s["relative_difference"])
        t = "n/a (one seed)" if s["paired_t"] is None else f"{s['paired_t']:.2f}"
        lines.append(f"{name}: skip / dense - 1 = {per_seed} (mean {s['mean_relative_difference']:+.2%}, paired t {t}); "
                     f"within {BAR:.0%} in {s['seeds_within_bar']} of {len(seeds)} seeds; "
                     f"fit time skip / dense {s['fit_seconds_ratio_skip_over_dense']:.2f} (not a benchmark)")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["full", "text"], help="recipes (files or packaged names) with a router")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threshold", type=float, default=0.5, help="the gate under which a token skips a component")
    parser.add_argument("--explore", type=float, default=0.1, help="share of skipped tokens served anyway in training (the router's explore)")
    parser.add_argument("--budget-weight", type=float, default=1.0, help="weight of the usage budget (R4)")
    parser.add_argument("--target", type=float, default=0.5, help="share of tokens each gated component should compute")
    parser.add_argument("--out", type=Path, required=True, help="folder for skip_quality.{csv,json,console.txt}")
    parser.add_argument("--work", type=Path, default=None, help="folder for derived recipes, logs, checkpoints (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny everything ({SMOKE}), for a test of the pipeline")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        parser.error("--seeds: give at least one seed, e.g. 0,1,2")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.work = Path(tempfile.mkdtemp(prefix="skip-")) if args.work is None else args.work
    args.out.mkdir(parents=True, exist_ok=True)
    recipes: dict[str, dict[str, Path]] = {}
    for value in args.recipes:
        dense = Path(resolve_config(value))
        if not dense.is_file():
            parser.error(f"--recipes {value}: no such recipe file or packaged recipe")
        recipes[dense.stem] = {"dense": dense, "skip": skip_recipe(dense, args.work / "recipes" / f"{dense.stem}-skip.yaml", args)}
    settings = {"recipes": {n: {v: str(p) for v, p in r.items()} for n, r in recipes.items()}, "seeds": seeds,
                "threshold": args.threshold, "explore": args.explore, "budget_weight": args.budget_weight, "target": args.target, "bar": BAR,
                "smoke": args.smoke, "jobs": args.jobs, "threads_per_run": args.threads,
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
    # Seed by seed, the two variants of a recipe next to each other: a cut-off run still leaves paired seeds.
    queue = [(name, variant, paths[variant], seed) for seed in seeds for name, paths in recipes.items() for variant in VARIANTS]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: fit_and_validate(*job, args), queue))
    settings["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    summary = {name: paired(rows, name, seeds) for name in recipes}
    text = table(summary, rows, seeds, settings)
    write_report(args.out, "skip_quality", rows, settings, summary, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
