"""discover(): loading, duplicate names, non-components, broken plugins, third-party switch, name resolution."""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

import pytest

from hydra_kit.registry import ENTRY_POINT_GROUP, ComponentRegistryError, discover


class FakeDistribution(metadata.Distribution):
    """An installed distribution as importlib.metadata sees it; ``root`` and ``record`` place its files somewhere."""

    def __init__(self, name: str, version: str, root: Path | None = None, record: str | None = None) -> None:
        self._text = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        self._root = root
        self._record = record

    def read_text(self, filename: str) -> str | None:
        if filename == "RECORD":
            return self._record
        return self._text if filename in ("METADATA", "PKG-INFO") else None

    def locate_file(self, path):
        return path if self._root is None else self._root / path


def entry(name: str, value: str, dist: str | metadata.Distribution = "hydra-kit-fake", version: str = "1.2.3") -> metadata.EntryPoint:
    ep = metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
    return ep._for(dist if isinstance(dist, metadata.Distribution) else FakeDistribution(dist, version))


def test_loads_components_with_distribution_and_version():
    registry = discover(entry_points=[entry("cummean", "fake_components:CumulativeMeanMixer")])
    e = registry.resolve("cummean")
    assert e.cls.__name__ == "CumulativeMeanMixer"
    assert (e.distribution, e.version) == ("hydra-kit-fake", "1.2.3")
    assert registry.resolve("CumulativeMeanMixer") is e  # short class name
    assert registry.resolve("fake_components.CumulativeMeanMixer") is e  # full path


def test_duplicate_names_name_both_distributions():
    eps = [entry("mixer", "fake_components:CumulativeMeanMixer", "pkg-one", "1.0"), entry("mixer", "fake_components:LookAheadMixer", "pkg-two", "2.0")]
    with pytest.raises(ComponentRegistryError, match=r"declared twice.*pkg-one 1\.0.*pkg-two 2\.0"):
        discover(entry_points=eps)


def test_non_component_is_rejected_with_distribution():
    with pytest.raises(ComponentRegistryError, match=r"'bad'.*hydra-kit-fake 1\.2\.3.*not a subclass of hydra_kit\.TriPathComponent"):
        discover(entry_points=[entry("bad", "fake_components:NotAComponent")]).resolve("bad")  # raised when loaded


def test_broken_plugin_is_reported_and_others_still_load():
    registry = discover(entry_points=[entry("broken", "broken_plugin:Thing", "hydra-kit-broken", "0.9"), entry("cummean", "fake_components:CumulativeMeanMixer")])
    assert registry.names() == ["cummean"]
    (failure,) = registry.failures
    assert failure.name == "broken" and failure.distribution == "hydra-kit-broken" and failure.version == "0.9"
    assert "simulated" in failure.error
    with pytest.raises(ComponentRegistryError, match=r"unknown component 'broken' \(component 'broken' from hydra-kit-broken 0\.9 failed"):
        registry.resolve("broken")


def test_third_party_switch_keeps_first_party_only():
    own = metadata.distribution("hydra-kit")  # the distribution that installed the running hydra_kit package
    eps = [entry("cummean", "fake_components:CumulativeMeanMixer", own), entry("other", "fake_components:LookAheadMixer", "someone-else", "1.0")]
    assert discover(entry_points=eps, third_party=False).names() == ["cummean"]
    assert discover(entry_points=eps).names() == ["cummean", "other"]
    with pytest.raises(ComponentRegistryError, match=r"unknown component 'other' \(declared by someone-else 1\.0, but third-party plugins are disabled"):
        discover(entry_points=eps, third_party=False).resolve("other")


def test_a_plugin_calling_sys_exit_at_import_is_reported_and_others_still_load():
    sys.modules.pop("exiting_plugin", None)
    registry = discover(entry_points=[entry("exiting", "exiting_plugin:Thing", "hydra-kit-exiting", "0.4"), entry("cummean", "fake_components:CumulativeMeanMixer")])
    assert registry.names() == ["cummean"]
    (failure,) = registry.failures
    assert (failure.name, failure.distribution, failure.version) == ("exiting", "hydra-kit-exiting", "0.4")
    assert failure.error == "SystemExit: 3"
    assert failure.describe() == "component 'exiting' from hydra-kit-exiting 0.4 failed to load: SystemExit: 3"


def test_a_plugin_calling_sys_exit_at_import_does_not_stop_the_components_command(capsys, monkeypatch):
    import hydra_kit.registry

    sys.modules.pop("exiting_plugin", None)
    real = metadata.entry_points
    installed = [*real(group=ENTRY_POINT_GROUP), entry("exiting", "exiting_plugin:Thing", "hydra-kit-exiting", "0.4")]
    monkeypatch.setattr(hydra_kit.registry.metadata, "entry_points", lambda group=None, **kw: installed if group == ENTRY_POINT_GROUP else real(**kw) if group is None else real(group=group, **kw))
    out = " ".join(_listed(capsys, ["components"]).split())
    assert "ssm" in out
    assert "component 'exiting' from hydra-kit-exiting 0.4 failed to load: SystemExit: 3" in out


def test_a_keyboard_interrupt_while_importing_a_plugin_is_not_swallowed(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    ep = entry("slow", "fake_components:CumulativeMeanMixer")
    monkeypatch.setattr(type(ep), "load", lambda self: interrupted())
    with pytest.raises(KeyboardInterrupt):
        discover(entry_points=[ep]).resolve("slow")


def test_a_distribution_named_hydra_kit_elsewhere_is_third_party(tmp_path):
    # Another package calling itself hydra-kit, with its own hydra_kit/__init__.py somewhere else.
    (tmp_path / "hydra_kit").mkdir()
    (tmp_path / "hydra_kit" / "__init__.py").write_text("")
    impostor = FakeDistribution("hydra_kit", "9.9", root=tmp_path, record="hydra_kit/__init__.py,,\n")
    eps = [entry("impostor", "broken_plugin:Thing", impostor), entry("cummean", "fake_components:CumulativeMeanMixer", impostor)]
    registry = discover(entry_points=eps, third_party=False)
    assert registry.names() == [] and registry.failures == []  # its code never ran: broken_plugin was not imported
    assert registry.skipped == {"impostor": "hydra_kit 9.9", "cummean": "hydra_kit 9.9"}
    assert not discover(entry_points=eps).resolve("cummean").first_party
    # One that lists no files at all (no location) is not first-party either.
    assert discover(entry_points=[entry("cummean", "fake_components:CumulativeMeanMixer", "hydra-kit", "0.1.0")], third_party=False).names() == []


def test_the_installed_first_party_distribution_is_recognised_by_its_files():
    from hydra_kit.registry import is_first_party

    own = metadata.distribution("hydra-kit")
    assert is_first_party(entry("cummean", "fake_components:CumulativeMeanMixer", own))


def test_unknown_name_lists_available():
    registry = discover(entry_points=[entry("cummean", "fake_components:CumulativeMeanMixer")])
    with pytest.raises(ComponentRegistryError, match=r"unknown component 'nope'.*available: cummean \(CumulativeMeanMixer\)"):
        registry.resolve("nope")


def test_installed_first_party_components_are_discovered():
    registry = discover()
    for name in ("attention", "mlp", "router"):
        assert registry.entries[name].first_party


def test_components_next_to_a_broken_plugin_still_work():
    from hydra_kit.testing import check_component

    registry = discover(entry_points=[entry("broken", "broken_plugin:Thing", "hydra-kit-broken", "0.9"), entry("cummean", "fake_components:CumulativeMeanMixer")])
    check_component(registry.resolve("cummean").cls)  # loads, builds and passes the whole contract


def _listed(capsys, argv: list[str]) -> str:
    from hydra_kit import cli
    from hydra_kit.registry import configure_plugins

    try:
        assert cli.main(argv) == 0
    finally:
        configure_plugins(third_party=True)  # main() sets the process-wide policy; later tests expect the default
    return capsys.readouterr().out


def test_no_plugins_option_and_environment_variable_hide_installed_third_party_components(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_KIT_NO_PLUGINS", raising=False)
    third_party = sorted({e.distribution for e in discover().entries.values() if not e.first_party})
    if not third_party:
        pytest.skip("no third-party component is installed (CI installs plugins/hydra-kit-gla)")
    assert all(d in _listed(capsys, ["components"]) for d in third_party)
    for argv, env in ((["--no-plugins", "components"], None), (["components"], "1")):
        if env is not None:
            monkeypatch.setenv("HYDRA_KIT_NO_PLUGINS", env)
        out = _listed(capsys, argv)
        assert not any(d in out for d in third_party), out
        assert "ssm" in out and "third-party plugins are disabled" in out


# --------------------------------------------------------------------- issue 18, item 6: one line, not a traceback
@pytest.mark.parametrize(
    ("eps", "expected"),
    [
        (
            [entry("mixer", "fake_components:CumulativeMeanMixer", "pkg-one", "1.0"), entry("mixer", "fake_components:LookAheadMixer", "pkg-two", "2.0")],
            r"component name 'mixer' is declared twice: by pkg-one 1\.0 .* and by pkg-two 2\.0",
        ),
        ([entry("nocolon", "fake_components", "hydra-kit-sloppy", "0.3")], r"'nocolon' = 'fake_components' of hydra-kit-sloppy 0\.3 is module fake_components \(expected 'module:Class'\)"),
    ],
    ids=["name-clash", "value-without-colon"],
)
@pytest.mark.parametrize("command", [["components"], ["summary", "--config", "recipes/tiny.yaml"]])
def test_a_plugin_packaging_bug_is_one_line_that_names_it_and_no_plugins(monkeypatch, capsys, eps, expected, command):
    import re

    from support import REPO

    import hydra_kit.registry
    from hydra_kit import cli
    from hydra_kit.registry import ENTRY_POINT_GROUP, configure_plugins

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HYDRA_KIT_NO_PLUGINS", raising=False)
    installed = [*metadata.entry_points(group=ENTRY_POINT_GROUP), *eps]  # hydra-kit's own, plus the faulty plugin
    monkeypatch.setattr(hydra_kit.registry.metadata, "entry_points", lambda group=None, **kw: installed)
    monkeypatch.setattr(hydra_kit.registry, "_registry_cache", {})
    try:
        assert cli.main(command) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert err.startswith("error: component plugins: ") and "Traceback" not in err
        assert re.search(expected, err), err
        assert err.endswith("run with --no-plugins (or HYDRA_KIT_NO_PLUGINS=1) to load only hydra-kit's own components")
        assert cli.main(["--no-plugins", *command]) == 0  # the way out the message names works
        assert "ssm" in capsys.readouterr().out
    finally:
        configure_plugins(third_party=True)


# --------------------------------------------------------------------- issue 35, item 4c: plugins imported on demand
def _forget(*modules: str) -> None:
    for module in modules:
        sys.modules.pop(module, None)


def test_discover_imports_no_plugin():
    _forget("broken_plugin", "exiting_plugin")
    eps = [entry("broken", "broken_plugin:Thing", "hydra-kit-broken", "0.9"), entry("exiting", "exiting_plugin:Thing", "hydra-kit-exiting", "0.4"), entry("cummean", "fake_components:CumulativeMeanMixer")]
    registry = discover(entry_points=eps)
    assert registry.declared() == ["broken", "cummean", "exiting"] and registry.failures == []
    assert not any(e.loaded for e in registry.entries.values())
    assert registry.resolve("cummean").cls.__name__ == "CumulativeMeanMixer"
    assert registry.resolve("CumulativeMeanMixer").name == "cummean"  # a class name: only the entries whose target matches
    assert "broken_plugin" not in sys.modules and "exiting_plugin" not in sys.modules and registry.failures == []
    with pytest.raises(ComponentRegistryError, match=r"unknown component 'exiting' \(component 'exiting' from hydra-kit-exiting 0\.4 failed to load: SystemExit: 3\)"):
        registry.resolve("exiting")
    assert "broken_plugin" not in sys.modules  # the failure of one plugin loaded no other


def test_a_class_name_no_target_matches_loads_every_plugin_and_reports_the_broken_ones():
    _forget("broken_plugin")
    registry = discover(entry_points=[entry("broken", "broken_plugin:Thing", "hydra-kit-broken", "0.9"), entry("cummean", "fake_components:CumulativeMeanMixer")])
    with pytest.raises(ComponentRegistryError, match=r"unknown component 'NoSuchMixer'; available: cummean \(CumulativeMeanMixer\)"):
        registry.resolve("NoSuchMixer")
    assert [f.name for f in registry.failures] == ["broken"]


def _run_with_installed(monkeypatch, capsys, extra: list[metadata.EntryPoint], argv: list[str]) -> tuple[int, str, str]:
    from support import REPO

    import hydra_kit.registry
    from hydra_kit import cli
    from hydra_kit.registry import configure_plugins

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HYDRA_KIT_NO_PLUGINS", raising=False)
    real = metadata.entry_points
    installed = [*real(group=ENTRY_POINT_GROUP), *extra]
    monkeypatch.setattr(hydra_kit.registry.metadata, "entry_points", lambda group=None, **kw: installed if group == ENTRY_POINT_GROUP else real(**kw) if group is None else real(group=group, **kw))
    monkeypatch.setattr(hydra_kit.registry, "_registry_cache", {})
    try:
        code = cli.main(argv)
    finally:
        configure_plugins(third_party=True)
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def test_a_broken_plugin_affects_only_the_runs_that_use_it(monkeypatch, capsys, tmp_path):
    import yaml
    from support import REPO

    _forget("broken_plugin", "exiting_plugin")
    plugins = [entry("exiting", "exiting_plugin:Thing", "hydra-kit-exiting", "0.4"), entry("broken", "broken_plugin:Thing", "hydra-kit-broken", "0.9")]
    code, _, err = _run_with_installed(monkeypatch, capsys, plugins, ["summary", "--config", "recipes/tiny.yaml"])
    assert code == 0, err
    assert "broken_plugin" not in sys.modules and "exiting_plugin" not in sys.modules  # never imported
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["model"]["components"]["extra"] = {"component": "exiting", "blocks": [0]}
    path = tmp_path / "uses-exiting.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = _run_with_installed(monkeypatch, capsys, plugins, ["summary", "--config", str(path)])
    assert code == 2
    assert "model.components.extra.component: unknown component 'exiting' (component 'exiting' from hydra-kit-exiting 0.4 failed to load: SystemExit: 3)" in err, err
