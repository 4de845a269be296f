"""Recipes: which component instances a model has, with what hyper-parameters, in which blocks.

The ``components`` section of a model recipe maps instance names to specs::

    components:
      ssm:    {component: ssm, blocks: all, args: {d_state: 64}}
      sga:    {component: SparseGlobalAttention, blocks: every 3}
      pkm:    {component: pkm, blocks: [4], layerscale: 0.1}
      router: {component: router, blocks: all}

Spec keys: ``component`` (entry-point name, class name or ``module.Class``), ``blocks`` (placement, see
:func:`parse_blocks`), ``args`` (keyword hyper-parameters of the component's constructor), ``layerscale``
(initial LayerScale g, default from the component class) and ``gated`` (whether the block's router gates it,
default from the class). Everything here is validated before any tensor is allocated, and every error names
the key that is wrong and what would be right.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

from hydra_kit.errors import RecipeError
from hydra_kit.protocol import RouterComponent, TriPathComponent
from hydra_kit.registry import ComponentEntry, Registry

__all__ = ["SPEC_KEYS", "RecipeError", "ResolvedComponent", "constructor_parameters", "parse_blocks", "resolve_components"]

SPEC_KEYS = ("component", "blocks", "args", "layerscale", "gated")
_CONSTRUCTOR_SUPPLIED = ("self", "d_model", "layer_idx")


@dataclass(frozen=True)
class ResolvedComponent:
    """A validated component spec.

    Attributes:
        name: instance name in the recipe (``sga``); several instances may use the same component class.
        entry: the registry entry of the component.
        blocks: indices of the blocks holding an instance, ascending.
        args: validated constructor keywords (only those the recipe gave).
        layerscale: initial LayerScale value.
        gated: whether a router in the same block gates it.
    """

    name: str
    entry: ComponentEntry
    blocks: tuple[int, ...]
    args: dict[str, Any]
    layerscale: float
    gated: bool

    @property
    def is_router(self) -> bool:
        return issubclass(self.entry.cls, RouterComponent)

    def build(self, d_model: int, layer_idx: int) -> TriPathComponent:
        return self.entry.cls(d_model, layer_idx, **self.args)


_EVERY = re.compile(r"^every\s+(\d+)(?:\s+from\s+(-?\d+))?$")


def parse_blocks(spec: Any, n_blocks: int, key: str) -> tuple[int, ...]:
    """Turn a placement spec into block indices.

    Accepted forms: ``all``; ``none``; ``every N`` (blocks N-1, 2N-1, ...: every N-th block, the paper's SGA
    placement for N=3); ``every N from K`` (K, K+N, ...); a list of indices, negative ones counting from the
    end (``[-1]`` is the last block).

    Raises:
        RecipeError: unknown form or an index outside 0..n_blocks-1.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return tuple(range(n_blocks))
        if text == "none":
            return ()
        match = _EVERY.match(text)
        if match:
            step = int(match.group(1))
            if step <= 0:
                raise RecipeError(f"{key}: 'every N' needs N >= 1, got {spec!r}")
            if match.group(2) is None:  # every N-th block: none when the model has fewer than N blocks
                return tuple(range(step - 1, n_blocks, step))
            start = int(match.group(2))
            if not -n_blocks <= start < n_blocks:
                raise RecipeError(f"{key}: start block {start} is out of range for n_blocks={n_blocks}")
            return tuple(range(start % n_blocks, n_blocks, step))
        raise RecipeError(f"{key}: unknown placement {spec!r}; expected 'all', 'none', 'every N', 'every N from K' or a list of block indices")
    if isinstance(spec, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        out = set()
        for i in spec:
            if not -n_blocks <= i < n_blocks:
                raise RecipeError(f"{key}: block index {i} is out of range; the model has n_blocks={n_blocks} (valid: 0..{n_blocks - 1}, or negative from the end)")
            out.add(i % n_blocks)
        return tuple(sorted(out))
    raise RecipeError(f"{key}: expected 'all', 'none', 'every N' or a list of block indices, got {spec!r}")


def constructor_parameters(cls: type[TriPathComponent]) -> dict[str, inspect.Parameter]:
    """The recipe-settable keywords of a component constructor (everything but d_model and layer_idx)."""
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items() if name not in _CONSTRUCTOR_SUPPLIED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


_PLAIN_TYPES = (bool, int, float, str)


def _check_unannotated(cls: type[TriPathComponent], param: inspect.Parameter, value: Any, key: str) -> None:
    """A keyword without a type annotation: check the value against the type of its default, if it is plain.

    jsonargparse lets anything through an unannotated parameter, so ``"two"`` would reach the constructor and
    fail inside torch. With a plain default (bool, int, float, str) the default's type is the expected one;
    otherwise nothing can be checked, and the recipe is refused with what the component should declare.
    """
    if param.annotation is not inspect.Parameter.empty:
        return
    default = param.default
    if type(default) not in _PLAIN_TYPES:
        raise RecipeError(
            f"{key}: {cls.__name__} does not annotate its argument {param.name!r}, so a recipe value cannot be checked; "
            f"the component must declare its type (e.g. `{param.name}: int = ...`), see CONTRIBUTING.md"
        )
    expected = type(default)
    ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise RecipeError(f"{key}: expected {expected.__name__} (the type of {cls.__name__}'s default {default!r}), got {value!r}")


def _check_args(cls: type[TriPathComponent], args: dict[str, Any], key: str) -> dict[str, Any]:
    params = constructor_parameters(cls)
    unknown = sorted(set(args) - set(params))
    if unknown:
        valid = ", ".join(sorted(params)) or "(none)"
        raise RecipeError(f"{key}: unknown argument(s) {', '.join(map(repr, unknown))} for {cls.__name__}; valid: {valid}")
    for name, value in args.items():
        _check_unannotated(cls, params[name], value, f"{key}.{name}")
    # Type-check against the constructor annotations with jsonargparse, the same machinery LightningCLI uses.
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, skip=set(_CONSTRUCTOR_SUPPLIED))
    try:
        parser.parse_object(args)
    except Exception as exc:  # jsonargparse raises ArgumentError with a useful text
        raise RecipeError(f"{key}: {cls.__name__} rejected its arguments: {exc}") from None
    return dict(args)


def resolve_components(components: dict[str, Any], n_blocks: int, registry: Registry, where: str = "components") -> list[ResolvedComponent]:
    """Validate the ``components`` section of a recipe against the registry.

    Args:
        components: instance name -> spec (see the module docstring).
        n_blocks: number of blocks of the model.
        registry: discovered components.
        where: key prefix for error messages (the CLI adds the file name).

    Raises:
        RecipeError: unknown component, unknown key or argument, wrong type, block out of range, two routers
            in a block.
    """
    if not isinstance(components, dict) or not components:
        raise RecipeError(f"{where}: expected a non-empty mapping of instance name -> component spec")
    resolved = []
    routers_per_block: dict[int, str] = {}
    for name, spec in components.items():
        key = f"{where}.{name}"
        if not isinstance(spec, dict):
            raise RecipeError(f"{key}: expected a mapping with keys {', '.join(SPEC_KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise RecipeError(f"{key}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(SPEC_KEYS)}")
        if "component" not in spec:
            raise RecipeError(f"{key}: missing 'component'; available: {', '.join(registry.names())}")
        try:
            entry = registry.resolve(str(spec["component"]))
        except ValueError as exc:
            raise RecipeError(f"{key}.component: {exc}") from None
        args = spec.get("args") or {}
        if not isinstance(args, dict):
            raise RecipeError(f"{key}.args: expected a mapping of hyper-parameters, got {args!r}")
        args = _check_args(entry.cls, args, f"{key}.args")
        blocks = parse_blocks(spec.get("blocks", "all"), n_blocks, f"{key}.blocks")
        layerscale = spec.get("layerscale", entry.cls.layerscale_init)
        if not isinstance(layerscale, int | float) or isinstance(layerscale, bool):
            raise RecipeError(f"{key}.layerscale: expected a number, got {layerscale!r}")
        gated = spec.get("gated", entry.cls.gated_by_router)
        if not isinstance(gated, bool):
            raise RecipeError(f"{key}.gated: expected true or false, got {gated!r}")
        item = ResolvedComponent(name, entry, blocks, args, float(layerscale), gated)
        if item.is_router:
            for b in blocks:
                if b in routers_per_block:
                    raise RecipeError(f"{key}.blocks: block {b} already has the router {routers_per_block[b]!r}; a block holds at most one router")
                routers_per_block[b] = name
        resolved.append(item)
    return resolved
