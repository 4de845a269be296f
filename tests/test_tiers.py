"""Imports point down the tiers (CONTRIBUTING.md, "How the code is organised"): every hydra_kit module and every
first-party component imports only from its own tier or the tiers below it, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

from support import REPO

# Tier of each module prefix; the longest matching prefix decides. 1 is the top (commands), 6 the bottom (ops).
TIERS = {
    "hydra_kit.commands": 1,
    "hydra_kit.cli": 1,
    "hydra_kit.config": 2,
    "hydra_kit.reporting": 2,
    "hydra_kit.ablate": 2,
    "hydra_kit.bench": 2,
    "hydra_kit.bench_report": 2,
    "hydra_kit.experiments": 2,
    "hydra_kit.inspection": 2,
    "hydra_kit.evaluation": 2,
    "hydra_kit.model": 3,
    "hydra_kit.callbacks": 3,
    "hydra_kit.checkpoint": 3,
    "hydra_kit.optim": 3,
    "hydra_kit.compat": 3,
    "hydra_kit.data": 3,
    "hydra_kit.network": 4,
    "hydra_kit.accounting": 4,
    "hydra_kit.generation": 4,
    "hydra_kit.sampling": 4,
    "hydra_kit.export": 4,
    "hydra_kit.codec": 4,
    "hydra_kit.protocol": 5,
    "hydra_kit.registry": 5,
    "hydra_kit.recipe": 5,
    "hydra_kit.recipe_files": 5,
    "hydra_kit.package_data": 5,
    "hydra_kit.block": 5,
    "hydra_kit.testing": 5,
    "hydra_kit.components": 5,
    "hydra_kit.recipes": 5,
    "hydra_kit.sample_data": 5,
    "hydra_kit.ops": 6,
    "hydra_kit.errors": 6,
}


def tier(module: str) -> int | None:
    matches = [p for p in TIERS if module == p or module.startswith(p + ".")]
    return TIERS[max(matches, key=len)] if matches else None


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of the hydra_kit modules a file imports (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
    return {name for name in found if name.startswith("hydra_kit.")}


def modules() -> dict[str, Path]:
    found = {}
    for root, name in ((REPO / "hydra_kit", "hydra_kit"), (REPO / "components", "hydra_kit.components")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join((name, *parts)).removesuffix(".__init__")] = path
    return found


def test_every_module_has_a_tier():
    assert [m for m in modules() if m != "hydra_kit" and tier(m) is None] == []


def test_imports_never_point_up_a_tier():
    upward = []
    for module, path in modules().items():
        if module == "hydra_kit":
            continue
        own = tier(module)
        assert own is not None
        for imported in sorted(imports_of(path, module)):
            target = tier(imported)
            if target is not None and target < own:
                upward.append(f"{module} (tier {own}) imports {imported} (tier {target})")
    assert upward == []
