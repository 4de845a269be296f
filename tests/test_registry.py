"""discover(): loading, duplicate names, non-components, broken plugins, third-party switch, name resolution."""

from __future__ import annotations

import importlib.metadata as metadata

import pytest

from hydra_kit.registry import ENTRY_POINT_GROUP, ComponentRegistryError, discover


class FakeDistribution(metadata.Distribution):
    def __init__(self, name: str, version: str) -> None:
        self._text = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"

    def read_text(self, filename: str) -> str | None:
        return self._text if filename in ("METADATA", "PKG-INFO") else None

    def locate_file(self, path):  # pragma: no cover - not used
        return path


def entry(name: str, value: str, dist: str = "hydra-kit-fake", version: str = "1.2.3") -> metadata.EntryPoint:
    ep = metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
    return ep._for(FakeDistribution(dist, version))


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
        discover(entry_points=[entry("bad", "fake_components:NotAComponent")])


def test_broken_plugin_is_reported_and_others_still_load():
    registry = discover(entry_points=[entry("broken", "broken_plugin:Thing", "hydra-kit-broken", "0.9"), entry("cummean", "fake_components:CumulativeMeanMixer")])
    assert registry.names() == ["cummean"]
    (failure,) = registry.failures
    assert failure.name == "broken" and failure.distribution == "hydra-kit-broken" and failure.version == "0.9"
    assert "simulated" in failure.error
    with pytest.raises(ComponentRegistryError, match=r"unknown component 'broken' \(component 'broken' from hydra-kit-broken 0\.9 failed"):
        registry.resolve("broken")


def test_third_party_switch_keeps_first_party_only():
    eps = [entry("cummean", "fake_components:CumulativeMeanMixer", "hydra-kit", "0.1.0"), entry("other", "fake_components:LookAheadMixer", "someone-else", "1.0")]
    assert discover(entry_points=eps, third_party=False).names() == ["cummean"]
    assert discover(entry_points=eps).names() == ["cummean", "other"]
    with pytest.raises(ComponentRegistryError, match=r"unknown component 'other' \(declared by someone-else 1\.0, but third-party plugins are disabled"):
        discover(entry_points=eps, third_party=False).resolve("other")


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
    from hydra_kit.model import configure_plugins

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

    from conftest import REPO

    import hydra_kit.model
    import hydra_kit.registry
    from hydra_kit import cli
    from hydra_kit.model import configure_plugins
    from hydra_kit.registry import ENTRY_POINT_GROUP

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HYDRA_KIT_NO_PLUGINS", raising=False)
    installed = [*metadata.entry_points(group=ENTRY_POINT_GROUP), *eps]  # hydra-kit's own, plus the faulty plugin
    monkeypatch.setattr(hydra_kit.registry.metadata, "entry_points", lambda group=None, **kw: installed)
    monkeypatch.setattr(hydra_kit.model, "_registry_cache", {})
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
