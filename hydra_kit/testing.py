"""The public conformance check every component must pass, first-party and third-party alike.

Use it from a plugin's own tests::

    from hydra_kit.testing import check_component
    from my_plugin import MyMixer

    def test_my_mixer_conforms():
        check_component(MyMixer, init_args={"hidden": 16})

Each property is a separate function so a failure says which one broke:

* the constructor's keyword hyper-parameters are annotated (recipes are type-checked against the annotations)
  and there is no ``**kwargs``;
* the constructor runs on the meta device, where ``hydra-kit summary`` builds models of any size without memory
  (a constructor that turns a tensor into a Python number, ``float(torch.logit(torch.tensor(p)))``, fails there);
* the module as its constructor built it (not yet cast by the check) trains in the default dtype (float32): its
  floating parameters and buffers are in that dtype, and a forward and backward in train mode work, as in ``fit``;
* shape and dtype are kept (float32 and float64);
* causality: changing inputs after position t leaves outputs up to t unchanged;
* chunked processing with the carried state equals one full forward, and so does token-by-token ``step``;
* ``forward`` with ``init_state`` equals ``forward`` without a state;
* with ``collect_aux=False`` (decoding) ``forward`` and ``step`` give the same updates and states, also for a
  single sequence (where components may take a dedicated fast path);
* gradients are finite and reach the parameters;
* auxiliary losses and stats are scalars, stats are detached;
* for a class that declares ``supports_resets = True``, document boundaries (``context.segment_ids``) are
  honoured: a second document packed after a first one gets the outputs it gets alone, the first one's outputs
  do not depend on what follows, and nothing of the first reaches the second (:func:`check_resets`).

Routers (:class:`~hydra_kit.protocol.RouterComponent`) get the router version of these checks.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from hydra_kit.protocol import ComponentContext, ComponentOutput, RouterComponent, RouterOutput, TriPathComponent

__all__ = [
    "ConformanceError",
    "check_as_constructed",
    "check_builds_on_meta",
    "check_causality",
    "check_chunked_equals_full",
    "check_component",
    "check_constructor",
    "check_gradients",
    "check_outputs_well_formed",
    "check_resets",
    "check_router",
    "check_step_equals_full",
    "check_without_aux",
]

ComponentFactory = Callable[..., TriPathComponent]


class ConformanceError(AssertionError):
    """A component broke the TriPathComponent contract; the message says which property and where."""


def _name(component: TriPathComponent) -> str:
    return type(component).__name__


def _context(score: Tensor | None, start: int = 0, stop: int | None = None, collect_aux: bool = True) -> ComponentContext:
    if score is None:
        return ComponentContext(collect_aux=collect_aux)
    return ComponentContext(global_score=score[:, start:stop], collect_aux=collect_aux)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _inputs(batch: int, seq_len: int, d_model: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, d_model, generator=gen, dtype=torch.float64).to(dtype)
    score = torch.randn(batch, seq_len, generator=gen, dtype=torch.float64).to(dtype)
    return x, score


def check_constructor(cls: type) -> None:
    """Every recipe-settable constructor keyword has a type annotation, and there is no ``**kwargs``.

    Recipes set these keywords and are checked against the annotations before anything is built; an unannotated
    keyword would let ``"two"`` through to the constructor, and ``**kwargs`` would swallow typos.
    """
    params = list(inspect.signature(cls).parameters.values())  # the constructor without self
    loose = [p.name for p in params if p.kind == p.VAR_KEYWORD]
    if loose:
        raise ConformanceError(f"{cls.__name__}.__init__ takes **{loose[0]}: list the hyper-parameters as typed keywords instead")
    untyped = [p.name for p in params[2:] if p.kind != p.VAR_POSITIONAL and p.annotation is inspect.Parameter.empty]
    if untyped:
        raise ConformanceError(
            f"{cls.__name__}.__init__: keyword(s) {', '.join(untyped)} have no type annotation; recipes are checked "
            f"against the annotations, so annotate them (e.g. `hidden: int = 4`)"
        )


def check_builds_on_meta(factory: ComponentFactory, d_model: int, init_args: dict[str, Any]) -> None:
    """The constructor runs on the meta device (shapes only, no memory), as ``hydra-kit summary`` builds models.

    A meta tensor has no value, so a constructor that reads one back into Python (``float(t)``, ``t.item()``,
    ``if t > 0``) fails there; compute such constants with Python's :mod:`math` or keep them as tensors.
    """
    name = getattr(factory, "__name__", repr(factory))
    try:
        with torch.device("meta"):
            factory(d_model, 0, **init_args)
    except Exception as exc:  # whatever the constructor raises on meta tensors is the finding
        raise ConformanceError(
            f"{name}: the constructor fails on the meta device ({type(exc).__name__}: {exc}); hydra-kit summary builds "
            f"models there to count parameters of any size: compute constants with Python's math (e.g. "
            f"math.log(p / (1 - p)), not float(torch.logit(torch.tensor(p)))) or keep them as tensors"
        ) from exc


def _check_dtypes(component: TriPathComponent, dtype: torch.dtype) -> None:
    name = _name(component)
    for kind, tensors in (("parameter", component.named_parameters()), ("buffer", component.named_buffers())):
        for key, tensor in tensors:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                raise ConformanceError(
                    f"{name}: {kind} {key!r} is {tensor.dtype} as constructed, but models are built and trained in "
                    f"{dtype} (Lightning does not cast buffers): create it in the default dtype"
                )


def check_as_constructed(component: TriPathComponent, x: Tensor, score: Tensor, step: bool = True) -> None:
    """The module as constructed, in train mode and the default dtype, runs forward and backward as ``fit`` does.

    The other checks cast the component to float32 and float64 first, which would hide a parameter or buffer
    created in another dtype (a float64 buffer makes the update float64, or the next matmul fail, in training).
    ``x`` and ``score`` must be in the default dtype; ``step`` also runs one ``step`` from ``init_state``.
    """
    name = _name(component)
    _check_dtypes(component, x.dtype)
    x = x.detach().clone().requires_grad_(True)
    try:
        out = component(x, _context(score))
        updates = [("forward", out.update)]
        if step:
            state = component.init_state(x.shape[0], device=x.device, dtype=x.dtype)
            stepped = component.step(x[:, 0].detach(), state, ComponentContext(global_score=score[:, 0], collect_aux=False))
            updates.append(("step", stepped.update))
        loss = out.update.square().mean() + sum(out.aux_losses.values(), torch.zeros((), dtype=x.dtype))
        loss.backward()
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConformanceError(f"{name}: the module as constructed fails in {x.dtype} (train mode, as in fit): {exc}") from exc
    for what, update in updates:
        if update.dtype != x.dtype:
            raise ConformanceError(f"{name}: the module as constructed returns a {update.dtype} update from {what} for {x.dtype} input")
    component.zero_grad(set_to_none=True)


def check_outputs_well_formed(component: TriPathComponent, x: Tensor, score: Tensor) -> ComponentOutput:
    """Shape and dtype kept; aux losses and stats are finite scalars; stats carry no gradient."""
    out = component(x, _context(score))
    name = _name(component)
    if not isinstance(out, ComponentOutput):
        raise ConformanceError(f"{name}.forward returned {type(out).__name__}, expected ComponentOutput")
    if out.update.shape != x.shape:
        raise ConformanceError(f"{name}: update has shape {tuple(out.update.shape)}, input {tuple(x.shape)}")
    if out.update.dtype != x.dtype:
        raise ConformanceError(f"{name}: update has dtype {out.update.dtype} for input dtype {x.dtype}")
    if not torch.isfinite(out.update).all():
        raise ConformanceError(f"{name}: update has non-finite values")
    for kind, values in (("aux loss", out.aux_losses), ("stat", out.stats)):
        for key, value in values.items():
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise ConformanceError(f"{name}: {kind} {key!r} must be a 0-dim tensor, got {value!r}")
            if not torch.isfinite(value):
                raise ConformanceError(f"{name}: {kind} {key!r} is not finite ({value.item()})")
    for key, value in out.stats.items():
        if value.requires_grad:
            raise ConformanceError(f"{name}: stat {key!r} requires grad; detach stats before returning them")
    return out


def check_causality(component: TriPathComponent, x: Tensor, score: Tensor, positions: Sequence[int], atol: float) -> None:
    """Changing tokens (and router scores) after t must leave outputs at positions <= t unchanged."""
    full = component(x, _context(score)).update
    gen = torch.Generator().manual_seed(1234)
    for t in positions:
        x2, score2 = x.clone(), score.clone()
        x2[:, t + 1 :] = torch.randn(x2[:, t + 1 :].shape, generator=gen, dtype=torch.float64).to(x.dtype) * 3
        score2[:, t + 1 :] = torch.randn(score2[:, t + 1 :].shape, generator=gen, dtype=torch.float64).to(x.dtype) * 3
        changed = component(x2, _context(score2)).update
        diff = _max_diff(full[:, : t + 1], changed[:, : t + 1])
        if diff > atol:
            raise ConformanceError(
                f"{_name(component)} is not causal: changing inputs after position {t} changed outputs at or "
                f"before it by {diff:.3e} (tolerance {atol:.0e})"
            )


def check_chunked_equals_full(
    component: TriPathComponent, x: Tensor, score: Tensor, boundaries: Sequence[int], atol: float
) -> None:
    """forward on pieces, carrying state, equals one forward; init_state equals no state."""
    name = _name(component)
    full = component(x, _context(score)).update
    batch, seq_len = x.shape[:2]
    fresh = component.init_state(batch, device=x.device, dtype=x.dtype)
    with_init = component(x, _context(score), fresh).update
    diff = _max_diff(full, with_init)
    if diff > atol:
        raise ConformanceError(f"{name}: forward from init_state differs from forward without state by {diff:.3e}")
    cuts = [0, *sorted(b for b in boundaries if 0 < b < seq_len), seq_len]
    state = component.init_state(batch, device=x.device, dtype=x.dtype)
    pieces = []
    for start, stop in itertools.pairwise(cuts):
        out = component(x[:, start:stop], _context(score, start, stop), state)
        pieces.append(out.update)
        state = out.state
    chunked = torch.cat(pieces, dim=1)
    diff = _max_diff(full, chunked)
    if diff > atol:
        worst = int((full - chunked).abs().amax(dim=(0, 2)).argmax())
        raise ConformanceError(
            f"{name}: chunked forward with carried state (cuts {cuts}) differs from the full forward by "
            f"{diff:.3e} (tolerance {atol:.0e}), worst at position {worst}"
        )


def check_step_equals_full(component: TriPathComponent, x: Tensor, score: Tensor, atol: float, collect_aux: bool = True) -> None:
    """Token-by-token step from init_state equals the full forward (asking for aux losses or not)."""
    full = component(x, _context(score)).update
    state = component.init_state(x.shape[0], device=x.device, dtype=x.dtype)
    steps = []
    for t in range(x.shape[1]):
        out = component.step(x[:, t], state, ComponentContext(global_score=score[:, t], collect_aux=collect_aux))
        if out.update.shape != x[:, t].shape:
            raise ConformanceError(f"{_name(component)}.step returned shape {tuple(out.update.shape)}")
        steps.append(out.update)
        state = out.state
    diff = _max_diff(full, torch.stack(steps, dim=1))
    if diff > atol:
        how = "" if collect_aux else " with collect_aux=False"
        raise ConformanceError(
            f"{_name(component)}: step-by-step{how} (batch {x.shape[0]}) differs from the full forward by {diff:.3e}"
        )


def check_without_aux(component: TriPathComponent, x: Tensor, score: Tensor, atol: float) -> None:
    """``collect_aux=False`` may drop aux losses and stats but must not change the update."""
    full = component(x, _context(score)).update
    lean = component(x, _context(score, collect_aux=False)).update
    diff = _max_diff(full, lean)
    if diff > atol:
        raise ConformanceError(f"{_name(component)}: forward with collect_aux=False changed the update by {diff:.3e}")


def check_gradients(component: TriPathComponent, x: Tensor, score: Tensor) -> None:
    """Gradients of a loss on the update and aux losses are finite and reach the parameters and the input."""
    component.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = component(x, _context(score))
    loss = out.update.square().mean() + sum((v for v in out.aux_losses.values()), torch.zeros((), dtype=x.dtype))
    loss.backward()
    name = _name(component)
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise ConformanceError(f"{name}: the gradient with respect to the input is missing or non-finite")
    reached = 0
    for pname, param in component.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.coalesce().values() if param.grad.is_sparse else param.grad
        if not torch.isfinite(grad).all():
            raise ConformanceError(f"{name}: gradient of parameter {pname!r} is not finite")
        reached += 1
    if any(True for _ in component.parameters()) and reached == 0:
        raise ConformanceError(f"{name}: no parameter received a gradient")
    component.zero_grad(set_to_none=True)


def check_resets(component: TriPathComponent, x: Tensor, score: Tensor, aligned: int, unaligned: int, atol: float) -> None:
    """Document boundaries are honoured: a component starts afresh where ``context.segment_ids`` changes.

    Example 0 of the batch packs two documents, example 1 holds one. For a split at ``aligned`` (a start on every
    internal chunk boundary of the component) the second document's updates equal those of the document alone;
    for either split, the first document's updates equal those of its prefix alone, the second document's do not
    change when the first document's inputs and scores do, and the one-document example equals a forward without
    segment ids. A router (which sees no context) must give each token's gates and score from that token alone.

    Args:
        x: (B >= 2, L, D) inputs; score: (B, L) router scores.
        aligned, unaligned: where the second document starts (0 < split < L).
    """
    name = _name(component)
    gen = torch.Generator().manual_seed(4321)
    for split in (aligned, unaligned):
        x2, score2 = x.clone(), score.clone()
        x2[:, :split] = torch.randn(x2[:, :split].shape, generator=gen, dtype=torch.float64).to(x.dtype) * 3
        score2[:, :split] = torch.randn(score2[:, :split].shape, generator=gen, dtype=torch.float64).to(x.dtype) * 3
        if isinstance(component, RouterComponent):
            a, b = component.route(x), component.route(x2)
            diff = max(_max_diff(a.gates[:, split:], b.gates[:, split:]), _max_diff(a.global_score[:, split:], b.global_score[:, split:]))
            if diff > atol:
                raise ConformanceError(f"{name} declares supports_resets but its gates or scores after position {split} depend on earlier tokens ({diff:.3e})")
            continue
        segment_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        segment_ids[0, split:] = 1

        def run(inputs: Tensor, scores: Tensor, ids: Tensor | None) -> Tensor:
            return component(inputs, ComponentContext(global_score=scores, segment_ids=ids)).update

        packed = run(x, score, segment_ids)
        checks = [
            ("the first document's updates differ from those of its prefix alone", packed[:1, :split], run(x[:1, :split], score[:1, :split], None)),
            ("the second document's updates change with the first document's inputs", packed[:1, split:], run(x2, score2, segment_ids)[:1, split:]),
            ("a one-document example differs from a forward without segment_ids", packed[1:], run(x[1:], score[1:], None)),
        ]
        if split == aligned:
            checks.append(("the second document's updates differ from those of the document alone", packed[:1, split:], run(x[:1, split:], score[:1, split:], None)))
        for what, got, want in checks:
            diff = _max_diff(got, want)
            if diff > atol:
                raise ConformanceError(f"{name} declares supports_resets, but with documents split at {split} {what} by {diff:.3e} (tolerance {atol:.0e})")


def check_router(router: RouterComponent, x: Tensor, gate_names: Sequence[str], atol: float) -> None:
    """Router gates are (B, L, G) in (0, 1), scores (B, L), both causal; aux losses and stats scalars."""
    name = _name(router)
    out = router.route(x)
    batch, seq_len = x.shape[:2]
    if out.gates.shape != (batch, seq_len, len(gate_names)):
        raise ConformanceError(f"{name}: gates have shape {tuple(out.gates.shape)}, expected {(batch, seq_len, len(gate_names))}")
    if not ((out.gates > 0) & (out.gates < 1)).all():
        raise ConformanceError(f"{name}: gates must lie strictly in (0, 1)")
    if out.global_score.shape != (batch, seq_len):
        raise ConformanceError(f"{name}: global_score has shape {tuple(out.global_score.shape)}")
    for key, value in {**out.aux_losses, **out.stats}.items():
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise ConformanceError(f"{name}: aux loss or stat {key!r} must be a 0-dim tensor")
    t = seq_len // 2
    x2 = x.clone()
    x2[:, t + 1 :] += 5.0
    out2 = router.route(x2)
    route: Callable[..., RouterOutput] = router.route  # collect_aux is an optional keyword, not in the base signature
    lean = route(x, collect_aux=False) if "collect_aux" in inspect.signature(route).parameters else out
    lean_diff = max(_max_diff(out.gates, lean.gates), _max_diff(out.global_score, lean.global_score))
    if lean_diff > atol:
        raise ConformanceError(f"{name}: route(collect_aux=False) changed gates or scores by {lean_diff:.3e}")
    diff = max(_max_diff(out.gates[:, : t + 1], out2.gates[:, : t + 1]), _max_diff(out.global_score[:, : t + 1], out2.global_score[:, : t + 1]))
    if diff > atol:
        raise ConformanceError(f"{name} is not causal: future inputs changed gates or scores by {diff:.3e}")
    loss = out.gates.sum() + out.global_score.sum() + sum(out.aux_losses.values(), torch.zeros((), dtype=x.dtype))
    loss.backward()
    if not all(p.grad is not None and torch.isfinite(p.grad).all() for p in router.parameters()):
        raise ConformanceError(f"{name}: some router parameter got no gradient or a non-finite one")
    router.zero_grad(set_to_none=True)


def check_component(
    factory: ComponentFactory,
    *,
    init_args: dict[str, Any] | None = None,
    d_model: int = 32,
    batch: int = 2,
    seq_len: int = 40,
    boundaries: Sequence[int] = (1, 13, 29),
    check_step: bool = True,
    atol: float = 1e-8,
    seed: int = 0,
    resets_aligned: int = 16,
    resets_unaligned: int = 13,
) -> None:
    """Run every conformance property on a freshly built component; raise ConformanceError on the first break.

    Args:
        factory: the component class (or any callable with the component constructor's signature).
        init_args: keyword hyper-parameters; defaults to the class's ``example_init_args`` when it has them.
            Choose small values that exercise internal boundaries (windows, chunks) within ``seq_len``.
        d_model: model width for the check.
        batch: batch size (at least 2, so mixing across examples would show).
        seq_len: sequence length.
        boundaries: where to cut the sequence for the chunked check (a length-1 piece is included).
        check_step: also compare token-by-token ``step`` with the full forward.
        atol: tolerance of the float64 equality checks.
        seed: seed of the random inputs and parameters.
        resets_aligned, resets_unaligned: where the second document starts in the document-boundary check (run
            for classes that declare ``supports_resets = True``): ``resets_aligned`` on a boundary of every
            internal chunk grid of the component (with ``init_args``), ``resets_unaligned`` off them.
    """
    if init_args is None:
        init_args = dict(getattr(factory, "example_init_args", {}))
    if isinstance(factory, type):
        check_constructor(factory)
    check_builds_on_meta(factory, d_model, init_args)
    torch.manual_seed(seed)
    component = factory(d_model, 0, **init_args)
    if not isinstance(component, TriPathComponent):
        raise ConformanceError(f"{factory!r} built {type(component).__name__}, not a TriPathComponent")
    default = torch.get_default_dtype()
    if isinstance(component, RouterComponent):
        names = ["first", "second", "third"]
        component.configure_gates(names)
        _check_dtypes(component, default)
        x, _ = _inputs(batch, seq_len, d_model, default, seed)
        try:  # as constructed, in train mode: what fit runs
            out = component.route(x)
            (out.gates.sum() + out.global_score.sum()).backward()
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConformanceError(f"{_name(component)}: the router as constructed fails in {default} (train mode): {exc}") from exc
        component.zero_grad(set_to_none=True)
        component.eval()
        x, score = _inputs(batch, seq_len, d_model, torch.float64, seed)
        check_router(component.double(), x, names, atol)
        if getattr(type(component), "supports_resets", False) and component.resets_refusal() is None:
            check_resets(component, x, score, resets_aligned, resets_unaligned, atol)
        return
    check_as_constructed(component, *_inputs(batch, seq_len, d_model, default, seed), step=check_step)
    component.eval()  # dropout and other train-time noise would break the equality checks
    for dtype in (torch.float32, torch.float64):
        x, score = _inputs(batch, seq_len, d_model, dtype, seed)
        check_outputs_well_formed(component.to(dtype), x, score)
    # Equality properties in float64, where a real bug cannot hide behind rounding.
    component = component.double()
    x, score = _inputs(batch, seq_len, d_model, torch.float64, seed)
    check_causality(component, x, score, positions=(0, seq_len // 3, seq_len - 2), atol=atol)
    check_chunked_equals_full(component, x, score, boundaries, atol)
    check_without_aux(component, x, score, atol)
    if getattr(type(component), "supports_resets", False) and component.resets_refusal() is None:
        check_resets(component, x, score, resets_aligned, resets_unaligned, atol)
    if check_step:
        steps = min(seq_len, 24)
        check_step_equals_full(component, x[:, :steps], score[:, :steps], atol)
        for rows in (slice(None), slice(0, 1)):  # a batch and a single sequence, without aux losses
            check_step_equals_full(component, x[rows, :steps], score[rows, :steps], atol, collect_aux=False)
    component.train()
    check_gradients(component, x, score)
