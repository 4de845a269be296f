"""``hydra-kit components``: the discovered components with their distribution and version."""

from __future__ import annotations

from rich.table import Table

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.reporting import console

__all__ = ["main"]


def main(argv: list[str], *, third_party: bool = True) -> int:
    """Print the registry: name, path, class, distribution and version, and plugins that failed to load."""
    from hydra_kit.registry import discover

    ArgumentParser(prog="hydra-kit components", description=main.__doc__).parse_args(argv)
    registry = discover(third_party=third_party)
    table = Table(title="hydra-kit components (entry-point group hydra_kit.components)")
    for column in ("name", "path", "class", "distribution", "version"):
        table.add_column(column)
    for name in registry.names():
        e = registry.entries[name]
        table.add_row(name, e.cls.path.value, f"{e.cls.__module__}.{e.cls.__qualname__}", e.distribution, e.version)
    out = console()
    out.print(table)
    for failure in registry.failures:
        out.print(f"[yellow]warning:[/] {failure.describe()}")
    if not third_party:
        out.print("third-party plugins are disabled (--no-plugins / HYDRA_KIT_NO_PLUGINS)")
    return 0
