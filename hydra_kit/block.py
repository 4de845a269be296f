"""The tri-path block (docs/design.md 3.1, paper eq. 5, pre-norm).

::

    u_t = RMSNorm(x_t)
    r_t = Router(u_t)                                   # one gate per gated component, in (0, 1)
    y_t = x_t + sum_c g_c * a * r_t^c * Component_c(u)_t    # r^c = 1 for ungated components or without a router

``a`` is the router's ``gate_gain`` (2 for hydra-kit's router, so that a gate at its initial 0.5 passes a path
at its full LayerScale; see :class:`~hydra_kit.protocol.RouterComponent`).

A block holds only the components its recipe places there; an absent component contributes nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from hydra_kit.ops import RMSNorm, rms_norm
from hydra_kit.ops.packed import PackedWeights, Reader
from hydra_kit.ops.residual import ResidualPlan, gated_residual
from hydra_kit.ops.segments import check_segment_ids
from hydra_kit.protocol import ComponentContext, ComponentOutput, RouterComponent, RouterOutput, TriPathComponent


@dataclass
class BlockOutput:
    """Output of one block.

    Attributes:
        hidden: (B, L, D) the block output y.
        aux_losses: instance name -> scalar loss, e.g. ``{"moe.load_balance": ...}``.
        stats: instance name.stat -> detached scalar.
        state: instance name -> recurrent state after the last token.
        diagnostics: only from ``forward(..., diagnostics=True)``: instance name -> stat -> detached tensor, this
            block's alone. Every run instance has ``layerscale`` (g) and ``update_rel_norm``
            (||g * r * update|| / ||x||, the share of the residual stream it writes); a gated one ``gate_mean``
            and ``gate`` (all its gates r, 1-D, for a histogram); then the component's own stats (the router's
            under its instance name).
    """

    hidden: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class _DecodePlan:
    """The modules, parameters and settings a block's one-token step uses, collected once."""

    norm_weight: Tensor
    norm_eps: float
    router: RouterComponent | None
    router_name: str | None
    route_takes_collect_aux: bool
    components: tuple[tuple[str, TriPathComponent], ...]
    residual: ResidualPlan
    columns: tuple[int | None, ...]  # per component, its gate column (None: ungated or no router)


class TriPathBlock(nn.Module):
    """One Hydra block: a shared pre-norm, an optional router, and the gated sum of its components.

    Args:
        d_model: model width.
        layer_idx: index of this block.
        components: instance name -> built component (at most one router).
        layerscale: instance name -> initial LayerScale g.
        gated: names of the components the router gates (ignored without a router).
    """

    router: RouterComponent | None  # registered as a submodule; declared so the type checker knows it

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        components: dict[str, TriPathComponent],
        layerscale: dict[str, float],
        gated: set[str],
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = RMSNorm(d_model)
        routers = {n: c for n, c in components.items() if isinstance(c, RouterComponent)}
        if len(routers) > 1:
            raise ValueError(f"block {layer_idx}: at most one router per block, got {sorted(routers)}")
        self.router_name: str | None = next(iter(routers), None)
        self.router: RouterComponent | None = routers[self.router_name] if self.router_name else None
        self.mixers = nn.ModuleDict({n: c for n, c in components.items() if not isinstance(c, RouterComponent)})
        self.layerscale = nn.ParameterDict({n: nn.Parameter(torch.tensor(float(layerscale[n]))) for n in self.mixers})
        for p in self.layerscale.values():
            p._hydra_no_weight_decay = True  # type: ignore[attr-defined]
        # Gate columns follow the order of the gated components in this block.
        self.gate_index = {n: i for i, n in enumerate(n for n in self.mixers if n in gated)} if self.router else {}
        if self.router is not None:
            self.router.configure_gates(list(self.gate_index))
        # The optional keyword of RouterComponent.route; routers written without it are called without it.
        self._route_takes_collect_aux = self.router is not None and "collect_aux" in inspect.signature(self.router.route).parameters
        # Instances switched off without removing their parameters (knock-out evaluation, curriculum stages):
        # they are not run at all and contribute nothing.
        self.knocked_out: set[str] = set()
        self._decode_pack: PackedWeights[_DecodePlan] = PackedWeights()  # what a one-token step looks up, once

    def components(self) -> dict[str, TriPathComponent]:
        """The block's non-router components by instance name (an nn.ModuleDict yields them as plain Modules)."""
        return cast("dict[str, TriPathComponent]", dict(self.mixers.items()))

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        return {n: c.init_state(batch_size, device=device, dtype=dtype) for n, c in self.components().items()}

    def _run_gathered(self, component: TriPathComponent, u: Tensor, keep: Tensor, context: ComponentContext) -> ComponentOutput:
        """Run a pointwise component on the kept tokens only and scatter the result back (B, L, D)."""
        index = keep.flatten().nonzero().squeeze(1)  # (N,) kept rows of the flattened batch
        flat = u.flatten(0, 1)  # (B * L, D)
        if index.numel() == 0:  # nothing to compute, and no losses or statistics of an empty set (they would be NaN)
            return ComponentOutput(u.new_zeros(u.shape), {}, {}, None)
        out = component(flat.index_select(0, index)[None], context)  # (1, N, D): only the kept tokens are computed
        update = flat.new_zeros(flat.shape).index_copy(0, index, out.update[0])  # differentiable scatter
        return ComponentOutput(update.view(u.shape), out.aux_losses, out.stats, None)

    def resets_refusals(self) -> dict[str, str]:
        """Instance name -> why, for each instance of this block (router included) that cannot honour document
        boundaries; knocked-out instances, which do not run, are left out."""
        owners: dict[str, TriPathComponent] = dict(self.components())
        if self.router is not None and self.router_name is not None:
            owners[self.router_name] = self.router
        refusals = {}
        for name, component in owners.items():
            reason = None if name in self.knocked_out else component.resets_refusal()
            if reason is not None:
                refusals[name] = f"component {name!r} ({type(component).__name__}) in block {self.layer_idx} cannot honour them: {reason}"
        return refusals

    def forward(
        self,
        x: Tensor,
        state: dict[str, Any] | None = None,
        *,
        collect_aux: bool = True,
        diagnostics: bool = False,
        segment_ids: Tensor | None = None,
    ) -> BlockOutput:
        """Apply the block to x (B, L, D), continuing from ``state`` when given.

        ``collect_aux=False`` (decoding) lets the components skip their auxiliary losses and statistics; the
        hidden state and the recurrent state are the same either way. ``diagnostics=True`` (a few logged training
        steps, inspection) also fills ``BlockOutput.diagnostics`` and asks the components for their costlier
        statistics; it implies ``collect_aux``. ``segment_ids`` (B, L) marks the documents of a packed window
        (:class:`~hydra_kit.protocol.ComponentContext`): every component starts afresh at each document start.

        Raises:
            ValueError: ``segment_ids`` comes with a state, has the wrong shape, or a component of the block
                does not support document boundaries (the message names it).
        """
        if segment_ids is not None:
            if state is not None:
                raise ValueError(f"block {self.layer_idx}: segment_ids mark documents from the start of a sequence; they cannot continue a state")
            check_segment_ids(segment_ids, x.shape[0], x.shape[1], f"block {self.layer_idx}")
            refusals = list(self.resets_refusals().values())
            if refusals:
                raise ValueError(f"this batch marks documents (segment_ids), but {refusals[0]}")
        collect_aux = collect_aux or diagnostics
        if state is not None and x.shape[1] == 1 and not self.knocked_out and not diagnostics:
            return self._decode_step(x, state, collect_aux)
        u = self.norm(x)
        out = BlockOutput(hidden=x)
        gates: Tensor | None = None
        score: Tensor | None = None
        threshold = 0.0
        if self.router is not None:
            route: Callable[..., RouterOutput] = self.router.route  # the optional keyword is not in the base signature
            routed = route(u, collect_aux=collect_aux) if self._route_takes_collect_aux else route(u)
            gates, score = routed.gates, routed.global_score  # (B, L, G), (B, L)
            threshold = self.router.gate_threshold if self.router.skip_in_training or not self.training else 0.0
            out.aux_losses.update({f"{self.router_name}.{k}": v for k, v in routed.aux_losses.items()})
            out.stats.update({f"{self.router_name}.{k}": v for k, v in routed.stats.items()})
            if diagnostics and self.router_name is not None:
                out.diagnostics[self.router_name] = dict(routed.stats)
        decoding = state is not None and x.shape[1] == 1
        y = x
        if decoding:  # one token: each component's dedicated recurrent step (O(1) for the SSM and memories)
            u_t = u[:, 0]  # (B, D)
            score_t = None if score is None else score[:, 0]  # (B,)
        for name, component in self.components().items():
            if name in self.knocked_out:
                out.state[name] = None if state is None else state[name]
                continue
            gate = gates[..., self.gate_index[name]] if gates is not None and name in self.gate_index else None  # (B, L)
            keep = gate >= threshold if gate is not None and threshold > 0 else None
            if keep is not None and self.training and self.router is not None and self.router.explore > 0:
                # Exploration: a random share of the skipped tokens is served, so their gates hear the task.
                keep = keep | (torch.rand(keep.shape, device=keep.device) < self.router.explore)
            if keep is not None and component.pointwise:
                result = self._run_gathered(component, u, keep, ComponentContext(collect_aux=collect_aux, diagnostics=diagnostics))
            elif decoding:
                assert state is not None
                step_context = ComponentContext(score_t, None if keep is None else keep[:, 0], collect_aux, diagnostics)
                stepped = component.step(u_t, state[name], step_context)
                result = ComponentOutput(stepped.update[:, None], stepped.aux_losses, stepped.stats, stepped.state)
            else:
                context = ComponentContext(global_score=score, keep=keep, collect_aux=collect_aux, diagnostics=diagnostics, segment_ids=segment_ids)
                result = component(u, context, None if state is None else state[name])
            update = result.update
            scale = self.layerscale[name]
            if gate is not None:
                assert self.router is not None
                weight = gate if keep is None else gate * keep
                if self.router.gate_gain != 1.0:
                    scale = scale * self.router.gate_gain
                scale = scale * weight.unsqueeze(-1).to(update.dtype)  # (B, L, 1): g_c * gain * r_t^c
            y = torch.addcmul(y, update, scale)
            out.aux_losses.update({f"{name}.{k}": v for k, v in result.aux_losses.items()})
            out.stats.update({f"{name}.{k}": v for k, v in result.stats.items()})
            out.state[name] = result.state
            if diagnostics:
                out.diagnostics[name] = self._diagnose(name, x, update, scale, gate, result.stats)
        out.hidden = y
        return out

    @torch.no_grad()
    def _diagnose(self, name: str, x: Tensor, update: Tensor, scale: Tensor, gate: Tensor | None, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The per-block diagnostics of one instance (see :class:`BlockOutput`); x, update (B, L, D), gate (B, L)."""
        # Norms over the whole batch: the ratio of the RMS sizes of what the instance writes and of the stream it
        # writes into, in float32 so a low-precision run does not overflow the sums of squares.
        written = (update * scale).float().norm()
        diag = {"layerscale": self.layerscale[name].detach().clone(), "update_rel_norm": written / x.float().norm().clamp_min(1e-12)}
        if gate is not None:
            diag["gate_mean"] = gate.float().mean()
            diag["gate"] = gate.detach().flatten()  # (B * L,)
        diag.update(stats)
        return diag

    def _decode_plan(self, read: Reader) -> _DecodePlan:
        """What a one-token step looks up on every call, looked up once (cached by ``self._decode_pack``, which
        watches every module and parameter read through ``read``)."""
        names = list(self.mixers)
        components = tuple((name, cast("TriPathComponent", read(f"mixers.{name}"))) for name in names)
        router = cast("RouterComponent | None", read("router"))
        columns = [self.gate_index.get(name) if router is not None else None for name in names]
        residual = ResidualPlan(columns, [read(f"layerscale.{name}") for name in names])
        norm_eps = read("norm").eps
        return _DecodePlan(read("norm.weight"), norm_eps, router, self.router_name, self._route_takes_collect_aux, components, residual, tuple(columns))

    def _decode_step(self, x: Tensor, state: dict[str, Any], collect_aux: bool) -> BlockOutput:
        """:meth:`forward` for one token per sequence, x (B, 1, D).

        The same arithmetic as the general loop with L = 1, in fewer ops: decoding runs this for every block and
        token, and each PyTorch op or module attribute lookup costs microseconds here, several times more while
        the weights stream through the caches. The modules and parameters it needs are looked up once
        (:meth:`_decode_plan`; the components' ``step`` methods are still looked up per call, so a replaced
        method takes effect), and the gated sum of the updates is one call
        (:func:`hydra_kit.ops.residual.gated_residual`).

        Under a gate threshold, a component whose gate is below it for every sequence of the batch is not run
        when it is pointwise (no state to keep), and is stepped with ``context.keep`` otherwise (it must still take
        the token into its state: SGA's keys, the workspace's pending chunk); the skipped rows' weights are zero.
        """
        plan = self._decode_pack.get(self, self._decode_plan)
        router = plan.router
        threshold = 0.0
        if router is not None and router.gate_threshold > 0 and (router.skip_in_training or not self.training):
            threshold = router.gate_threshold
        u = rms_norm(x, plan.norm_weight, plan.norm_eps)  # (B, 1, D)
        out = BlockOutput(hidden=x)
        gates = score = None
        if router is not None:
            route: Callable[..., RouterOutput] = router.route  # the optional keyword is not in the base signature
            routed = route(u, collect_aux=collect_aux) if plan.route_takes_collect_aux else route(u)
            gates, score = routed.gates[:, 0], routed.global_score[:, 0]  # (B, G), (B,)
            if routed.aux_losses:
                out.aux_losses.update({f"{plan.router_name}.{k}": v for k, v in routed.aux_losses.items()})
            if routed.stats:
                out.stats.update({f"{plan.router_name}.{k}": v for k, v in routed.stats.items()})
        u_t = u[:, 0]  # (B, D)
        context = ComponentContext(score, None, collect_aux)
        kept = None if gates is None or threshold == 0 else gates >= threshold  # (B, G)
        updates = []
        for (name, component), column in zip(plan.components, plan.columns, strict=True):
            step_context = context
            if kept is not None and column is not None:
                keep = kept[:, column]  # (B,)
                if component.pointwise and not bool(keep.any()):  # skipped by every row, and nothing to carry
                    updates.append(u_t.new_zeros(u_t.shape))
                    out.state[name] = state[name]
                    continue
                step_context = ComponentContext(score, keep, collect_aux)
            stepped = component.step(u_t, state[name], step_context)
            updates.append(stepped.update)
            if stepped.aux_losses:
                out.aux_losses.update({f"{name}.{k}": v for k, v in stepped.aux_losses.items()})
            if stepped.stats:
                out.stats.update({f"{name}.{k}": v for k, v in stepped.stats.items()})
            out.state[name] = stepped.state
        if gates is not None and router is not None and router.gate_gain != 1.0:
            gates = gates * router.gate_gain
        if kept is not None and gates is not None:
            gates = gates * kept  # skipped rows contribute nothing, whatever their component returned
        out.hidden = gated_residual(x[:, 0], updates, gates, plan.residual)[:, None]  # (B, 1, D)
        return out
