"""Every recipe under recipes/ parses and builds (on the meta device), and the sized recipes hit their budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_components import CumulativeMeanMixer
from support import REPO, run_cli

from hydra_kit.config import load_recipe
from hydra_kit.config.lightning import model_config
from hydra_kit.model import HydraLM

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def build_on_meta(path: Path) -> HydraLM:
    config = model_config([str(path)])  # parsed and checked as fit parses it
    with torch.device("meta"):
        return HydraLM(**config)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_builds(path):
    recipe = load_recipe(str(path))
    assert {"model", "trainer"} <= set(recipe), f"{path.name} needs model and trainer sections"
    model = build_on_meta(path)
    assert sum(p.numel() for p in model.parameters()) > 0


def params(name: str) -> tuple[int, int]:
    report = build_on_meta(REPO / "recipes" / f"{name}.yaml").parameter_report(8192)
    return report["total_params"], report["active_params"]


def test_tiny_is_well_under_a_million():
    assert params("tiny")[0] < 1_000_000


def test_29m_hydra_and_transformer_are_size_matched():
    hydra, _ = params("full-29m")
    transformer, _ = params("transformer-29m")
    assert abs(hydra - 29e6) / 29e6 <= 0.05, hydra
    assert abs(transformer - hydra) / hydra <= 0.05, (transformer, hydra)


def test_1p6b_design_builds_on_meta():
    total, active = params("hydra-1.6b")
    assert 1.5e9 <= total <= 1.7e9, total
    assert active < total


@pytest.mark.slow
def test_summary_json_has_top_level_counts(tmp_path):
    result = run_cli("summary", "--config", str(REPO / "recipes" / "full-29m.yaml"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total_params"] > report["active_params"] > 0
    assert {"ssm", "sga", "moe", "workspace", "pkm", "router"} <= set(report["components"])


class BoundedMixer(CumulativeMeanMixer):
    """A correct mixer that supports at most 8 tokens (like a learned positional table would)."""

    max_seq_len = 8


def test_a_sequence_longer_than_a_component_supports_is_a_clear_error(monkeypatch):
    import lightning as L

    import hydra_kit.model
    from hydra_kit.data import MQAR, SyntheticDataModule
    from hydra_kit.recipe import RecipeError
    from hydra_kit.registry import ComponentEntry, Registry

    registry = Registry(dict(hydra_kit.model.default_registry().entries))
    registry.entries["bounded"] = ComponentEntry("bounded", BoundedMixer, "hydra-kit-tests", "0", "test_recipes:BoundedMixer")
    monkeypatch.setattr(hydra_kit.model, "default_registry", lambda third_party=None: registry)
    model = HydraLM(vocab_size=72, d_model=16, n_blocks=1, components={"mix": {"component": "bounded"}, "mlp": {"component": "mlp"}})
    assert model.max_seq_len == 8
    with pytest.raises(ValueError, match=r"sequence of length 9 exceeds the 8 tokens model\.components\.mix \(BoundedMixer, max_seq_len 8\) supports"):
        model(torch.zeros(1, 9, dtype=torch.long))
    # Training on data longer than that fails before the first step, naming the data and the component.
    data = SyntheticDataModule(MQAR(num_pairs=4, num_queries=4), batch_size=2, train_size=4, val_size=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RecipeError, match=rf"data: the task makes sequences of {data.task.seq_len} tokens, longer than the 8 tokens model\.components\.mix"):
        trainer.fit(model, datamodule=data)


@pytest.mark.parametrize(
    ("spec", "n_blocks", "expected"),
    [("every 3", 7, (2, 5)), ("every 3", 2, ()), ("every 1", 3, (0, 1, 2)), ("every 2 from 1", 5, (1, 3)), ("every 2 from -1", 4, (3,)), ([-1, 0, 0], 3, (0, 2)), ("none", 3, ())],
)
def test_placements(spec, n_blocks, expected):
    from hydra_kit.recipe import parse_blocks

    assert parse_blocks(spec, n_blocks, "k") == expected


class UntypedArgsMixer(CumulativeMeanMixer):
    """A third-party style component whose keywords carry no annotations (the contract asks for them)."""

    def __init__(self, d_model: int, layer_idx: int, *, scale=1.0, window=4, names=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(d_model, layer_idx, scale=scale)
        self.window, self.names = window, names


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"window": "two"}, r"model\.components\.mix\.args\.window: expected int \(the type of UntypedArgsMixer's default 4\), got 'two'"),
        ({"window": 2.5}, r"args\.window: expected int"),
        ({"scale": True}, r"args\.scale: expected float"),
        ({"names": ["a"]}, r"args\.names: UntypedArgsMixer does not annotate its argument 'names', so a recipe value cannot be checked"),
    ],
)
def test_untyped_component_arguments_are_checked_against_their_defaults(monkeypatch, args, match):
    import hydra_kit.model
    from hydra_kit.recipe import RecipeError
    from hydra_kit.registry import ComponentEntry, Registry

    registry = Registry(dict(hydra_kit.model.default_registry().entries))
    registry.entries["untyped"] = ComponentEntry("untyped", UntypedArgsMixer, "hydra-kit-tests", "0", "test_recipes:UntypedArgsMixer")
    monkeypatch.setattr(hydra_kit.model, "default_registry", lambda third_party=None: registry)
    with pytest.raises(RecipeError, match=match):
        HydraLM(vocab_size=16, d_model=8, n_blocks=1, components={"mix": {"component": "untyped", "args": args}})
    model = HydraLM(vocab_size=16, d_model=8, n_blocks=1, components={"mix": {"component": "untyped", "args": {"window": 3, "scale": 2}}})
    assert model.blocks[0].mixers["mix"].window == 3  # well-typed values still pass (an int where the default is a float too)


class LogitBiasMixer(CumulativeMeanMixer):
    """A correct mixer whose constructor turns a tensor into a Python number, which fails on the meta device."""

    def __init__(self, d_model: int, layer_idx: int, *, p: float = 0.9) -> None:
        super().__init__(d_model, layer_idx)
        self.bias = float(torch.logit(torch.tensor(p)))


def test_summary_builds_for_real_a_component_that_fails_on_meta(tmp_path, monkeypatch, capsys):
    import yaml

    import hydra_kit.model
    from hydra_kit.cli import main
    from hydra_kit.registry import ComponentEntry, Registry

    registry = Registry(dict(hydra_kit.model.default_registry().entries))
    registry.entries["logit"] = ComponentEntry("logit", LogitBiasMixer, "hydra-kit-tests", "0", "test_recipes:LogitBiasMixer")
    monkeypatch.setattr(hydra_kit.model, "default_registry", lambda third_party=None: registry)
    recipe = tmp_path / "logit.yaml"
    components = {"mix": {"component": "logit", "args": {"p": 0.8}}, "mlp": {"component": "mlp"}}
    recipe.write_text(yaml.safe_dump({"model": {"vocab_size": 32, "d_model": 16, "n_blocks": 2, "components": components}}))
    assert main(["summary", "--config", str(recipe), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["components"]["mix"]["total_params"] == 2 * (16 * 16 + 16)  # a Linear(16, 16) in each block
    assert "mix (LogitBiasMixer:" in err and "cannot be built on the meta device" in err and "Traceback" not in err


def test_check_component_says_what_fails_on_the_meta_device():
    from hydra_kit.testing import ConformanceError, check_component

    with pytest.raises(ConformanceError, match=r"LogitBiasMixer: the constructor fails on the meta device \(RuntimeError: .*\); hydra-kit summary"):
        check_component(LogitBiasMixer)
    check_component(CumulativeMeanMixer)  # a constructor that keeps to shapes passes


def test_trainer_defaults_pick_the_accelerator_automatically(tmp_path):
    from hydra_kit.config.lightning import HydraCLI, parse_config
    from hydra_kit.config.trainer import TRAINER_DEFAULTS

    assert TRAINER_DEFAULTS["accelerator"] == "auto"
    recipe = REPO / "recipes" / "tiny.yaml"
    assert not [p.name for p in RECIPES if "accelerator" in (load_recipe(str(p)).get("trainer") or {})]  # no recipe pins a device
    assert parse_config([str(recipe)]).trainer.accelerator == "auto"
    cli = HydraCLI(args=["--config", str(recipe), "--trainer.logger", "false"], run=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cli.trainer.strategy.root_device.type == expected
