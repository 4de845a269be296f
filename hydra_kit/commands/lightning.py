"""``hydra-kit fit | validate | test | predict``: LightningCLI's subcommands on a recipe (:class:`~hydra_kit.config.lightning.HydraCLI`)."""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run one LightningCLI subcommand; ``argv`` starts with it (``["fit", "--config", ...]``)."""
    from hydra_kit.config.lightning import HydraCLI

    HydraCLI(args=argv)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down a DDP process group on every rank together, before the interpreter shuts down.

    Left to the interpreter's exit, one rank can destroy its gloo group while the other's worker threads still
    run, and the process aborts ("terminate called without an active exception", exit -6) after a good run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
