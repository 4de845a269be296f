"""The contract between the hydra-kit core and every component plugin.

A component is one mechanism of the Hydra tri-path block (docs/design.md section 3.1): the SSM backbone, sparse
global attention, a mixture of experts, a memory, or the router that gates them. First-party and third-party
components are found the same way, through the entry-point group ``hydra_kit.components``, and the core only
ever talks to them through the classes in this file.

Construction: ``Component(d_model, layer_idx, *, typed keyword hyper-parameters)``. The block supplies
``d_model`` and ``layer_idx``; the recipe supplies the keywords.

Forward: ``forward(x, context, state)`` takes the normalised block input ``x`` of shape (B, L, D) and returns a
:class:`ComponentOutput`. When ``state`` is given, ``x`` continues the sequence that produced the state; the
returned ``state`` summarises everything up to the last token of ``x``. Processing a sequence in pieces while
carrying the state must give the same outputs as one call on the whole sequence (the conformance check in
:mod:`hydra_kit.testing` verifies this for every component).

Per-parameter optimiser hints (attributes set on ``nn.Parameter`` objects, read by the LightningModule):

* ``_hydra_no_weight_decay = True``: exclude from weight decay (norm gains, biases and decay rates are
  excluded automatically when they are 1-D).
* ``_hydra_lr_scale = float``: multiply the base learning rate for this parameter (e.g. PKM values).
* ``_hydra_sparse_grad = True``: the parameter receives sparse gradients (``nn.EmbeddingBag(sparse=True)``);
  it is updated with SparseAdam (see :mod:`hydra_kit.optim`).

Diagnostics (optional, backwards compatible): on the training steps a diagnostics logger samples, and in
``hydra-kit inspect``, the block passes ``context.diagnostics = True``; a component may then add statistics too
costly for every step to its ``stats`` (still detached scalars). A component that attends over positions may
also offer ``attention_map(x, context, positions=None) -> AttentionMap`` for inspection (see
:class:`AttentionMap`); the core calls it only where it exists.

Document boundaries (docs/design.md 3.10): a packed training window holds several documents. The block then hands
every component ``context.segment_ids`` (B, L); a token whose id differs from the previous token's starts a new
document, and the component must compute, from there on, what it computes for that document alone (no state,
attention, slot or summary of an earlier document may reach it). A component class says it can with
``supports_resets = True``; the block refuses a batch with segment ids when a component of the model does not,
naming it (never silently leaking across documents). Segment ids come only with a forward from the start of a
sequence (``state=None``); the helpers in :mod:`hydra_kit.ops.segments` derive the masks.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "AttentionMap",
    "ComponentContext",
    "ComponentOutput",
    "ComponentPath",
    "RouterComponent",
    "RouterOutput",
    "TriPathComponent",
    "collects_aux",
    "wants_diagnostics",
]


class ComponentPath(str, enum.Enum):
    """Which path of the tri-path block a component belongs to."""

    SEQUENCE = "sequence"  # mixes information across time steps: SSM, sparse/dense attention
    CHANNEL = "channel"  # transforms each token on its own: MLP, mixture of experts
    MEMORY = "memory"  # reads from a store: workspace slots, product-key memory
    ROUTER = "router"  # produces the gates of the other components; at most one per block


@dataclass
class ComponentContext:
    """What the block hands a component besides its input.

    Attributes:
        global_score: (B, L) router score s_t (docs/design.md 3.2, R3), used by sparse global attention to pick global
            tokens. None when the block has no router.
        keep: (B, L) bool, only with a router gate threshold (at inference, and in training for a router that
            skips there too): False marks tokens whose gate for this component is below the threshold. The block zeroes their contribution whatever the component
            does; a component that honours ``keep`` skips their work (e.g. issues no attention query).
        collect_aux: False when the caller discards auxiliary losses and statistics (decoding): the component
            may then skip computing them and return empty dicts. The update and the state must not change.
        diagnostics: True on the few steps whose statistics are logged per block (and in ``hydra-kit inspect``):
            the component may add statistics too costly for every step (attention shares, entropies). The
            update and the state must not change. Components that ignore it keep working.
        segment_ids: (B, L) integer document ids of a packed window, or None (one document). Token t starts a
            new document when ``segment_ids[:, t] != segment_ids[:, t - 1]``; position 0 starts nothing. Only
            given with ``state=None`` (whole training and validation windows, whose returned state nobody
            continues), and only to components whose class sets ``supports_resets = True``.
    """

    global_score: Tensor | None = None
    keep: Tensor | None = None
    collect_aux: bool = True
    diagnostics: bool = False
    segment_ids: Tensor | None = None


def collects_aux(context: ComponentContext | None) -> bool:
    """Whether the caller wants auxiliary losses and statistics (no context: yes)."""
    return context is None or context.collect_aux


def wants_diagnostics(context: ComponentContext | None) -> bool:
    """Whether the caller asks for the costlier diagnostic statistics too (no context: no)."""
    return context is not None and context.diagnostics and context.collect_aux


@dataclass
class AttentionMap:
    """Where some queries of a sequence look: what an attending component's ``attention_map`` returns.

    The sequence starts at position 0 (no carried state). Only inspection uses it: it may cost O(Q * L) memory.

    Attributes:
        weights: (B, H, Q, L) attention probabilities of the queries at ``positions`` over the key positions
            (0 where a key is not visible).
        positions: (Q,) long positions of the queries.
        visible: (B, Q, L) bool, the key positions each query may read.
        via_global: (B, Q, L) bool, those it reads through a set of global tokens rather than a local window
            (all False for a component without one).
    """

    weights: Tensor
    positions: Tensor
    visible: Tensor
    via_global: Tensor


@dataclass
class ComponentOutput:
    """What a component returns from ``forward`` and ``step``.

    Attributes:
        update: (B, L, D) residual update (before LayerScale and gating), or (B, D) from ``step``.
        aux_losses: scalar losses, already weighted, that the trainer adds to the task loss and logs apart.
        stats: detached scalars for the logs (gate means, expert load, slot usage, ...).
        state: the recurrent state after the last input token; None for stateless components.
    """

    update: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    state: Any = None


@dataclass
class RouterOutput:
    """What a router returns: gates for the other components of its block.

    Attributes:
        gates: (B, L, G) gate values in (0, 1), one column per gated component, in the order of
            :meth:`RouterComponent.configure_gates`.
        global_score: (B, L) global-token score s_t for sparse global attention.
        aux_losses: scalar losses, already weighted (e.g. the usage-budget loss R4).
        stats: detached scalars (mean gate per component).
    """

    gates: Tensor
    global_score: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class TriPathComponent(nn.Module, abc.ABC):
    """Base class of every hydra-kit component.

    Subclasses set the class attributes below, call ``super().__init__(d_model, layer_idx)`` and implement
    :meth:`forward`. Stateful components (anything that looks at other time steps) also implement
    :meth:`init_state` and return their state from ``forward``.

    Class attributes:
        path: the block path this component belongs to.
        gated_by_router: whether a router in the same block gates this component (the SSM backbone is
            always on, so it says False).
        layerscale_init: initial value of the learnable LayerScale scalar g (docs/design.md 3.1).
        max_seq_len: the longest sequence one ``forward`` supports, or None for no limit.
        example_init_args: small hyper-parameters that exercise the component's internal boundaries
            (windows, chunks) at short lengths; the conformance check and the docs use them.
        supports_resets: the component honours ``context.segment_ids``: at every document start inside a
            window it starts afresh (see the module docstring). An instance whose configuration cannot (a
            routing mode, a backend) says why in :meth:`resets_refusal`.
    """

    path: ClassVar[ComponentPath]
    gated_by_router: ClassVar[bool] = True
    layerscale_init: ClassVar[float] = 1.0
    max_seq_len: ClassVar[int | None] = None
    example_init_args: ClassVar[dict[str, Any]] = {}
    supports_resets: ClassVar[bool] = False

    def __init__(self, d_model: int, layer_idx: int) -> None:
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"{type(self).__name__}: d_model must be positive, got {d_model}")
        self.d_model = d_model
        self.layer_idx = layer_idx

    @property
    def pointwise(self) -> bool:
        """True when the output at t depends only on the input at t (lets the block gather kept tokens)."""
        return False

    @abc.abstractmethod
    def forward(
        self, x: Tensor, context: ComponentContext | None = None, state: Any = None
    ) -> ComponentOutput:
        """Process x (B, L, D), continuing from ``state`` when given; return a :class:`ComponentOutput`."""

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> Any:
        """The state before the first token (None for stateless components)."""
        return None

    def resets_refusal(self) -> str | None:
        """Why this instance cannot honour document boundaries (``context.segment_ids``), or None when it can.

        The default follows the class's ``supports_resets``; components whose support depends on their
        hyper-parameters override it and return a reason in words.
        """
        if type(self).supports_resets:
            return None
        return f"{type(self).__name__} does not declare supports_resets = True"

    def active_parameters(self) -> int:
        """Parameters used to process one token (all of them, unless the component routes sparsely)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at sequence length ``seq_len`` (a multiply-add counts 2).

        The default counts one multiply-add per active parameter; components whose cost depends on the
        length (attention, scans) or is not a plain matmul (lookups) override it.
        """
        return 2.0 * self.active_parameters()

    def step(self, x_t: Tensor, state: Any, context: ComponentContext | None = None) -> ComponentOutput:
        """Process one token x_t (B, D) given the state; returns update (B, D) and the new state.

        The default runs ``forward`` on a length-1 sequence; components override it where a dedicated
        single-token path is faster.
        """
        step_context = None
        if context is not None:
            step_context = ComponentContext(
                global_score=None if context.global_score is None else context.global_score[:, None],
                keep=None if context.keep is None else context.keep[:, None],
                collect_aux=context.collect_aux,
                diagnostics=context.diagnostics,
            )
        out = self.forward(x_t[:, None], step_context, state)
        return ComponentOutput(out.update[:, 0], out.aux_losses, out.stats, out.state)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, layer_idx={self.layer_idx}"


class RouterComponent(TriPathComponent):
    """Base class of routers: per-token gates for the gated components of one block (docs/design.md 3.2).

    The block calls :meth:`configure_gates` once, right after construction, with the instance names of the
    components it gates; the router creates its gate parameters there. At inference, tokens whose gate is
    below ``gate_threshold`` skip the gated component; with ``skip_in_training`` they skip it in training too
    (the component is not computed for them, so they give it no gradient), except a random share ``explore`` of
    them, served anyway in training so that their gates learn from the task whether the component helps them.

    The block scales component c's update by ``g_c * gate_gain * r_t^c``: ``r`` in (0, 1) is the gate the
    threshold and the usage budget speak of, and ``gate_gain`` (default 1) lets a router centre its residual
    weight on 1 at initialisation (gain 2 with gates starting at 0.5) instead of halving every gated path.
    """

    path: ClassVar[ComponentPath] = ComponentPath.ROUTER
    gated_by_router: ClassVar[bool] = False
    gate_threshold: float = 0.0
    skip_in_training: bool = False
    explore: float = 0.0
    gate_gain: float = 1.0

    @abc.abstractmethod
    def configure_gates(self, names: list[str]) -> None:
        """Create one gate per name, in this order."""

    @abc.abstractmethod
    def route(self, x: Tensor) -> RouterOutput:
        """Compute gates (B, L, G) and the global-token score (B, L) from the block input x (B, L, D).

        A router may also accept a keyword-only ``collect_aux: bool = True``: the block then passes False when
        decoding, and the router may skip its auxiliary losses and statistics (routers without it keep working).
        """

    def forward(
        self, x: Tensor, context: ComponentContext | None = None, state: Any = None
    ) -> ComponentOutput:
        raise TypeError(f"{type(self).__name__} is a router: the block calls route(), not forward()")
