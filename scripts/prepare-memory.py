#!/usr/bin/env python
"""Peak memory of ``hydra-kit prepare`` and of reading its shards, on generated corpora of two sizes (a benchmark).

Generates a corpus of synthetic text (Zipf-distributed pseudo-words in sentences, paragraphs separated by blank
lines, files of about 1.2 MB) into a temporary folder, then for each size runs, each in its own process:

1. ``hydra-kit prepare`` (``hydra_kit.commands.prepare.main``) with the chosen tokenizer, paragraphs as documents
   (``--documents blank_lines``);
2. a shard-reading loop: ``ShardDataModule`` over the prepared folder, ``--read_batches`` training batches and
   the first ``--read_batches`` validation batches;
3. for reference, a process that only imports what those two import (torch, lightning, tokenizers).

It samples each process's resident memory (``/proc/PID/status``: VmRSS, RssAnon, RssFile) every 20 ms and reads
its peak (``ru_maxrss`` from ``wait4``), and prints a Markdown table. docs/data.md holds the figures it gave.

    nice -n 19 .venv/bin/python scripts/prepare-memory.py                    # about 63 MB and 244 MB, BPE 4096
    nice -n 19 .venv/bin/python scripts/prepare-memory.py --sizes_mb 5,10    # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

READER = """
import sys, time
from hydra_kit.data.shards import ShardDataModule
dm = ShardDataModule(sys.argv[1], seq_len=256, batch_size=16)
n = int(sys.argv[2])
t = time.perf_counter()
tokens = 0
for loader in (dm.train_dataloader(), dm.val_dataloader()):
    for i, batch in enumerate(loader):
        if i == n:
            break
        tokens += batch["input_ids"].numel()
print(tokens, time.perf_counter() - t)
"""

IMPORTS = "import torch, lightning, tokenizers, hydra_kit.data.shards, hydra_kit.data.prepare"


def generate(folder: Path, megabytes: int, seed: int) -> None:
    """Write ``megabytes`` files of about 1.2 MB of synthetic text (30,000 pseudo-words, Zipf-distributed) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.9
    lengths = rng.integers(1, 11, size=30_000)
    words = np.array(["".join(rng.choice(letters, size=n, p=freq / freq.sum())) for n in lengths])
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    zipf /= zipf.sum()
    for i in range(megabytes):
        ids = rng.choice(len(words), size=180_000, p=zipf)  # about 1 MB of words
        cuts = np.cumsum(rng.integers(5, 30, size=len(ids) // 5))
        cuts = cuts[cuts < len(ids)]
        sentences = [" ".join(s).capitalize() for s in np.split(words[ids], cuts)]
        ends = np.where(rng.random(len(sentences)) < 0.85, ". ", ".\n\n")
        (folder / f"doc{i:05d}.txt").write_text("".join(s + e for s, e in zip(sentences, ends, strict=True)), encoding="utf-8")


def measure(argv: list[str]) -> dict[str, float]:
    """Run ``argv``; its peak RSS (MB, from wait4), the peaks of RssAnon and RssFile sampled, wall seconds, stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = proc.stdout.read() if proc.stdout else ""
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {stderr[-2000:]}")
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_anon_mb": peaks["RssAnon"] / 1024,
        "peak_file_mb": peaks["RssFile"] / 1024,
        "seconds": time.perf_counter() - start,
        "stdout": stdout.strip(),  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes_mb", default="50,200", help="corpus sizes in files of about 1.2 MB (the first is a subset of the second)")
    parser.add_argument("--tokenizer", default="bpe", help="bpe or bytes")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--read_batches", type=int, default=2000, help="training (and validation) batches of 16 x 256 read")
    parser.add_argument("--workdir", default=None, help="where to put the corpus and shards (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes_mb.split(","))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        previous = 0
        for i, size in enumerate(sizes):  # corpus k = parts 0..k, so each size holds the smaller ones
            t = time.perf_counter()
            generate(root / "corpus" / f"part{i}", size - previous, seed=i)
            print(f"generated {size - previous} MB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            previous = size
        rows = []
        base = measure([sys.executable, "-c", IMPORTS])
        for i, size in enumerate(sizes):
            corpus = root / "corpus" if i == len(sizes) - 1 else root / "corpus" / "part0"
            if 0 < i < len(sizes) - 1:
                raise SystemExit("give two sizes")
            out = root / f"shards-{size}"
            vocab = ["--vocab_size", str(args.vocab_size)] if args.tokenizer == "bpe" else []
            command = [sys.executable, "-c", "import sys; from hydra_kit.commands.prepare import main; sys.exit(main(sys.argv[1:]))"]
            prep = measure([*command, "--input", str(corpus), "--out", str(out), "--tokenizer", args.tokenizer, *vocab, "--documents", "blank_lines", "--quiet"])
            read = measure([sys.executable, "-c", READER, str(out), str(args.read_batches)])
            meta = json.loads((out / "meta.json").read_text())
            tokens = sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
            corpus_mb = sum(f.stat().st_size for f in corpus.rglob("*.txt")) / 1e6
            print(f"{size} MB: prepare {prep['seconds']:.0f} s, reading {read['seconds']:.0f} s", file=sys.stderr)
            rows.append({"corpus_mb": corpus_mb, "tokens": tokens, "prepare": prep, "read": read})
        print(f"imports alone (torch, lightning, tokenizers, hydra_kit.data): peak RSS {base['peak_rss_mb']:.0f} MB\n")
        print(f"| corpus | tokens ({args.tokenizer}) | prepare: peak RSS | anon | time | shard reading: peak RSS | anon | file-backed |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            p, q = r["prepare"], r["read"]
            print(
                f"| {r['corpus_mb']:.0f} MB | {r['tokens'] / 1e6:.1f} M | {p['peak_rss_mb']:.0f} MB | {p['peak_anon_mb']:.0f} MB | {p['seconds']:.0f} s "
                f"| {q['peak_rss_mb']:.0f} MB | {q['peak_anon_mb']:.0f} MB | {q['peak_file_mb']:.0f} MB |"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"imports": base, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
