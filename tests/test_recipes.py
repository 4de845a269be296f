"""Every recipe under recipes/ parses and builds (on the meta device), and the sized recipes hit their budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from hydra_kit.cli import check_recipes, load_recipe, merged_model_section
from hydra_kit.model import HydraLM

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def build_on_meta(path: Path) -> HydraLM:
    check_recipes([str(path)], [])
    with torch.device("meta"):
        return HydraLM(**merged_model_section([str(path)]))


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


def test_summary_json_has_top_level_counts(tmp_path):
    result = run_cli("summary", "--config", str(REPO / "recipes" / "full-29m.yaml"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total_params"] > report["active_params"] > 0
    assert {"ssm", "sga", "moe", "workspace", "pkm", "router"} <= set(report["components"])
