"""``hydra-kit inspect``: per-block gates, LayerScale, update norms and component stats of a checkpoint.

The options and the report are :func:`hydra_kit.inspection.main`'s.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Inspect a checkpoint on held-out examples (``hydra-kit inspect --help``)."""
    from hydra_kit.inspection import main as inspect_main

    return inspect_main(argv)
