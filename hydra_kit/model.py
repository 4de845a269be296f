"""HydraLM: a decoder-only language model assembled from component plugins by a recipe.

Token embedding (tied with the output head), ``n_blocks`` tri-path blocks (:mod:`hydra_kit.block`), final
RMSNorm. Which component sits in which block comes from the ``components`` recipe section
(:mod:`hydra_kit.recipe`); the model never imports a concrete component.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from hydra_kit.block import TriPathBlock
from hydra_kit.ops import RMSNorm, linear
from hydra_kit.optim import DenseSparseAdam
from hydra_kit.protocol import TriPathComponent
from hydra_kit.recipe import RecipeError, ResolvedComponent, resolve_components
from hydra_kit.registry import Registry, discover

IGNORE_INDEX = -100


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the component and the last good checkpoint."""

# The model a bare `HydraLM()` builds: the SSM backbone with a SwiGLU MLP in every block.
DEFAULT_COMPONENTS: dict[str, dict[str, Any]] = {
    "ssm": {"component": "ssm", "blocks": "all"},
    "mlp": {"component": "mlp", "blocks": "all"},
}

_registry_cache: dict[bool, Registry] = {}


def default_registry(third_party: bool | None = None) -> Registry:
    """The registry models are built from, discovered once per process.

    Args:
        third_party: load third-party plugins; None keeps the process-wide choice (the CLI's ``--no-plugins``
            sets it through :func:`configure_plugins`).
    """
    if third_party is None:
        third_party = _plugin_policy["third_party"]
    if third_party not in _registry_cache:
        _registry_cache[third_party] = discover(third_party=third_party)
    return _registry_cache[third_party]


_plugin_policy = {"third_party": True}


def configure_plugins(*, third_party: bool) -> None:
    """Choose, for this process, whether models load third-party components (called by the CLI)."""
    _plugin_policy["third_party"] = third_party


@dataclass
class ModelOutput:
    """Output of :meth:`HydraLM.forward`.

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


def state_nbytes(state: Any) -> int:
    """Bytes of memory held by the tensors of a (nested) recurrent state: the decoding cache size.

    Counts each storage once and whole: a view into a preallocated buffer holds the entire buffer.
    """
    storages: dict[int, int] = {}

    def visit(node: Any) -> None:
        if isinstance(node, Tensor):
            storage = node.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, list | tuple):
            for v in node:
                visit(v)
        elif hasattr(node, "__dataclass_fields__"):
            for f in node.__dataclass_fields__:
                visit(getattr(node, f))

    visit(state)
    return sum(storages.values())


def embedding_rows(report: dict[str, Any]) -> list[tuple[str, int, float]]:
    """The embedding and output-head lines of a :meth:`HydraLM.parameter_report` as (label, params, MFLOP/token).

    One line for a tied head (the embedding is the head), two for an untied one; the embedding lookup itself
    costs no FLOPs, the head a multiply-add per weight.
    """
    embed, head = int(report["embedding_params"]), int(report.get("head_params", 0))
    if not head:
        return [("embedding (tied head)", embed, 2 * embed / 1e6)]
    return [("embedding", embed, 0.0), ("output head", head, 2 * head / 1e6)]


def _check_optimiser_args(*, lr: float, weight_decay: float, betas: Any, warmup_steps: int, min_lr_ratio: float, init_std: float) -> None:
    """Refuse optimiser and initialisation hyper-parameters that torch would reject deep inside ``fit`` (or accept and diverge on).

    Raises:
        RecipeError: naming the key (``model.lr``), the value and the valid range.
    """

    def bad(key: str, value: Any, expected: str) -> RecipeError:
        return RecipeError(f"model.{key}: expected {expected}, got {value!r}")

    # `not x > 0` rather than `x <= 0`, so that NaN is refused too.
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise bad("lr", lr, "a finite number > 0")
    if not (isinstance(weight_decay, int | float) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise bad("weight_decay", weight_decay, "a finite number >= 0")
    if not (isinstance(betas, list | tuple) and len(betas) == 2):
        raise bad("betas", betas, "two numbers in [0, 1), like [0.9, 0.95]")
    for i, beta in enumerate(betas):
        if not (isinstance(beta, int | float) and 0 <= beta < 1):
            raise bad(f"betas[{i}]", beta, "a number in [0, 1)")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise bad("warmup_steps", warmup_steps, "an integer >= 0")
    if not (isinstance(min_lr_ratio, int | float) and 0 <= min_lr_ratio <= 1):
        raise bad("min_lr_ratio", min_lr_ratio, "a number in [0, 1]")
    if not (isinstance(init_std, int | float) and math.isfinite(init_std) and init_std > 0):
        raise bad("init_std", init_std, "a finite number > 0")


class HydraLM(L.LightningModule):
    """A Hydra-family decoder-only language model built from component plugins.

    Args:
        vocab_size: number of token ids the model accepts (must cover the data's vocabulary).
        d_model: width of the residual stream.
        n_blocks: number of tri-path blocks.
        components: the recipe's components section: instance name -> {component, blocks, args, layerscale,
            gated}; see :mod:`hydra_kit.recipe`. Default: SSM + SwiGLU MLP in every block.
        dropped: instance names removed from the recipe before the model is built (set by ablations, kept in
            the hyper-parameters so an ablated checkpoint reloads as the same model).
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay of matrices (never of norms, biases, LayerScale).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps, followed by cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        init_std: standard deviation of the embedding initialisation.
        tie_embeddings: share the token embedding with the output head (HYDRA.md 3.1, the default). ``False`` gives
            the head its own (vocab_size, d_model) matrix. Measured on MQAR with 8 pairs (issue 17,
            ``docs/calibration/2026-12-04-mqar``): tied, a 2-block transformer stayed on the 1/num_pairs
            plateau for 1,000 steps and Hydra of ``recipes/full.yaml`` reached 0.14 after 900; untied, the same
            models reached 0.99 after 200 steps and 0.97 after 900. The small recipes therefore untie it.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        d_model: int = 128,
        n_blocks: int = 4,
        components: dict[str, dict[str, Any]] | None = None,
        dropped: list[str] | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        init_std: float = 0.02,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if vocab_size <= 0 or d_model <= 0 or n_blocks <= 0:
            raise RecipeError(f"model: vocab_size ({vocab_size}), d_model ({d_model}) and n_blocks ({n_blocks}) must be positive")
        _check_optimiser_args(lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, init_std=init_std)
        spec = dict(DEFAULT_COMPONENTS if components is None else components)
        for name in dropped or []:
            if name not in spec:
                raise RecipeError(f"model.dropped: {name!r} is not a component instance of this recipe; instances: {', '.join(spec)}")
            del spec[name]
        self.resolved: list[ResolvedComponent] = resolve_components(spec, n_blocks, default_registry(), "model.components")
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
        self.train_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro", ignore_index=IGNORE_INDEX)
        self.val_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro", ignore_index=IGNORE_INDEX)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)  # exp of the mean loss over the scored positions
        self._bytes_per_token: float | None = None  # declared by byte-level data modules: enables val/bpb
        self._diagnostics_requested = False
        # The per-block diagnostics of the last training step that was asked for them (request_diagnostics).
        self.last_diagnostics: list[dict[str, dict[str, Tensor]]] = []

    # ------------------------------------------------------------------ model
    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence every component supports (None: unbounded)."""
        limits = [r.entry.cls.max_seq_len for r in self.resolved if r.entry.cls.max_seq_len is not None]
        return min(limits) if limits else None

    def _length_bound(self) -> str:
        """The component instance(s) that bound the sequence length, for error messages."""
        limit = self.max_seq_len
        names = [f"model.components.{r.name} ({r.entry.cls.__name__}, max_seq_len {limit})" for r in self.resolved if r.entry.cls.max_seq_len == limit]
        return " and ".join(names) or "no component"

    @property
    def tri_path_blocks(self) -> list[TriPathBlock]:
        """The blocks, typed (an nn.ModuleList yields them as plain Modules)."""
        return cast("list[TriPathBlock]", list(self.blocks))

    def set_knocked_out(self, names: set[str] | list[str]) -> None:
        """Switch component instances off (not run, zero contribution) without removing their parameters.

        Raises:
            RecipeError: a name is not an instance of this model; the message lists the instances.
        """
        known = {r.name for r in self.resolved if not r.is_router}
        unknown = sorted(set(names) - known)
        if unknown:
            raise RecipeError(f"knock-out: unknown component instance(s) {unknown}; instances: {', '.join(sorted(known))}")
        for block in self.tri_path_blocks:
            block.knocked_out = set(names) & set(block.mixers)

    def init_state(self, batch_size: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
        """Per-block recurrent state before the first token."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return [block.init_state(batch_size, device=device, dtype=dtype) for block in self.tri_path_blocks]

    def forward(
        self, input_ids: Tensor, state: list[dict[str, Any]] | None = None, *, collect_aux: bool = True, diagnostics: bool = False
    ) -> ModelOutput:
        """Logits (B, L, V) for token ids (B, L); continue from ``state`` when given (chunked processing).

        ``collect_aux=False`` (decoding) skips the auxiliary losses and statistics: the output then has empty
        ``aux_losses`` and ``stats``, and the same logits and state. ``diagnostics=True`` also returns per-block
        diagnostics (``ModelOutput.diagnostics``) and lets components add their costlier statistics, which
        ``stats`` then averages too; the logits and state are the same.
        """
        limit = self.max_seq_len if input_ids.shape[1] > 1 else None  # every component takes one token (decoding)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"sequence of length {input_ids.shape[1]} exceeds the {limit} tokens {self._length_bound()} supports")
        h = self.embed(input_ids)  # (B, L, D)
        aux: dict[str, Tensor] = {}
        stat_lists: dict[str, list[Tensor]] = defaultdict(list)
        new_state = []
        per_block: list[dict[str, dict[str, Tensor]]] = []
        for i, block in enumerate(self.tri_path_blocks):
            out = block(h, None if state is None else state[i], collect_aux=collect_aux, diagnostics=diagnostics)
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

    def request_diagnostics(self) -> None:
        """Compute per-block diagnostics in the next training step; they land in :attr:`last_diagnostics`.

        Called by :class:`hydra_kit.callbacks.Diagnostics` on the steps it logs, so that the other steps pay nothing.
        """
        self._diagnostics_requested = True

    @torch.inference_mode()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yield new tokens (B,) one at a time after a prompt (B, T), with recurrent state (no recomputation).

        The prompt is processed in one forward (prefill); every new token then costs one ``step`` per
        component: constant work for the SSM and memories, a bounded window plus global set for sparse
        attention, and a growing key/value cache only for dense attention.

        Args:
            prompt: (B, T) token ids, T >= 1.
            max_new_tokens: number of tokens to generate.
            temperature: sampling temperature; 0 means greedy (argmax).
            top_k: sample only among the k most likely tokens.
            generator: random generator for sampling (reproducible generation).
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"generate: prompt must have shape (B, T) with T >= 1, got {tuple(prompt.shape)}")
        vocab = self.hparams["vocab_size"]
        if int(prompt.max()) >= vocab or int(prompt.min()) < 0:
            raise ValueError(f"generate: prompt token ids must lie in [0, {vocab}); got {int(prompt.min())}..{int(prompt.max())}")
        self.eval()
        state = self.init_state(prompt.shape[0])
        out = self(prompt, state, collect_aux=False)
        state, logits = out.state, out.logits[:, -1]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                scaled = logits.float() / temperature
                if top_k is not None and top_k < scaled.shape[-1]:
                    kth = scaled.topk(top_k, dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                token = torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]
            yield token
            out = self(token[:, None], state, collect_aux=False)
            state, logits = out.state, out.logits[:, -1]

    # --------------------------------------------------------------- training
    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        input_ids, targets = batch["input_ids"], batch["targets"]
        diagnostics = stage == "train" and self._diagnostics_requested
        out = self(input_ids, diagnostics=diagnostics)
        if diagnostics:
            self._diagnostics_requested = False
            self.last_diagnostics = out.diagnostics
        task_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        aux_total = sum(out.aux_losses.values(), torch.zeros((), device=task_loss.device))
        loss = task_loss + aux_total
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._describe_nonfinite(input_ids, out.aux_losses, stage, loss.item()))
        on_step = stage == "train"
        batch_size = input_ids.shape[0]
        # sync_dist on every step too: under DDP the logged training loss is the mean over the ranks, i.e. the loss
        # of the global batch (each rank sees the same number of answer tokens), not rank 0's share alone.
        self.log(f"{stage}/loss", task_loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=True)
        metric = self.train_acc if stage == "train" else self.val_acc
        mask = targets != IGNORE_INDEX
        metric(out.logits[mask].argmax(-1), targets[mask])
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
        if stage == "val":
            self.val_ppl(out.logits.float(), targets)
            self.log("val/ppl", self.val_ppl, on_step=False, on_epoch=True, batch_size=batch_size)
            if self._bytes_per_token:
                # Bits per byte: the loss is a mean over scored tokens, so weighting each batch by its number of
                # scored tokens makes the epoch value the mean over all scored bytes.
                bpb = task_loss.detach() / (math.log(2) * self._bytes_per_token)
                self.log("val/bpb", bpb, on_step=False, on_epoch=True, batch_size=int(mask.sum()), sync_dist=True)
        if stage == "train":
            for k, v in out.aux_losses.items():
                self.log(f"aux/{k}", v, on_step=True, batch_size=batch_size)
            for k, v in out.stats.items():
                self.log(f"stats/{k}", v, on_step=True, batch_size=batch_size)
        return loss

    def _describe_nonfinite(self, input_ids: Tensor, aux_losses: dict[str, Tensor], stage: str, value: float) -> str:
        """Re-run the batch with hooks to name the first component whose output went non-finite."""
        culprit = "no component output (the task loss or the head)"
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
                self(input_ids)
        finally:
            for h in handles:
                h.remove()
        bad_aux = [k for k, v in aux_losses.items() if not torch.isfinite(v)]
        if found:
            culprit = found[0]
        elif bad_aux:
            culprit = f"auxiliary loss(es) {', '.join(bad_aux)}"
        last = "none yet"
        if self._trainer is not None:
            paths = [cb.last_model_path or cb.best_model_path for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
            last = next((p for p in paths if p), last)
        return f"{stage} loss became {value} at step {self.global_step}: first non-finite output from {culprit}; last good checkpoint: {last}"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Global RNG state, so a resumed run draws the same random numbers as an uninterrupted one.
        checkpoint["hydra_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "hydra_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["hydra_rng_state"].cpu())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"]).logits.argmax(-1)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        needed = getattr(datamodule, "vocab_size", None)
        self._bytes_per_token = getattr(datamodule, "bytes_per_token", None)
        if needed is not None and needed > self.hparams["vocab_size"]:
            raise RecipeError(f"model.vocab_size is {self.hparams['vocab_size']} but the data uses {needed} token ids; set model.vocab_size >= {needed}")
        # A sequence longer than a component supports is a recipe error: report it before training starts.
        seq_len = getattr(getattr(datamodule, "task", None), "seq_len", None)
        limit = self.max_seq_len
        if isinstance(seq_len, int) and limit is not None and seq_len > limit:
            raise RecipeError(f"data: the task makes sequences of {seq_len} tokens, longer than the {limit} tokens {self._length_bound()} supports")

    def configure_optimizers(self) -> Any:  # Lightning's optimizer + scheduler config dict
        hp = self.hparams
        groups: dict[tuple[float, float, bool], list[nn.Parameter]] = defaultdict(list)
        for param in self.parameters():
            if not param.requires_grad:
                continue
            decay = 0.0 if (param.ndim < 2 or getattr(param, "_hydra_no_weight_decay", False)) else hp["weight_decay"]
            sparse = bool(getattr(param, "_hydra_sparse_grad", False))
            groups[(getattr(param, "_hydra_lr_scale", 1.0), decay, sparse)].append(param)
        dense = [{"params": ps, "lr": hp["lr"] * scale, "weight_decay": wd} for (scale, wd, sp), ps in groups.items() if not sp]
        sparse_groups = [{"params": ps, "lr": hp["lr"] * scale} for (scale, _, sp), ps in groups.items() if sp]
        optimizer: torch.optim.Optimizer
        if sparse_groups:
            optimizer = DenseSparseAdam(dense, sparse_groups, lr=hp["lr"], betas=tuple(hp["betas"]))
        else:
            optimizer = torch.optim.AdamW(dense, lr=hp["lr"], betas=tuple(hp["betas"]))
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        warmup = min(hp["warmup_steps"], max(0, total - 1))
        floor = hp["min_lr_ratio"]

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------- accounting
    def parameter_report(self, seq_len: int) -> dict[str, Any]:
        """Total and active (per-token) parameters and forward FLOPs per token, per instance and per block."""
        per_instance: dict[str, dict[str, float]] = defaultdict(lambda: {"total_params": 0, "active_params": 0, "flops_per_token": 0.0})
        per_block = []
        for block in self.tri_path_blocks:
            row: dict[str, Any] = {"block": block.layer_idx, "components": {}}
            shared = sum(p.numel() for p in block.norm.parameters()) + len(block.layerscale)
            comps: dict[str, TriPathComponent] = dict(block.components())
            if block.router is not None and block.router_name is not None:
                comps[block.router_name] = block.router
            for name, comp in comps.items():
                total = sum(p.numel() for p in comp.parameters())
                active = comp.active_parameters()
                flops = comp.flops_per_token(seq_len)
                per_instance[name]["total_params"] += total
                per_instance[name]["active_params"] += active
                per_instance[name]["flops_per_token"] += flops
                row["components"][name] = {"total_params": total, "active_params": active, "flops_per_token": flops}
            row["norm_and_layerscale_params"] = shared
            per_block.append(row)
        embed = self.embed.weight.numel()
        shared_total = embed + sum(p.numel() for p in self.norm.parameters()) + sum(b["norm_and_layerscale_params"] for b in per_block)
        total = sum(p.numel() for p in self.parameters())
        head = embed if self.head is None else self.head.weight.numel()
        shared_total += 0 if self.head is None else head
        active = shared_total + sum(v["active_params"] for v in per_instance.values())
        head_flops = 2.0 * head  # the output projection; the embedding lookup is free
        flops = head_flops + sum(v["flops_per_token"] for v in per_instance.values())
        return {
            "total_params": total,
            "active_params": int(active),
            "flops_per_token": flops,
            "seq_len": seq_len,
            "embedding_params": embed,
            "head_params": 0 if self.head is None else head,  # 0: tied, the embedding is the head
            "components": dict(per_instance),
            "blocks": per_block,
        }
