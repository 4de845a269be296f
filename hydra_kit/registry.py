"""Discovery of components through the entry-point group ``hydra_kit.components``.

First-party components (the ``components/`` folder, installed as ``hydra_kit.components``) are declared in
hydra-kit's own ``pyproject.toml`` exactly as a third-party package declares its own, so both go through
:func:`discover`. The registry is returned as a value; nothing is cached at import time.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlparse

from hydra_kit.protocol import TriPathComponent

ENTRY_POINT_GROUP = "hydra_kit.components"
FIRST_PARTY_DISTRIBUTION = "hydra-kit"
# The running hydra_kit package: first-party means "the distribution that installed these very files".
_PACKAGE_INIT = Path(__file__).resolve().parent / "__init__.py"


class ComponentRegistryError(ValueError):
    """A component could not be registered or resolved; the message names who is responsible."""


@dataclass(frozen=True)
class ComponentEntry:
    """One registered component.

    Attributes:
        name: entry-point name, the short name recipes use (``ssm``, ``pkm``, ...).
        cls: the component class.
        distribution: name of the installed distribution that declared it.
        version: that distribution's version.
        target: the entry point's ``module:Class`` string.
        first_party: declared by the distribution that installed the running ``hydra_kit`` package (checked by
            the files it installed, not by its name: see :func:`is_first_party`).
    """

    name: str
    cls: type[TriPathComponent]
    distribution: str
    version: str
    target: str
    first_party: bool = False


@dataclass(frozen=True)
class LoadFailure:
    """A plugin whose entry point failed to import or load; the other components are unaffected."""

    name: str
    distribution: str
    version: str
    error: str

    def describe(self) -> str:
        return f"component {self.name!r} from {self.distribution} {self.version} failed to load: {self.error}"


@dataclass
class Registry:
    """The discovered components by entry-point name, the plugins that failed to load, and those switched off.

    Attributes:
        entries: loaded components by entry-point name.
        failures: plugins whose entry point failed to import.
        skipped: entry-point name -> "distribution version" of third-party components not loaded because
            third-party loading was off (named in errors, so a recipe using one says why it is unknown).
    """

    entries: dict[str, ComponentEntry] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def resolve(self, name: str) -> ComponentEntry:
        """Find a component by entry-point name, class name, or full ``module.Class`` path.

        Raises:
            ComponentRegistryError: unknown or ambiguous name; the message lists what is available and any
                plugin that failed to load under that name.
        """
        if name in self.entries:
            return self.entries[name]
        by_class = [e for e in self.entries.values() if e.cls.__name__ == name]
        by_path = [e for e in self.entries.values() if f"{e.cls.__module__}.{e.cls.__qualname__}" == name]
        matches = by_path or by_class
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            who = ", ".join(f"{e.name} ({e.distribution} {e.version})" for e in matches)
            raise ComponentRegistryError(
                f"component class name {name!r} is ambiguous: it matches {who}; use the entry-point name instead"
            )
        failed = [f for f in self.failures if f.name == name]
        hint = f" ({failed[0].describe()})" if failed else ""
        if name in self.skipped:
            hint = f" (declared by {self.skipped[name]}, but third-party plugins are disabled: --no-plugins / HYDRA_KIT_NO_PLUGINS)"
        available = ", ".join(f"{e.name} ({e.cls.__name__})" for e in sorted(self.entries.values(), key=lambda e: e.name))
        raise ComponentRegistryError(f"unknown component {name!r}{hint}; available: {available}")


def _normalise(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


def _installs_running_package(dist: metadata.Distribution) -> bool:
    """True when ``dist`` installed the ``hydra_kit`` package this process runs (a wheel or an editable install)."""
    try:
        for file in dist.files or ():
            if file.parts == ("hydra_kit", "__init__.py") and Path(str(dist.locate_file(file))).resolve() == _PACKAGE_INIT:
                return True
        # An editable install (pip install -e) lists no package files; it records the source tree it points at.
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    except (OSError, ValueError, TypeError):
        return False
    url = urlparse(str(direct_url.get("url", "")))
    if url.scheme != "file" or not (direct_url.get("dir_info") or {}).get("editable"):
        return False
    return (Path(unquote(url.path)) / "hydra_kit" / "__init__.py").resolve() == _PACKAGE_INIT


def is_first_party(entry_point: metadata.EntryPoint) -> bool:
    """Whether ``entry_point`` is declared by hydra-kit's own distribution.

    The name alone proves nothing (any package may call itself ``hydra-kit`` in its metadata), so the
    distribution must also be the one whose files are the running ``hydra_kit`` package.
    """
    dist = entry_point.dist
    if dist is None or _normalise(dist.metadata["Name"] or dist.name) != _normalise(FIRST_PARTY_DISTRIBUTION):
        return False
    return _installs_running_package(dist)


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = entry_point.dist
    if dist is None:
        return "<unknown distribution>", "?"
    return dist.metadata["Name"] or dist.name, dist.version


def discover(
    *, third_party: bool = True, entry_points: Iterable[metadata.EntryPoint] | None = None
) -> Registry:
    """Load every component declared in the ``hydra_kit.components`` entry-point group.

    Args:
        third_party: when False, only components of the hydra-kit distribution itself are loaded (the CLI
            sets this from ``--no-plugins`` or ``HYDRA_KIT_NO_PLUGINS=1``); a distribution is hydra-kit's own
            when it installed the running ``hydra_kit`` package (:func:`is_first_party`), whatever its name.
        entry_points: the entry points to load instead of the installed ones (tests use this).

    Returns:
        The registry. Plugins that fail to import are recorded in ``Registry.failures`` with their
        distribution and version; the other components still load.

    Raises:
        ComponentRegistryError: two distributions declare the same name, or an entry point does not name a
            ``TriPathComponent`` subclass. Both are packaging bugs that must not be silently ignored.
    """
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    registry = Registry()
    for ep in entry_points:
        distribution, version = _distribution_of(ep)
        first_party = is_first_party(ep)
        if not third_party and not first_party:
            registry.skipped[ep.name] = f"{distribution} {version}"
            continue
        existing = registry.entries.get(ep.name)
        if existing is not None:
            if existing.target == ep.value and _normalise(existing.distribution) == _normalise(distribution) and existing.first_party == first_party:
                continue  # the same distribution seen twice on sys.path
            raise ComponentRegistryError(
                f"component name {ep.name!r} is declared twice: by {existing.distribution} {existing.version} "
                f"({existing.target}) and by {distribution} {version} ({ep.value}); uninstall one of them"
            )
        try:
            obj = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (even one calling sys.exit at import) must not take the others down
            registry.failures.append(LoadFailure(ep.name, distribution, version, f"{type(exc).__name__}: {exc}"))
            continue
        if not (isinstance(obj, type) and issubclass(obj, TriPathComponent)):
            what = f"module {obj.__name__} (expected 'module:Class')" if isinstance(obj, ModuleType) else repr(obj)
            raise ComponentRegistryError(
                f"entry point {ep.name!r} = {ep.value!r} of {distribution} {version} is {what}, "
                f"not a subclass of hydra_kit.TriPathComponent"
            )
        registry.entries[ep.name] = ComponentEntry(ep.name, obj, distribution, version, ep.value, first_party)
    return registry
