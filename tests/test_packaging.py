"""Packaged recipes and sample data: listing, `--config NAME`, `hydra-kit recipes`, and one source tree per process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hydra_kit import cli
from hydra_kit.commands import recipes as recipes_command
from hydra_kit.experiments.models import SIZE_RECIPES, hydra_config
from hydra_kit.package_data import MixedSourceTreesError, check_same_tree, package_folder
from hydra_kit.recipe import RecipeError
from hydra_kit.recipe_files import (
    copy_recipe,
    find_packaged,
    model_section,
    packaged_recipes,
    recipes_folder,
    resolve_config,
    resolve_config_args,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_of_the_checkout_is_packaged_with_a_description():
    on_disk = sorted(p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in (REPO / "recipes").rglob("*.yaml"))
    listed = packaged_recipes()
    assert sorted(r.name for r in listed) == on_disk
    assert {"full", "full-29m", "tiny", "text", "experiments/smoke", "experiments/hydra-cpu"} <= set(on_disk)
    assert all(r.description and not r.description.startswith("#") for r in listed), [r.name for r in listed if not r.description]
    assert [r.name for r in listed][:1] != ["experiments/smoke"]  # top-level recipes first
    # In a checkout the packaged folder is the top-level recipes/ itself: `--config recipes/full.yaml` keeps working.
    assert recipes_folder().resolve() == (REPO / "recipes").resolve()


def test_description_is_the_first_sentence_of_the_leading_comment(tmp_path):
    from hydra_kit.recipe_files import describe

    (tmp_path / "a.yaml").write_text("\n# First sentence, on\n#   two lines (v1.6). Second one.\nmodel: {}\n")
    (tmp_path / "b.yaml").write_text("model: {}  # not a leading comment\n")
    (tmp_path / "c.yaml").write_text("# No full stop\n#\n# after a bare comment line.\nmodel: {}\n")
    assert describe(tmp_path / "a.yaml") == "First sentence, on two lines (v1.6)."
    assert describe(tmp_path / "b.yaml") == ""
    assert describe(tmp_path / "c.yaml") == "No full stop"


@pytest.mark.parametrize("spelling", ["full", "full.yaml", "recipes/full.yaml", "./recipes/full.yaml"])
def test_a_config_value_that_is_no_file_names_a_packaged_recipe(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: none of the spellings is a file here
    assert Path(resolve_config(spelling)).resolve() == (REPO / "recipes" / "full.yaml").resolve()
    assert find_packaged("experiments/smoke") is not None


def test_a_file_wins_over_a_packaged_name_and_is_returned_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("full").write_text("model: {d_model: 8}\n")
    assert resolve_config("full") == "full"
    assert resolve_config("trainer: {max_steps: 1}") == "trainer: {max_steps: 1}"  # inline YAML, as LightningCLI takes it


def test_an_unknown_config_is_one_line_listing_the_packaged_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        resolve_config("fulll")
    message = str(info.value)
    assert "\n" not in message and "fulll: recipe file not found" in message
    assert "full-29m" in message and "experiments/smoke" in message and "hydra-kit recipes" in message


def test_argv_recipe_options_are_resolved_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    full, smoke = resolve_config("full"), resolve_config("experiments/smoke")
    argv = ["fit", "--config", "full", "--trainer.max_steps", "2", "--model.d_model", "full"]
    assert resolve_config_args(argv) == ["fit", "--config", full, "--trainer.max_steps", "2", "--model.d_model", "full"]
    assert resolve_config_args(["summary", "-c", "full", "--config=recipes/full.yaml"]) == ["summary", "-c", full, f"--config={full}"]
    assert resolve_config_args(["experiment", "mqar", "--recipe", "experiments/smoke"]) == ["experiment", "mqar", "--recipe", smoke]
    assert resolve_config_args(["bench", "--recipes", "full", "experiments/smoke", "--steps", "3"]) == ["bench", "--recipes", full, smoke, "--steps", "3"]
    with pytest.raises(RecipeError, match="nope: recipe file not found"):
        resolve_config_args(["fit", "--config", "nope"])


def test_copy_writes_the_recipe_out_and_never_overwrites_without_force(tmp_path):
    written = copy_recipe("experiments/smoke", tmp_path)
    assert written == tmp_path / "smoke.yaml"
    assert written.read_bytes() == (REPO / "recipes" / "experiments" / "smoke.yaml").read_bytes()
    with pytest.raises(RecipeError, match="already exists; pass --force"):
        copy_recipe("full", written)
    assert copy_recipe("full", written, force=True) == written
    assert yaml.safe_load(written.read_text())["model"]["d_model"] == 96
    with pytest.raises(RecipeError, match=r"folder .* does not exist"):
        copy_recipe("full", tmp_path / "missing" / "x.yaml")
    with pytest.raises(RecipeError, match=r"no packaged recipe is named 'nope'; packaged recipes: .*full-29m"):
        copy_recipe("nope", tmp_path)


def test_recipes_command_lists_and_copies(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipes_command.main([]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "full-29m" in out and "experiments/hydra-cpu" in out and "Hydra at the paper's v3 size" in out
    assert recipes_command.main(["--copy", "full-29m"]) == 0
    assert (tmp_path / "full-29m.yaml").is_file() and "wrote" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="already exists"):
        recipes_command.main(["--copy", "full-29m"])
    assert recipes_command.main(["--copy", "full", "--to", "mine.yaml"]) == 0 and (tmp_path / "mine.yaml").is_file()
    with pytest.raises(SystemExit) as info:
        recipes_command.main(["--to", "x.yaml"])
    assert info.value.code == 2


def test_cli_takes_packaged_names_for_config_and_lists_recipes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["summary", "--config", "full-29m", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 27_500_000 <= report["total_params"] <= 30_500_000
    assert cli.main(["recipes"]) == 0 and "experiments/smoke" in capsys.readouterr().out
    assert cli.main(["recipes", "--copy", "tiny"]) == 0 and (tmp_path / "tiny.yaml").is_file()
    assert cli.main(["recipes", "--copy", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert cli.main(["fit", "--config", "no-such-recipe"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no-such-recipe: recipe file not found" in err and "full-29m" in err


def test_experiments_build_hydra_from_the_packaged_recipes(tmp_path):
    assert set(SIZE_RECIPES) == {"cpu", "full"}
    cpu = hydra_config("cpu", 40)
    assert cpu["vocab_size"] == 40 and cpu["d_model"] == 64 and cpu["n_blocks"] == 4 and cpu["tie_embeddings"] is False
    assert set(cpu["components"]) == {"ssm", "sga", "moe", "workspace", "pkm", "router"}
    assert {k: v for k, v in cpu.items() if k != "vocab_size"} == {
        k: v for k, v in model_section("experiments/hydra-cpu").items() if k != "vocab_size"
    }
    full = hydra_config("full", 256)
    assert full["d_model"] == 512 and full["tie_embeddings"] is False  # full-29m unties it for the experiments
    assert hydra_config("cpu", 8, recipe="experiments/smoke")["d_model"] == 32
    with pytest.raises(RecipeError, match="unknown size 'huge'"):
        hydra_config("huge", 8)
    (tmp_path / "plain.yaml").write_text("model: {d_model: 8}\n")
    with pytest.raises(RecipeError, match=r"model\.components is missing"):
        hydra_config("cpu", 8, recipe=str(tmp_path / "plain.yaml"))


def test_shipped_sample_data_is_found_through_the_package():
    folder = package_folder("hydra_kit.sample_data")
    assert folder.resolve() == (REPO / "data").resolve()
    assert (folder / "wikitext-2-sample" / "valid-sample.txt").is_file() and (folder / "wikitext-2-sample" / "README.md").is_file()


@pytest.mark.parametrize(
    ("layout", "mixed"),
    [
        ({"pkg": "site/hydra_kit", "mapped": "site/hydra_kit/components"}, False),  # a wheel: inside hydra_kit
        ({"pkg": "a/hydra_kit", "mapped": "a/components"}, False),  # a checkout: beside hydra_kit
        ({"pkg": "b/hydra_kit", "mapped": "a/components"}, True),  # hydra_kit of checkout b, components of a
        ({"pkg": "site/hydra_kit", "mapped": "a/recipes"}, True),  # a wheel's code, a checkout's recipes
    ],
)
def test_check_same_tree(tmp_path, layout, mixed):
    pkg, mapped = tmp_path / layout["pkg"], tmp_path / layout["mapped"]
    if not mixed:
        check_same_tree("hydra_kit.components", mapped, pkg)
        return
    with pytest.raises(MixedSourceTreesError) as info:
        check_same_tree("hydra_kit.components", mapped, pkg)
    message = str(info.value)
    assert "\n" not in message and str(mapped) in message and str(pkg) in message and "two hydra-kit source trees are mixed" in message


def test_another_checkouts_code_refuses_this_checkouts_components_and_recipes(tmp_path):
    # Checkout B holds hydra_kit only; this checkout's editable install maps hydra_kit.components and
    # hydra_kit.recipes to its own folders. Running B's code must not silently use them.
    other = tmp_path / "b"
    shutil.copytree(REPO / "hydra_kit", other / "hydra_kit", ignore=shutil.ignore_patterns("__pycache__"))
    probe = (
        "import hydra_kit, hydra_kit.recipe_files as r\n"
        f"assert hydra_kit.__file__.startswith({str(other)!r}), hydra_kit.__file__\n"
        "try:\n    print('recipes:', r.recipes_folder())\nexcept Exception as e:\n    print('recipes:', type(e).__name__, e)\n"
        "try:\n    import hydra_kit.components\n    print('components: imported')\n"
        "except ImportError as e:\n    print('components:', type(e).__name__, e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=other, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    if lines["components"].startswith("ModuleNotFoundError"):
        pytest.skip("hydra_kit.components is not mapped to this checkout (hydra-kit is not installed editable from it)")
    for key, folder in (("components", "components"), ("recipes", "recipes")):
        assert "two hydra-kit source trees are mixed" in lines[key], result.stdout
        assert str((REPO / folder).resolve()) in lines[key] and str((other / "hydra_kit").resolve()) in lines[key]


def test_every_package_of_the_checkout_is_listed_for_the_wheel():
    """pyproject lists packages by hand (components/, recipes/ and data/ are mapped into hydra_kit), so a new
    subpackage must be added there; the wheel check in CI would otherwise find it missing only at the end."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "hydra_kit").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
