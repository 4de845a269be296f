"""Command-line options of hydra-kit's own commands: argparse with one-line errors.

Every command refuses an unknown or malformed option in one line (``error: hydra-kit bench: unrecognized
arguments: --foo (all options: hydra-kit bench --help)``), exit status 2, instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

__all__ = ["ArgumentParser", "print_error"]


def print_error(message: str) -> None:
    """Print ``error: MESSAGE`` as one line on stderr (long paths are not wrapped)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the command, ending in SystemExit(2)."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{self.prog}: {' '.join(message.split())} (all options: {self.prog} --help)")
        sys.exit(2)
