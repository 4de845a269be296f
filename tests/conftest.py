"""Shared pytest fixtures; the helpers that test files import by name are in support.py."""

from __future__ import annotations

import pytest
from support import run_cli


@pytest.fixture
def cli():
    return run_cli


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written (pytest swaps it between tests and phases)."""

    def write(self, text: str) -> int:
        import sys

        return sys.stderr.write(text)

    def flush(self) -> None:
        import sys

        sys.stderr.flush()


@pytest.fixture
def lightning_logs_here(monkeypatch):
    """Lightning's log handlers write to this test's captured stderr, not to the closed stream of the test that
    first imported Lightning in this process."""
    import logging

    import lightning.pytorch  # noqa: F401  (creates the handlers)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", _CurrentStderr())
