"""``hydra-kit summary``: parameters (total, active) and FLOPs per token of a recipe's model, per component and block.

The model is built on the meta device (no memory, any size). A component whose constructor turns a tensor into
a Python number (``float(torch.logit(torch.tensor(p)))``) cannot be built there; the model is then built for
real on the CPU, and a note names the component (``hydra_kit.testing.check_component`` reports the same).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.table import Table

from hydra_kit import reporting
from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.errors import RecipeError

__all__ = ["build_for_summary", "main"]


def _meta_failures(model: Any) -> list[str]:
    """The component instances of ``model`` that cannot be built on the meta device, with the reason."""
    import torch

    failures = []
    for r in model.resolved:
        try:
            with torch.device("meta"):
                r.build(model.hparams["d_model"], r.blocks[0] if r.blocks else 0)
        except Exception as exc:  # what a constructor raises on meta tensors varies: the reason is reported as is
            failures.append(f"{r.name} ({r.entry.cls.__name__}: {exc})")
    return failures


def build_for_summary(config: dict[str, Any]) -> tuple[Any, str | None]:
    """The model of ``config`` (HydraLM keyword arguments), built on the meta device when it can be.

    Returns:
        The model, and None, or a note saying why it was built for real on the CPU.

    Raises:
        RecipeError: the recipe is wrong (the real build refuses it too).
    """
    import torch

    from hydra_kit.model import HydraLM

    try:
        with torch.device("meta"):
            return HydraLM(**config), None
    except RecipeError:
        raise
    except Exception as meta_error:
        try:
            model = HydraLM(**config)
        except RecipeError:
            raise
        except Exception:
            raise meta_error from None
    culprits = ", ".join(_meta_failures(model)) or "the model"
    return model, f"{culprits} cannot be built on the meta device, so the model was built for real on the CPU"


def main(argv: list[str]) -> int:
    """Parameters and FLOPs of a recipe's model, built on the meta device (no memory, any size)."""
    from hydra_kit.accounting import embedding_rows
    from hydra_kit.config.lightning import model_config

    parser = ArgumentParser(
        prog="hydra-kit summary",
        description=main.__doc__,
        epilog="Other options are recipe overrides, e.g. --model.n_blocks 8 (checked like fit's).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", "-c", action="append", required=True, help="recipe YAML (repeatable)")
    parser.add_argument("--seq_len", type=int, default=8192, help="sequence length for FLOPs per token")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args, overrides = parser.parse_known_args(argv)
    if args.seq_len <= 0:
        raise RecipeError(f"summary: --seq_len: expected a positive integer, got {args.seq_len}")
    model, note = build_for_summary(model_config(args.config, overrides, prog="hydra-kit summary"))
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    report = model.parameter_report(args.seq_len)
    report["recipe"] = args.config
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = reporting.console()
    table = Table(title=f"{', '.join(args.config)}: per component instance (seq_len {args.seq_len})")
    for column in ("instance", "blocks", "total params", "active params", "MFLOP/token"):
        table.add_column(column, justify="right" if column != "instance" else "left")
    blocks_of = {r.name: r.blocks for r in model.resolved}
    for name, row in report["components"].items():
        table.add_row(name, ",".join(map(str, blocks_of.get(name, ()))), f"{row['total_params']:,}", f"{row['active_params']:,}", f"{row['flops_per_token'] / 1e6:.2f}")
    for label, params, mflops in embedding_rows(report):
        table.add_row(label, "", f"{params:,}", f"{params:,}", f"{mflops:.2f}")
    console.print(table)
    per_block = Table(title="per block")
    per_block.add_column("block")
    per_block.add_column("components")
    per_block.add_column("params", justify="right")
    for row in report["blocks"]:
        total = sum(c["total_params"] for c in row["components"].values()) + row["norm_and_layerscale_params"]
        per_block.add_row(str(row["block"]), " ".join(row["components"]), f"{total:,}")
    console.print(per_block)
    console.print(
        f"total parameters: [bold]{report['total_params']:,}[/]   active per token: [bold]{report['active_params']:,}[/]   "
        f"forward FLOPs per token at L={args.seq_len}: [bold]{report['flops_per_token'] / 1e6:.1f} M[/]"
    )
    return 0
