#!/usr/bin/env python
"""Hydra against the transformer of equal size on WikiText-2: train on valid, evaluate on test, equal steps, per seed.

The comparison of docs/results.md ("WikiText-2, CPU size"), at the size a CPU trains in minutes:

1. ``hydra-kit prepare`` once: a byte-level BPE (``--vocab_size``, 4,096) trained on ``--valid`` only, with
   ``--valid`` as the training split and ``--test`` as the validation split (``--val_input``);
2. for each seed and model (``recipes/text-bpe.yaml`` and ``recipes/text-bpe-transformer.yaml``, whose totals are
   equal within 1 percent), ``hydra-kit fit`` as a subprocess with ``--seed_everything S`` and the same
   ``--trainer.max_steps`` for both; in-training validation and per-block diagnostics are off, so that the fit's
   wall time is training (plus the process's start and the final checkpoint, equal for both);
3. ``hydra-kit validate`` of the final checkpoint (``last.ckpt``) on the shard folder's validation split, which
   is WikiText-2 test: val/loss and val/ppl per token, val/bpb per UTF-8 byte of the test text.

Training tokens/s = steps x batch x seq_len / wall seconds of the fit subprocess (start-up included), and, from
the TensorBoard event times of the logged training losses, the same rate over the logged steps only (start-up
excluded). Runs go ``--jobs`` at a time (2: the two models of a seed start together, and a run that finishes
makes room for the next), each with ``--threads`` torch threads; on a machine shared with other work the rates
are a comparison at one moment, not a benchmark (``hydra-kit bench`` measures speed properly).

Writes ``wikitext.csv`` (one row per run), ``wikitext.json`` (settings, runs, summary) and
``wikitext.console.txt`` (the table) into ``--out``; the token shards, logs and checkpoints go to ``--work``.

    nice -n 5 .venv/bin/python scripts/wikitext-compare.py --out docs/figures/wikitext --work /tmp/wikitext
    .venv/bin/python scripts/wikitext-compare.py --smoke --valid SLICE.txt --test SLICE2.txt --out /tmp/w
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fit_runs import ROOT, hydra_kit, run, scalars, write_report

MODELS = {"hydra": ROOT / "recipes" / "text-bpe.yaml", "transformer": ROOT / "recipes" / "text-bpe-transformer.yaml"}
METRICS = ("val/loss", "val/ppl", "val/bpb")
# Smoke mode: the whole pipeline in about a minute (a test runs it); nothing it measures means anything.
SMOKE = {"steps": 2, "vocab_size": 512, "batch_size": 2, "seq_len": 32, "val_batches": 2}
# "Large against the seed spread": the mean paired difference exceeds this many times the larger per-model range
# over seeds (and the per-seed differences agree in sign). With 2 seeds this is a rule of thumb, not a test.
SPREAD_FACTOR = 2.0


def fit_and_validate(model: str, seed: int, args: argparse.Namespace, data: Path, shape: dict[str, int]) -> dict[str, Any]:
    """Train ``model`` with ``seed``, validate its final checkpoint on the test split; the run's row."""
    name = f"{model}-seed{seed}"
    runs = args.work / "runs"
    common = [
        "--config", str(MODELS[model]),
        "--data.init_args.path", str(data),
        "--data.init_args.batch_size", str(shape["batch_size"]),
        "--data.init_args.seq_len", str(shape["seq_len"]),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    fit_seconds = run(
        hydra_kit(
            "fit", *common,
            "--seed_everything", str(seed),
            "--trainer.max_steps", str(args.steps),
            "--trainer.limit_val_batches", "0",
            "--diagnostics.every_n_steps", "0",
            "--trainer.logger.init_args.save_dir", str(runs),
            "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", "fit",
        ),
        runs / f"{name}.fit.log",
        args.threads,
    )  # fmt: skip
    checkpoint = runs / name / "fit" / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise SystemExit(f"{name}: the fit wrote no {checkpoint}")
    val_limit = ["--trainer.limit_val_batches", str(SMOKE["val_batches"])] if args.smoke else []
    run(
        hydra_kit(
            "validate", *common, *val_limit,
            "--ckpt_path", str(checkpoint),
            "--trainer.logger.init_args.save_dir", str(runs),
            "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", "test",
        ),
        runs / f"{name}.validate.log",
        args.threads,
    )  # fmt: skip
    validated = scalars(runs / name / "test")
    missing = [m for m in METRICS if m not in validated]
    if missing:
        raise SystemExit(f"{name}: validate logged no {', '.join(missing)} (logged: {', '.join(sorted(validated))})")
    trained = scalars(runs / name / "fit")
    tokens_per_step = shape["batch_size"] * shape["seq_len"]
    row: dict[str, Any] = {
        "model": model,
        "seed": seed,
        "steps": args.steps,
        **{m.split("/")[1]: validated[m][-1][2] for m in METRICS},
        "fit_seconds": round(fit_seconds, 2),
        "tokens_per_s": round(args.steps * tokens_per_step / fit_seconds, 1),
        "tokens_per_s_logged_steps": None,
    }
    losses = trained.get("train/loss") or []
    if len(losses) >= 2 and losses[-1][1] > losses[0][1]:
        (s0, t0, _), (s1, t1, _) = losses[0], losses[-1]
        row["tokens_per_s_logged_steps"] = round((s1 - s0) * tokens_per_step / (t1 - t0), 1)
    # One write per line: the runs of a seed finish in parallel threads.
    sys.stdout.write(f"{name}: loss {row['loss']:.4f}, ppl {row['ppl']:.2f}, bpb {row['bpb']:.4f}, {row['tokens_per_s']:.0f} tokens/s\n")
    sys.stdout.flush()
    return row


def parameters(recipe: Path) -> dict[str, int]:
    """Total and active parameters of ``recipe``'s model (``hydra-kit summary --json``)."""
    out = subprocess.run(hydra_kit("summary", "--config", str(recipe), "--json"), capture_output=True, text=True, check=True, cwd=ROOT)
    summary = json.loads(out.stdout)
    return {"total": int(summary["total_params"]), "active": int(summary["active_params"])}


def summarize(rows: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per model the mean and per-seed values; per seed the paired difference hydra - transformer, and a verdict."""
    columns = ("loss", "ppl", "bpb", "tokens_per_s")
    by = {(r["model"], r["seed"]): r for r in rows}
    models: dict[str, Any] = {}
    for model in MODELS:
        per_seed = {c: [by[model, s][c] for s in seeds] for c in columns}
        models[model] = {c: {"mean": statistics.fmean(v), "per_seed": v} for c, v in per_seed.items()}
    differences: dict[str, Any] = {}
    for c in columns:
        d = [by["hydra", s][c] - by["transformer", s][c] for s in seeds]
        spread = max(max(models[m][c]["per_seed"]) - min(models[m][c]["per_seed"]) for m in MODELS)
        same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
        shown = len(seeds) >= 2 and same_sign and abs(statistics.fmean(d)) > SPREAD_FACTOR * spread
        differences[c] = {"per_seed": d, "mean": statistics.fmean(d), "seed_spread": spread, "difference_shown": shown}
    ratio = models["hydra"]["tokens_per_s"]["mean"] / models["transformer"]["tokens_per_s"]["mean"]
    return {"models": models, "differences": differences, "tokens_per_s_ratio_hydra_over_transformer": ratio}


def verdict(diff: dict[str, Any], n_seeds: int) -> str:
    """One line on a paired difference: shown (both seeds agree and the gap is large against the spread) or not."""
    if not diff["difference_shown"]:
        return "no difference shown"
    lower = "lower" if diff["mean"] < 0 else "higher"
    return f"hydra {lower} in all {n_seeds} seeds, gap > {SPREAD_FACTOR:g}x the seed spread ({n_seeds} seeds only)"


def table(summary: dict[str, Any], seeds: list[int], settings: dict[str, Any]) -> str:
    """The console table: per model mean and per-seed values, then the paired differences with a verdict each."""
    columns = (("loss", "val loss/token", "{:.4f}"), ("ppl", "val ppl", "{:.2f}"), ("bpb", "val bits/byte", "{:.4f}"), ("tokens_per_s", "train tokens/s", "{:.0f}"))
    lines = [
        f"WikiText-2: BPE {settings['vocab_size']} and models trained on valid, evaluated on test; "
        f"{settings['steps']} steps of {settings['batch_size']} x {settings['seq_len']} tokens; seeds {', '.join(map(str, seeds))}",
        f"parameters: hydra {settings['parameters']['hydra']['total']:,} total ({settings['parameters']['hydra']['active']:,} active), "
        f"transformer {settings['parameters']['transformer']['total']:,}",
        "",
        f"{'model':<12} {'':<8} " + " ".join(f"{title:>15}" for _, title, _ in columns),
    ]
    for model in MODELS:
        stats = summary["models"][model]
        lines.append(f"{model:<12} {'mean':<8} " + " ".join(f"{fmt.format(stats[c]['mean']):>15}" for c, _, fmt in columns))
        for i, seed in enumerate(seeds):
            lines.append(f"{'':<12} {f'seed {seed}':<8} " + " ".join(f"{fmt.format(stats[c]['per_seed'][i]):>15}" for c, _, fmt in columns))
    lines.append("")
    lines.append("paired difference hydra - transformer")
    diffs = summary["differences"]
    signed = {"loss": "{:+.4f}", "ppl": "{:+.2f}", "bpb": "{:+.4f}", "tokens_per_s": "{:+.0f}"}
    for i, seed in enumerate(seeds):
        lines.append(f"{'':<12} {f'seed {seed}':<8} " + " ".join(f"{signed[c].format(diffs[c]['per_seed'][i]):>15}" for c, _, _ in columns))
    lines.append(f"{'':<12} {'mean':<8} " + " ".join(f"{signed[c].format(diffs[c]['mean']):>15}" for c, _, _ in columns))
    lines.append("")
    for c, title, _ in columns:
        lines.append(f"{title}: {verdict(diffs[c], len(seeds))}")
    lines.append(f"train tokens/s ratio hydra / transformer: {summary['tokens_per_s_ratio_hydra_over_transformer']:.2f} "
                 "(fit wall time with start-up; runs two at a time, on a machine that may be shared: "
                 "a comparison at one moment, not a benchmark; `hydra-kit bench` measures speed)")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt", help="training text (WikiText-2 valid)")
    parser.add_argument("--test", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt", help="evaluation text (WikiText-2 test)")
    parser.add_argument("--out", type=Path, required=True, help="folder for wikitext.csv, wikitext.json, wikitext.console.txt")
    parser.add_argument("--work", type=Path, default=None, help="folder for shards, logs, checkpoints (default: a new temporary folder)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the recipes' 600)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary (at most the recipes' 4096)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (the two models of a seed together)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny everything ({SMOKE}), for a test of the pipeline")
    args = parser.parse_args()
    for flag, path in (("--valid", args.valid), ("--test", args.test)):
        if not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        parser.error("--seeds: give at least one seed, e.g. 0,1")
    if args.steps is None:
        args.steps = SMOKE["steps"] if args.smoke else 600
    if args.smoke:
        args.vocab_size = min(args.vocab_size, SMOKE["vocab_size"])
    shape = {"batch_size": SMOKE["batch_size"], "seq_len": SMOKE["seq_len"]} if args.smoke else {"batch_size": 16, "seq_len": 256}
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.work = Path(tempfile.mkdtemp(prefix="wikitext-")) if args.work is None else args.work
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    data = args.work / f"bpe{args.vocab_size}"
    run(
        hydra_kit("prepare", "--input", str(args.valid), "--val_input", str(args.test), "--tokenizer", "bpe",
                  "--vocab_size", str(args.vocab_size), "--out", str(data), "--overwrite", "--quiet"),
        args.work / "prepare.log",
        args.threads,
    )  # fmt: skip
    meta = json.loads((data / "meta.json").read_text())
    settings: dict[str, Any] = {
        "valid": str(args.valid),
        "test": str(args.test),
        "vocab_size": meta["vocab_size"],
        "steps": args.steps,
        "seeds": seeds,
        **shape,
        "smoke": args.smoke,
        "jobs": args.jobs,
        "threads_per_run": args.threads,
        "recipes": {m: str(p.relative_to(ROOT)) for m, p in MODELS.items()},
        "parameters": {m: parameters(p) for m, p in MODELS.items()},
        "tokens": {s: meta["splits"][s]["tokens"] for s in ("train", "val")},
        "bytes": {s: meta["splits"][s]["bytes"] for s in ("train", "val")},
        "fit_overrides": "--trainer.limit_val_batches 0 --diagnostics.every_n_steps 0 --trainer.enable_progress_bar false",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    # One queue of runs, seed by seed and the two models of a seed next to each other, ``--jobs`` at a time: with
    # two jobs the models of a seed start together and every run shares the machine with one other run.
    queue = [(model, seed) for seed in seeds for model in MODELS]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: fit_and_validate(*job, args, data, shape), queue))
    settings["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    summary = summarize(rows, seeds)
    text = table(summary, seeds, settings)
    write_report(args.out, "wikitext", rows, settings, summary, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
