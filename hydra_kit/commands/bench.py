"""``hydra-kit bench``: throughput and memory of recipes side by side (:mod:`hydra_kit.bench` measures, this parses)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from hydra_kit.bench import DEFAULT_LENGTHS, DEFAULT_RECIPES, run_bench
from hydra_kit.bench_report import check_targets, print_table, print_targets, write_outputs
from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.errors import RecipeError

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Measure tokens/s, achieved GFLOP/s and peak memory of recipes side by side (default: Hydra-29M vs Transformer-29M)."""
    parser = ArgumentParser(prog="hydra-kit bench", description=main.__doc__)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="recipes to compare; ratios are first / second")
    parser.add_argument("--seq_lens", nargs="+", type=int, default=DEFAULT_LENGTHS)
    parser.add_argument("--modes", nargs="+", choices=["infer", "train", "decode"], default=["infer", "train"], help="decode: 128 tokens after a prompt of each length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per model, length and mode (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="gpu: models and tokens on the first CUDA device, CUDA peak memory")
    parser.add_argument("--text", default=None, help="a text file: benchmark on its bytes instead of random tokens")
    parser.add_argument("--json", default=None, help="also write the records as a JSON list to this path")
    parser.add_argument("--out", default=None, help="output folder (default runs/bench/<timestamp>)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the per-component time breakdown")
    parser.add_argument(
        "--compile", action="store_true",
        help="also time each recipe compiled (model.compile true) beside its eager self, inference and training: "
        "NAME+compile rows and a compiled/eager column; the first call per length and mode compiles (slow, untimed)",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-kernels", choices=["on", "off"], default="on",
        help="the C kernels of hydra_kit.ops (decoding steps, the SSM's sequence stages) for every model; off: PyTorch ops only",
    )  # fmt: skip
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise RecipeError(
            f"bench: --accelerator gpu needs a CUDA device; torch {torch.__version__} (CUDA build {torch.version.cuda}) "
            f"sees none. On a GPU machine, install with scripts/install-gpu.sh."
        )
    out = Path(args.out or f"runs/bench/{time.strftime('%Y%m%d-%H%M%S')}")
    records, roof = run_bench(args, console)
    names = [Path(r).stem for r in args.recipes]
    print_table(records, names, roof, console)
    checks = check_targets(records, names)
    print_targets(checks, console)
    for path in write_outputs(records, out, args.json, roof, checks):
        console.print(f"wrote {path}")
    return 0
