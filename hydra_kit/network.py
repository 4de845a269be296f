"""HydraNetwork: the plain ``nn.Module`` of a Hydra-family decoder-only language model, without Lightning.

Token embedding (tied with the output head unless ``tie_embeddings=False``), ``n_blocks`` tri-path blocks
(:mod:`hydra_kit.block`), final RMSNorm. Which component sits in which block comes from the ``components``
recipe section (:mod:`hydra_kit.recipe`); the network never imports a concrete component. Training (steps,
metrics, optimizer) is :class:`hydra_kit.model.HydraLM`, a LightningModule that owns one of these.

The instance API (:meth:`HydraNetwork.disable`, :meth:`~HydraNetwork.enable`, :meth:`~HydraNetwork.freeze`,
:meth:`~HydraNetwork.unfreeze`, :meth:`~HydraNetwork.set_knocked_out`, :meth:`~HydraNetwork.instance_parameters`,
:meth:`~HydraNetwork.block_instances`) is what callbacks may use to find, switch on and off, and freeze component
instances; they never write block internals.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from hydra_kit import accounting, export
from hydra_kit.block import TriPathBlock
from hydra_kit.ops import RMSNorm, linear
from hydra_kit.ops.segments import check_segment_ids
from hydra_kit.protocol import TriPathComponent
from hydra_kit.recipe import RecipeError, ResolvedComponent, resolve_components
from hydra_kit.registry import Registry, default_registry
from hydra_kit.sampling import decode

# The network a bare `HydraNetwork()` (and `HydraLM()`) builds: the SSM backbone with a SwiGLU MLP in every block.
DEFAULT_COMPONENTS: dict[str, dict[str, Any]] = {
    "ssm": {"component": "ssm", "blocks": "all"},
    "mlp": {"component": "mlp", "blocks": "all"},
}


@dataclass
class ModelOutput:
    """Output of :meth:`HydraNetwork.forward` (and of :meth:`hydra_kit.model.HydraLM.forward`).

    Attributes:
        logits: (B, L, V).
        aux_losses: name -> scalar, summed over the blocks holding the component instance.
        stats: name -> detached scalar, averaged over the blocks holding it.
        state: per-block recurrent state after the last token (a list of dicts).
        diagnostics: only from ``forward(..., diagnostics=True)``: per block, instance -> stat -> detached tensor,
            not averaged (see :class:`hydra_kit.block.BlockOutput`); empty otherwise.
    """

    logits: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    state: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: list[dict[str, dict[str, Tensor]]] = field(default_factory=list)


class HydraNetwork(nn.Module):
    """A Hydra-family decoder-only language model built from component plugins (a plain ``nn.Module``).

    Args:
        vocab_size: number of token ids the network accepts.
        d_model: width of the residual stream.
        n_blocks: number of tri-path blocks.
        components: the recipe's components section: instance name -> {component, blocks, args, layerscale,
            gated}; see :mod:`hydra_kit.recipe`. Default: SSM + SwiGLU MLP in every block.
        dropped: instance names removed from ``components`` before anything is built.
        init_std: standard deviation of the embedding initialisation.
        tie_embeddings: share the token embedding with the output head (docs/design.md 3.1). ``False`` gives the
            head its own (vocab_size, d_model) matrix (why the small recipes do: docs/design-decisions.md).
        registry: the components to resolve names against; default: :func:`hydra_kit.registry.default_registry`.

    Raises:
        RecipeError: a size is not positive, ``init_std`` is not a positive number, a dropped name is not an
            instance, or a component's placement or arguments are wrong (the message names the recipe key).
    """

    def __init__(
        self,
        vocab_size: int = 64,
        d_model: int = 128,
        n_blocks: int = 4,
        components: dict[str, dict[str, Any]] | None = None,
        dropped: list[str] | None = None,
        init_std: float = 0.02,
        tie_embeddings: bool = True,
        *,
        registry: Registry | None = None,
    ) -> None:
        super().__init__()
        if vocab_size <= 0 or d_model <= 0 or n_blocks <= 0:
            raise RecipeError(f"model: vocab_size ({vocab_size}), d_model ({d_model}) and n_blocks ({n_blocks}) must be positive")
        if not (isinstance(init_std, int | float) and math.isfinite(init_std) and init_std > 0):
            raise RecipeError(f"model.init_std: expected a finite number > 0, got {init_std!r}")
        spec = dict(DEFAULT_COMPONENTS if components is None else components)
        for name in dropped or []:
            if name not in spec:
                raise RecipeError(f"model.dropped: {name!r} is not a component instance of this recipe; instances: {', '.join(spec)}")
            del spec[name]
        self.vocab_size = vocab_size
        registry = registry if registry is not None else default_registry()
        self.resolved: list[ResolvedComponent] = resolve_components(spec, n_blocks, registry, "model.components")
        # Registration order (embed, head, blocks, norm) is the parameter order optimizer states are saved in.
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=init_std)
        self.head: nn.Linear | None = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        blocks = []
        for idx in range(n_blocks):
            here = [r for r in self.resolved if idx in r.blocks]
            built = {}
            for r in here:
                try:
                    built[r.name] = r.build(d_model, idx)
                except ValueError as exc:
                    raise RecipeError(f"model.components.{r.name}.args: building block {idx} failed: {exc}") from None
            blocks.append(TriPathBlock(d_model, idx, built, {r.name: r.layerscale for r in here}, {r.name for r in here if r.gated}))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(d_model)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], *, registry: Registry | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> HydraNetwork:
        """The network an export folder holds (``hydra-kit export``), with its weights, in eval mode; no Lightning.

        Args:
            folder: written by ``hydra-kit export`` (model.safetensors, config.json, tokenizer); docs/export.md.
            registry: the components to build with; default :func:`hydra_kit.registry.default_registry`.
            device: where to put the weights (default CPU).
            dtype: convert the floating-point weights (default: as stored).

        Raises:
            hydra_kit.export.ExportError: a file is missing or damaged, a component's plugin is not installed
                (names it and its distribution), or the weights do not fit; one line each.
        """
        return export.load_pretrained(cls, folder, registry=registry, device=device, dtype=dtype)

    # ------------------------------------------------------------- structure
    @property
    def tri_path_blocks(self) -> list[TriPathBlock]:
        """The blocks, typed (an nn.ModuleList yields them as plain Modules)."""
        return cast("list[TriPathBlock]", list(self.blocks))

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence every component supports (None: unbounded)."""
        limits = [r.entry.cls.max_seq_len for r in self.resolved if r.entry.cls.max_seq_len is not None]
        return min(limits) if limits else None

    def length_bound(self) -> str:
        """The component instance(s) that bound the sequence length, for error messages."""
        limit = self.max_seq_len
        names = [f"model.components.{r.name} ({r.entry.cls.__name__}, max_seq_len {limit})" for r in self.resolved if r.entry.cls.max_seq_len == limit]
        return " and ".join(names) or "no component"

    # ---------------------------------------------------------- instance API
    @property
    def instance_names(self) -> tuple[str, ...]:
        """Every component instance of the network, routers included, in recipe order."""
        return tuple(r.name for r in self.resolved)

    @property
    def router_names(self) -> frozenset[str]:
        """The router instances (they can be frozen, not knocked out: a block has no path without them)."""
        return frozenset(r.name for r in self.resolved if r.is_router)

    @property
    def knocked_out(self) -> frozenset[str]:
        """The instances switched off now (not run, zero contribution, parameters kept)."""
        return frozenset(name for block in self.tri_path_blocks for name in block.knocked_out)

    def _check_names(self, names: Iterable[str], what: str, *, routers: bool) -> set[str]:
        known = set(self.instance_names) if routers else set(self.instance_names) - self.router_names
        chosen = set(names)
        unknown = sorted(chosen - known)
        if unknown:
            raise RecipeError(f"{what}: unknown component instance(s) {unknown}; instances: {', '.join(sorted(known))}")
        return chosen

    def set_knocked_out(self, names: Iterable[str]) -> None:
        """Switch exactly these component instances off (not run, zero contribution), the others on.

        Raises:
            RecipeError: a name is not a non-router instance of this network; the message lists the instances.
        """
        chosen = self._check_names(names, "knock-out", routers=False)
        for block in self.tri_path_blocks:
            block.knocked_out = chosen & set(block.mixers)

    def disable(self, names: Iterable[str]) -> None:
        """Switch these instances off as well (knock-out: not run, parameters kept); others keep their state."""
        self.set_knocked_out(self.knocked_out | self._check_names(names, "knock-out", routers=False))

    def enable(self, names: Iterable[str]) -> None:
        """Switch these instances back on; others keep their state."""
        self.set_knocked_out(self.knocked_out - self._check_names(names, "knock-out", routers=False))

    def instance_parameters(self, name: str) -> list[nn.Parameter]:
        """Every parameter of instance ``name`` in every block: its weights and LayerScale g, or the router's.

        Raises:
            RecipeError: ``name`` is not an instance of this network.
        """
        self._check_names([name], "instance", routers=True)
        params: list[nn.Parameter] = []
        for block in self.tri_path_blocks:
            if name in block.mixers:
                params.extend(block.mixers[name].parameters())
            if name in block.layerscale:
                params.append(block.layerscale[name])
            if block.router is not None and block.router_name == name:
                params.extend(block.router.parameters())
        return params

    def block_instances(self) -> list[tuple[int, dict[str, TriPathComponent]]]:
        """Per block, in order: (its layer index, instance name -> component module), its router included."""
        rows = []
        for block in self.tri_path_blocks:
            owners = dict(block.components())
            if block.router is not None and block.router_name is not None:
                owners[block.router_name] = block.router
            rows.append((block.layer_idx, owners))
        return rows

    def freeze(self, names: Iterable[str]) -> None:
        """Stop training these instances (``requires_grad`` off for their parameters, LayerScale included)."""
        for name in self._check_names(names, "freeze", routers=True):
            for p in self.instance_parameters(name):
                p.requires_grad_(False)

    def unfreeze(self, names: Iterable[str]) -> None:
        """Train these instances again (``requires_grad`` on for their parameters)."""
        for name in self._check_names(names, "unfreeze", routers=True):
            for p in self.instance_parameters(name):
                p.requires_grad_(True)

    # ---------------------------------------------------------------- running
    def init_state(self, batch_size: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
        """Per-block recurrent state before the first token (default: the embedding's device and dtype)."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return [block.init_state(batch_size, device=device, dtype=dtype) for block in self.tri_path_blocks]

    def resets_refusals(self) -> list[str]:
        """One line per component instance (in every block) that cannot honour document boundaries; [] when all can."""
        return [line for block in self.tri_path_blocks for line in block.resets_refusals().values()]

    def forward(
        self,
        input_ids: Tensor,
        state: list[dict[str, Any]] | None = None,
        *,
        collect_aux: bool = True,
        diagnostics: bool = False,
        segment_ids: Tensor | None = None,
    ) -> ModelOutput:
        """Logits (B, L, V) for token ids (B, L); continue from ``state`` when given (chunked processing).

        ``collect_aux=False`` (decoding) skips the auxiliary losses and statistics: the output then has empty
        ``aux_losses`` and ``stats``, and the same logits and state. ``diagnostics=True`` also returns per-block
        diagnostics (``ModelOutput.diagnostics``) and lets components add their costlier statistics, which
        ``stats`` then averages too; the logits and state are the same. ``segment_ids`` (B, L) marks the
        documents of a packed window (a new document wherever the id changes): every component starts afresh at
        each document start, so each document's logits are those it would get alone (docs/design.md 3.10).

        Raises:
            ValueError: the sequence is longer than a component supports (names the component), or
                ``segment_ids`` is given with a state, with the wrong shape, or to a model with a component that
                does not support document boundaries (names the first one).
        """
        limit = self.max_seq_len if input_ids.shape[1] > 1 else None  # every component takes one token (decoding)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"sequence of length {input_ids.shape[1]} exceeds the {limit} tokens {self.length_bound()} supports")
        if segment_ids is not None:
            if state is not None:
                raise ValueError("segment_ids mark documents from the start of a sequence; they cannot continue a state")
            check_segment_ids(segment_ids, input_ids.shape[0], input_ids.shape[1], "segment_ids")
            refusals = self.resets_refusals()
            if refusals:  # checked before any block runs: one line for the whole model
                raise ValueError(f"this batch marks documents (segment_ids), but {refusals[0]}")
        h = self.embed(input_ids)  # (B, L, D)
        aux: dict[str, Tensor] = {}
        stat_lists: dict[str, list[Tensor]] = defaultdict(list)
        new_state = []
        per_block: list[dict[str, dict[str, Tensor]]] = []
        for i, block in enumerate(self.tri_path_blocks):
            out = block(h, None if state is None else state[i], collect_aux=collect_aux, diagnostics=diagnostics, segment_ids=segment_ids)
            h = out.hidden
            for k, v in out.aux_losses.items():
                aux[k] = aux[k] + v if k in aux else v
            for k, v in out.stats.items():
                stat_lists[k].append(v)
            new_state.append(out.state)
            if diagnostics:
                per_block.append(out.diagnostics)
        head_weight = self.embed.weight if self.head is None else self.head.weight
        logits = linear(self.norm(h), head_weight)  # (B, L, V)
        stats = {k: v[0] if len(v) == 1 else torch.stack(v).mean() for k, v in stat_lists.items()}
        return ModelOutput(logits, aux, stats, new_state, per_block)

    def step(self, tokens: Tensor, state: list[dict[str, Any]]) -> tuple[Tensor, list[dict[str, Any]]]:
        """One decoding step: logits (B, V) for the next token after ``tokens`` (B,), and the new state.

        Each component runs its recurrent ``step`` (constant work for the SSM and memories).
        """
        out = self(tokens[:, None], state, collect_aux=False)
        return out.logits[:, -1], out.state

    def generate(
        self,
        prompt: Tensor | Sequence[Sequence[int] | Tensor],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_id: int | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
        generator: torch.Generator | None = None,
    ) -> Generator[Tensor, None, None]:
        """Yield new tokens (B,) one at a time after B prompts, with recurrent state (no recomputation).

        Each prompt is processed in one forward (prefill); every new token then costs one :meth:`step`: constant
        work for the SSM and memories, a bounded window plus global set for sparse attention, and a growing
        key/value cache only for dense attention. Prompts of different lengths are prefilled and stepped in groups
        of equal length, in lock-step, so each row gets exactly the state (and, greedy, the tokens) it would get
        alone: a component's state may hold per-row lengths (a key/value cache) that a padded batch would corrupt.
        Puts the network in eval mode. Sampling is :func:`hydra_kit.sampling.sample_next`.

        A row stops after it yields ``eos_id`` or completes one of ``stop_sequences``; from then on it yields
        :data:`hydra_kit.sampling.FINISHED` (-1). Iteration ends after ``max_new_tokens`` steps or when every row
        has stopped.

        Args:
            prompt: (B, T) token ids with T >= 1, or a sequence of B prompts of any lengths (each 1-D, non-empty).
            max_new_tokens: number of tokens to generate at most.
            temperature: sampling temperature; 0 means greedy (argmax).
            top_k: sample only among the k most likely tokens.
            top_p: sample only from the smallest set of tokens whose probability is at least ``top_p`` (nucleus).
            repetition_penalty: above 1, lowers the logits of the ids a row already holds (prompt included).
            eos_id: the end-of-sequence id: a row that produces it stops.
            stop_sequences: token-id sequences: a row whose generated tokens end with one stops.
            generator: random generator for sampling (reproducible generation).

        Raises:
            ValueError: a prompt is empty or holds ids outside the vocabulary, or a sampling setting is out of
                range (:func:`hydra_kit.sampling.check_sampling`).
        """
        return decode(
            self, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, eos_id=eos_id, stop_sequences=stop_sequences, generator=generator,
        )

    # -------------------------------------------------------------- diagnosis
    def first_nonfinite(self, input_ids: Tensor, aux_losses: dict[str, Tensor], *, segment_ids: Tensor | None = None) -> str:
        """Re-run ``input_ids`` (B, L) with hooks and name the first component whose output went non-finite.

        Args:
            input_ids: the batch whose loss was NaN or infinite.
            aux_losses: that forward's auxiliary losses, named when no component output was bad.
            segment_ids: the batch's document ids, if it had them (the re-run computes what the step did).

        Returns:
            e.g. ``"component 'attn' in block 1"``, ``"the token embedding"`` or ``"auxiliary loss(es) moe.z"``.
        """
        found: list[str] = []

        def hook(name: str, block_idx: int):  # type: ignore[no-untyped-def]
            def record(module: nn.Module, args: Any, output: Any) -> None:
                update = getattr(output, "update", None)
                if not found and isinstance(update, Tensor) and not torch.isfinite(update).all():
                    found.append(f"component {name!r} in block {block_idx}")

            return record

        handles = [c.register_forward_hook(hook(n, b.layer_idx)) for b in self.tri_path_blocks for n, c in b.components().items()]
        try:
            with torch.no_grad():
                if not torch.isfinite(self.embed(input_ids)).all():
                    found.append("the token embedding")
                self(input_ids, segment_ids=segment_ids)
        finally:
            for h in handles:
                h.remove()
        bad_aux = [k for k, v in aux_losses.items() if not torch.isfinite(v)]
        if found:
            return found[0]
        if bad_aux:
            return f"auxiliary loss(es) {', '.join(bad_aux)}"
        return "no component output (the task loss or the head)"

    # ------------------------------------------------------------- accounting
    def parameter_report(self, seq_len: int) -> dict[str, Any]:
        """Total and active (per-token) parameters and forward FLOPs per token (:func:`hydra_kit.accounting.parameter_report`)."""
        return accounting.parameter_report(self.tri_path_blocks, self.embed, self.head, self.norm, seq_len)
