"""What ``hydra-kit fit`` shows while it trains: a progress bar that counts steps, and a model summary.

Lightning's rich progress bar counts batches per epoch and titles the bar ``Epoch e/max_epochs - 1``. hydra-kit
runs are bounded by ``max_steps`` with ``max_epochs = -1`` (the synthetic tasks are endless streams), which made
the bar read ``Epoch 0/-2``, and a resumed run restarted its total at the remaining steps while the counter kept
the batch index (``40/20``). Lightning's model summary reports FLOPs only for models with an example input and
otherwise prints ``Total FLOPs: 0``; hydra-kit knows its FLOPs per token analytically
(:func:`hydra_kit.accounting.parameter_report`), so the summary shows those.

:class:`StepProgressBar` is built on the rich progress bar's protected methods, so it lives with the other
uses of Lightning internals in :mod:`hydra_kit.compat` and is re-exported here.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from rich.console import Console
from rich.table import Table

from hydra_kit.accounting import embedding_rows
from hydra_kit.compat import StepProgressBar

__all__ = ["ParameterSummary", "StepProgressBar"]


class ParameterSummary(ModelSummary):
    """At the start of ``fit``: parameters (total, active per token) and FLOPs per token, per component instance.

    For a model without ``parameter_report`` (not a HydraLM) it falls back to Lightning's summary.

    Args:
        seq_len: sequence length for FLOPs per token; default: the data module's ``seq_len`` (:class:`hydra_kit.data.TokenData`).
    """

    def __init__(self, seq_len: int | None = None) -> None:
        super().__init__(max_depth=1)
        self.seq_len = seq_len

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report_of = getattr(pl_module, "parameter_report", None)
        if report_of is None:
            super().on_fit_start(trainer, pl_module)
            return
        if not trainer.is_global_zero:
            return
        seq_len = self.seq_len or getattr(getattr(trainer, "datamodule", None), "seq_len", None)
        seq_len = int(seq_len) if isinstance(seq_len, int) and seq_len > 0 else 1024
        report = report_of(seq_len)
        table = Table(title=f"model: {report['total_params']:,} parameters", title_justify="left")
        for column in ("instance", "blocks", "params", "active", "MFLOP/token"):
            table.add_column(column, justify="left" if column in ("instance", "blocks") else "right")
        blocks_of = {r.name: r.blocks for r in getattr(pl_module, "resolved", [])}  # a HydraLM's (report_of is set)
        for name, row in report["components"].items():
            blocks = ",".join(map(str, blocks_of.get(name, ())))
            table.add_row(name, blocks, f"{row['total_params']:,}", f"{row['active_params']:,}", f"{row['flops_per_token'] / 1e6:.2f}")
        for label, params, mflops in embedding_rows(report):
            table.add_row(label, "", f"{params:,}", f"{params:,}", f"{mflops:.2f}")
        console = Console(highlight=False)
        console.print(table)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        console.print(
            f"parameters: {report['total_params']:,} ({trainable:,} trainable), {report['active_params']:,} active per token; "
            f"forward FLOPs per token at L={seq_len}: {report['flops_per_token'] / 1e6:.2f} M"
        )
