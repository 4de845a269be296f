"""Discovery of components through the entry-point group ``hydra_kit.components``.

First-party components (the ``components/`` folder, installed as ``hydra_kit.components``) are declared in
hydra-kit's own ``pyproject.toml`` exactly as a third-party package declares its own, so both go through
:func:`discover`. The registry is returned as a value; nothing is cached at import time.

The process-wide plugin policy lives here too: :func:`default_registry` is the registry a model built by name
uses (discovered on first use), and :func:`configure_plugins` is how the CLI's ``--no-plugins`` chooses it.
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
class LoadFailure:
    """A plugin whose entry point failed to import or load; the other components are unaffected."""

    name: str
    distribution: str
    version: str
    error: str

    def describe(self) -> str:
        return f"component {self.name!r} from {self.distribution} {self.version} failed to load: {self.error}"


class PluginLoadError(ComponentRegistryError):
    """Importing a plugin's entry point failed; ``failure`` names the component, distribution and version."""

    def __init__(self, failure: LoadFailure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


class ComponentEntry:
    """One registered component, declared by entry-point metadata and imported on first use of :attr:`cls`.

    Attributes:
        name: entry-point name, the short name recipes use (``ssm``, ``pkm``, ...).
        distribution: name of the installed distribution that declared it.
        version: that distribution's version.
        target: the entry point's ``module:Class`` string.
        first_party: declared by the distribution that installed the running ``hydra_kit`` package (checked by
            the files it installed, not by its name: see :func:`is_first_party`).
    """

    def __init__(
        self,
        name: str,
        cls: type[TriPathComponent] | None,
        distribution: str,
        version: str,
        target: str,
        first_party: bool = False,
        *,
        entry_point: metadata.EntryPoint | None = None,
    ) -> None:
        if cls is None and entry_point is None:
            raise ValueError(f"component entry {name!r} needs a class or an entry point to load it from")
        self.name = name
        self.distribution = distribution
        self.version = version
        self.target = target
        self.first_party = first_party
        self._cls = cls
        self._entry_point = entry_point

    @property
    def loaded(self) -> bool:
        """Whether the class has been imported (listing and resolving by entry-point name do not import)."""
        return self._cls is not None

    @property
    def cls(self) -> type[TriPathComponent]:
        """The component class, imported on first access.

        Raises:
            PluginLoadError: the plugin failed to import (any exception but KeyboardInterrupt, ``sys.exit``
                included); names the distribution and version.
            ComponentRegistryError: the entry point names something that is not a ``TriPathComponent`` subclass.
        """
        if self._cls is None:
            assert self._entry_point is not None
            self._cls = self._load(self._entry_point)
            self._entry_point = None  # loaded: models that hold this entry need not carry the metadata along
        return self._cls

    @property
    def class_name(self) -> str:
        """The class's name, from the loaded class or else from the entry point's ``module:Class`` text."""
        return self._cls.__name__ if self._cls is not None else self.target.partition(":")[2].rpartition(".")[2]

    def _load(self, ep: metadata.EntryPoint) -> type[TriPathComponent]:
        try:
            obj = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (even one calling sys.exit at import) must not take the others down
            failure = LoadFailure(self.name, self.distribution, self.version, f"{type(exc).__name__}: {exc}")
            raise PluginLoadError(failure) from None
        if not (isinstance(obj, type) and issubclass(obj, TriPathComponent)):
            what = f"module {obj.__name__} (expected 'module:Class')" if isinstance(obj, ModuleType) else repr(obj)
            raise ComponentRegistryError(
                f"entry point {self.name!r} = {self.target!r} of {self.distribution} {self.version} is {what}, "
                f"not a subclass of hydra_kit.TriPathComponent"
            )
        return obj

    def __repr__(self) -> str:
        what = self._cls.__qualname__ if self._cls is not None else "not loaded"
        return f"ComponentEntry({self.name!r}, {self.target!r}, {self.distribution} {self.version}, {what})"


@dataclass
class Registry:
    """The discovered components by entry-point name, the plugins that failed to load, and those switched off.

    Components are listed from entry-point metadata; a plugin is imported only when it is needed (a recipe names
    it, its class is asked for, or a class name must be matched), so a broken plugin affects only the runs that
    use it.

    Attributes:
        entries: declared components by entry-point name (those found broken when loaded are moved to
            ``failures``).
        failures: plugins whose entry point failed to import, among those loaded so far (:meth:`load_all` loads
            every one).
        skipped: entry-point name -> "distribution version" of third-party components not loaded because
            third-party loading was off (named in errors, so a recipe using one says why it is unknown).
    """

    entries: dict[str, ComponentEntry] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def _load(self, name: str) -> ComponentEntry | None:
        """The entry with its class imported, or None (and a recorded failure) when its plugin fails to import."""
        entry = self.entries[name]
        try:
            _ = entry.cls  # imports the plugin
        except PluginLoadError as exc:
            del self.entries[name]
            self.failures.append(exc.failure)
            return None
        return entry

    def load_all(self) -> None:
        """Import every declared component; broken plugins go to ``failures``.

        Raises:
            ComponentRegistryError: an entry point names something that is not a ``TriPathComponent``.
        """
        for name in list(self.entries):
            self._load(name)

    def names(self) -> list[str]:
        """The names of the components that load (imports every plugin: use :meth:`declared` to avoid that)."""
        self.load_all()
        return sorted(self.entries)

    def declared(self) -> list[str]:
        """The names of the declared components, from metadata alone (nothing is imported)."""
        return sorted(self.entries)

    def resolve(self, name: str) -> ComponentEntry:
        """Find a component by entry-point name, class name, or full ``module.Class`` path.

        Only what the name needs is imported: the entry of that name, else the entries whose ``module:Class``
        text matches, else (a class re-exported under another path) every entry.

        Raises:
            ComponentRegistryError: unknown or ambiguous name; the message lists what is available and any
                plugin that failed to load under that name.
        """
        if name in self.entries:
            entry = self._load(name)
            if entry is not None:
                return entry
        else:
            by_text = [e for e in self.entries.values() if e.class_name == name or e.target.replace(":", ".") == name]
            for candidate in by_text:
                self._load(candidate.name)
            matches = self._matching(name)
            if not matches and any(not e.loaded for e in self.entries.values()):
                self.load_all()
                matches = self._matching(name)
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
        available = ", ".join(f"{e.name} ({e.class_name})" for e in sorted(self.entries.values(), key=lambda e: e.name))
        raise ComponentRegistryError(f"unknown component {name!r}{hint}; available: {available}")

    def _matching(self, name: str) -> list[ComponentEntry]:
        loaded = [e for e in self.entries.values() if e.loaded]
        by_class = [e for e in loaded if e.cls.__name__ == name]
        by_path = [e for e in loaded if f"{e.cls.__module__}.{e.cls.__qualname__}" == name]
        return by_path or by_class


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


def _names_a_module(entry_point: metadata.EntryPoint) -> bool:
    try:
        return entry_point.attr is None
    except AttributeError:  # a value importlib cannot parse: reported when it is loaded
        return False


def discover(
    *, third_party: bool = True, entry_points: Iterable[metadata.EntryPoint] | None = None
) -> Registry:
    """List every component declared in the ``hydra_kit.components`` entry-point group, importing none of them.

    Args:
        third_party: when False, only components of the hydra-kit distribution itself are loaded (the CLI
            sets this from ``--no-plugins`` or ``HYDRA_KIT_NO_PLUGINS=1``); a distribution is hydra-kit's own
            when it installed the running ``hydra_kit`` package (:func:`is_first_party`), whatever its name.
        entry_points: the entry points to load instead of the installed ones (tests use this).

    Returns:
        The registry. A plugin is imported when it is first needed (:meth:`Registry.resolve`,
        :attr:`ComponentEntry.cls`, :meth:`Registry.names`); one that fails to import is then recorded in
        ``Registry.failures`` with its distribution and version, and the other components still load.

    Raises:
        ComponentRegistryError: two distributions declare the same name, or an entry point's value names a
            module rather than ``module:Class``. Both are packaging bugs that must not be silently ignored.
            An entry point naming something else than a ``TriPathComponent`` subclass raises the same error
            when it is loaded.
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
        if _names_a_module(ep):  # visible in the metadata: no need to import the module to know it is not a class
            raise ComponentRegistryError(
                f"entry point {ep.name!r} = {ep.value!r} of {distribution} {version} is module {ep.module} "
                f"(expected 'module:Class'), not a subclass of hydra_kit.TriPathComponent"
            )
        registry.entries[ep.name] = ComponentEntry(ep.name, None, distribution, version, ep.value, first_party, entry_point=ep)
    return registry


# ------------------------------------------------------------------ the process-wide plugin policy
# Models built by name (a recipe, a checkpoint's hyper-parameters) need a registry without being handed one; the
# CLI decides once per process whether third-party plugins are in it (``--no-plugins``).
_plugin_policy = {"third_party": True}
_registry_cache: dict[bool, Registry] = {}


def configure_plugins(*, third_party: bool) -> None:
    """Choose, for this process, whether models load third-party components (called by the CLI)."""
    _plugin_policy["third_party"] = third_party


def default_registry(third_party: bool | None = None) -> Registry:
    """The registry models are built from, discovered on first use and then kept for the process.

    Args:
        third_party: load third-party plugins; None keeps the process-wide choice (the CLI's ``--no-plugins``
            sets it through :func:`configure_plugins`).
    """
    if third_party is None:
        third_party = _plugin_policy["third_party"]
    if third_party not in _registry_cache:
        _registry_cache[third_party] = discover(third_party=third_party)
    return _registry_cache[third_party]
