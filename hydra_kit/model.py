"""HydraLM: the LightningModule that trains a :class:`~hydra_kit.network.HydraNetwork` (steps, metrics, optimizer).

The network (embedding, blocks, head, forward, generation) is a plain ``nn.Module`` in :mod:`hydra_kit.network`;
this module adds what training needs: the loss and its metrics, the report of a non-finite loss, the optimizer
and its schedule, the RNG state in checkpoints, and the checks of the data module against
:class:`hydra_kit.data.TokenData`. Recipes name it ``class_path: hydra_kit.model.HydraLM``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from hydra_kit import compat
from hydra_kit.block import TriPathBlock
from hydra_kit.data.protocol import check_token_data
from hydra_kit.data.task import IGNORE_INDEX
from hydra_kit.network import HydraNetwork, ModelOutput
from hydra_kit.optim import DenseSparseAdam, ScaledLambdaLR, warmup_cosine
from hydra_kit.recipe import RecipeError, ResolvedComponent
from hydra_kit.registry import default_registry

__all__ = ["IGNORE_INDEX", "HydraLM", "ModelOutput", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the component and the last good checkpoint."""


def _check_optimiser_args(*, lr: float, weight_decay: float, betas: Any, warmup_steps: int, min_lr_ratio: float) -> None:
    """Refuse optimiser hyper-parameters that torch would reject deep inside ``fit`` (or accept and diverge on).

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


# Refusal of LightningCLI's `--optimizer`, which would train every parameter in one group.
OPTIMIZER_OPTION_REFUSED = (
    "--optimizer: HydraLM builds its own optimizer from its parameter groups (no weight decay on norms, biases and "
    "LayerScale; PKM's sparse value tables in SparseAdam at their own learning rate), which --optimizer would replace "
    "with one group; set --model.lr, --model.weight_decay, --model.betas, --model.warmup_steps and --model.min_lr_ratio instead"
)

# The network's top-level submodules: the state-dict keys of checkpoints written before HydraLM held a network.
_NETWORK_CHILDREN = ("embed.", "head.", "blocks.", "norm.")


class HydraLM(L.LightningModule):
    """A Hydra-family decoder-only language model built from component plugins, trained with Lightning.

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
        tie_embeddings: share the token embedding with the output head (docs/design.md 3.1, the default). ``False``
            gives the head its own (vocab_size, d_model) matrix; the small recipes untie it (why:
            docs/design-decisions.md).
        compile: run full-sequence forwards (training, validation, prefill without a state) through
            ``torch.compile`` of the network (Inductor on CPU). Off by default: the first call of each mode
            compiles, which takes seconds to minutes. Generation, decoding and chunked forwards with a state
            stay eager, since they run one token or one chunk at a time (docs/benchmarks.md, "torch.compile").

    Attributes:
        network: the :class:`~hydra_kit.network.HydraNetwork` being trained; its instance API (``disable``,
            ``enable``, ``freeze``, ``unfreeze``, ``set_knocked_out``) is what callbacks use.
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
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_optimiser_args(lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
        self.network = HydraNetwork(vocab_size, d_model, n_blocks, components, dropped, init_std, tie_embeddings, registry=default_registry())
        self.train_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro", ignore_index=IGNORE_INDEX)
        self.val_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro", ignore_index=IGNORE_INDEX)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)  # exp of the mean loss over the scored positions
        self._bytes_per_token: float | None = None  # declared by byte-level data modules: enables val/bpb
        self._diagnostics_requested = False
        # The per-block diagnostics of the last training step that was asked for them (request_diagnostics).
        self.last_diagnostics: list[dict[str, dict[str, Tensor]]] = []
        self.register_load_state_dict_pre_hook(_prefix_network_keys)
        if not isinstance(compile, bool):
            raise RecipeError(f"model.compile: expected true or false, got {compile!r}")

    # ------------------------------------------------- the network, delegated
    @property
    def resolved(self) -> list[ResolvedComponent]:
        """The recipe's component instances, resolved (:attr:`HydraNetwork.resolved`)."""
        return self.network.resolved

    @property
    def embed(self) -> nn.Embedding:
        """The token embedding (the output head too when tied)."""
        return self.network.embed

    @property
    def head(self) -> nn.Linear | None:
        """The untied output head, or None."""
        return self.network.head

    @property
    def blocks(self) -> nn.ModuleList:
        """The tri-path blocks."""
        return self.network.blocks

    @property
    def norm(self) -> nn.Module:
        """The final norm."""
        return self.network.norm

    @property
    def tri_path_blocks(self) -> list[TriPathBlock]:
        """The blocks, typed (an nn.ModuleList yields them as plain Modules)."""
        return self.network.tri_path_blocks

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence every component supports (None: unbounded)."""
        return self.network.max_seq_len

    def set_knocked_out(self, names: Iterable[str]) -> None:
        """Switch exactly these component instances off (:meth:`HydraNetwork.set_knocked_out`)."""
        self.network.set_knocked_out(names)

    def init_state(self, batch_size: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
        """Per-block recurrent state before the first token."""
        return self.network.init_state(batch_size, device=device, dtype=dtype)

    def forward(
        self,
        input_ids: Tensor,
        state: list[dict[str, Any]] | None = None,
        *,
        collect_aux: bool = True,
        diagnostics: bool = False,
        segment_ids: Tensor | None = None,
    ) -> ModelOutput:
        """Logits (B, L, V) for token ids (B, L), documents marked by ``segment_ids``; see :meth:`HydraNetwork.forward`.

        With ``compile=True``, a full-sequence forward (no ``state``, no ``diagnostics``) runs compiled.
        """
        if self.hparams.get("compile") and state is None and not diagnostics:
            return self.compiled_network()(input_ids, collect_aux=collect_aux, segment_ids=segment_ids)
        return self.network(input_ids, state, collect_aux=collect_aux, diagnostics=diagnostics, segment_ids=segment_ids)

    def compiled_network(self) -> Callable[..., ModelOutput]:
        """``torch.compile`` of :attr:`network`, built on first use and kept for this model object.

        It wraps the same modules, so it shares the parameters and follows ``.to()``. It is not a registered
        submodule (checkpoints hold only the network) and is dropped when the model is copied or pickled
        (:meth:`__getstate__`): a copy compiles its own.
        """
        compiled: Callable[..., ModelOutput] | None = self.__dict__.get("_compiled_network")
        if compiled is None:
            compiled = torch.compile(self.network)
            self.__dict__["_compiled_network"] = compiled  # bypasses nn.Module registration on purpose
        return compiled

    def __getstate__(self) -> dict[str, Any]:
        # The compiled wrapper holds code specialised to this object's network; a copy must not call into it.
        state = super().__getstate__()
        state.pop("_compiled_network", None)
        return state

    def generate(self, prompt: Tensor | Sequence[Sequence[int] | Tensor], max_new_tokens: int, **sampling: Any) -> Iterator[Tensor]:
        """Yield new tokens (B,) one at a time after B prompts, in evaluation mode.

        ``sampling`` takes the keywords of :meth:`HydraNetwork.generate` (temperature, top_k, top_p,
        repetition_penalty, eos_id, stop_sequences, generator), which also checks them.
        """
        self.eval()
        return self.network.generate(prompt, max_new_tokens, **sampling)

    def parameter_report(self, seq_len: int) -> dict[str, Any]:
        """Total and active (per-token) parameters and forward FLOPs per token, per instance and per block."""
        return self.network.parameter_report(seq_len)

    def request_diagnostics(self) -> None:
        """Compute per-block diagnostics in the next training step; they land in :attr:`last_diagnostics`.

        Called by :class:`hydra_kit.callbacks.Diagnostics` on the steps it logs, so that the other steps pay nothing.
        """
        self._diagnostics_requested = True

    def take_diagnostics(self) -> list[dict[str, dict[str, Tensor]]]:
        """The per-block diagnostics of the last step that computed them (:attr:`last_diagnostics`), cleared."""
        taken, self.last_diagnostics = self.last_diagnostics, []
        return taken

    # --------------------------------------------------------------- training
    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        input_ids, targets, segment_ids = batch["input_ids"], batch["targets"], batch.get("segment_ids")
        diagnostics = stage == "train" and self._diagnostics_requested
        # Packed windows of several documents carry segment_ids: each document is then computed as if alone.
        out = self(input_ids, diagnostics=diagnostics, segment_ids=segment_ids)
        if diagnostics:
            self._diagnostics_requested = False
            self.last_diagnostics = out.diagnostics
        task_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        aux_total = sum(out.aux_losses.values(), torch.zeros((), device=task_loss.device))
        loss = task_loss + aux_total
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._describe_nonfinite(input_ids, out.aux_losses, stage, loss.item(), segment_ids))
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
            for k, v in out.stats.items():  # under a gate threshold: the share of tokens each gated component computed
                if ".kept_" in k:
                    self.log(f"val/{k}", v, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        if stage == "train":
            for k, v in out.aux_losses.items():
                self.log(f"aux/{k}", v, on_step=True, batch_size=batch_size)
            for k, v in out.stats.items():
                self.log(f"stats/{k}", v, on_step=True, batch_size=batch_size)
        return loss

    def _describe_nonfinite(
        self, input_ids: Tensor, aux_losses: dict[str, Tensor], stage: str, value: float, segment_ids: Tensor | None = None
    ) -> str:
        """The one-line report of a non-finite loss: the step, the first bad component and the last good checkpoint."""
        culprit = self.network.first_nonfinite(input_ids, aux_losses, segment_ids=segment_ids)
        last = "none yet"
        trainer = compat.attached_trainer(self)
        if trainer is not None:
            paths = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
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
        return self(batch["input_ids"], segment_ids=batch.get("segment_ids")).logits.argmax(-1)

    def setup(self, stage: str) -> None:
        """Check the data module against :class:`hydra_kit.data.TokenData` and this model, before any step runs.

        Raises:
            RecipeError: the data lacks the protocol's members, uses more token ids than ``model.vocab_size``,
                makes sequences longer than a component supports, or ``--optimizer`` replaced the optimizer.
        """
        trainer = compat.attached_trainer(self)
        if stage == "fit" and compat.optimizer_replaced(self):
            raise RecipeError(OPTIMIZER_OPTION_REFUSED)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:  # plain dataloaders: nothing declared to check
            self._bytes_per_token = None
            return
        data = check_token_data(datamodule)
        self._bytes_per_token = getattr(data, "bytes_per_token", None)  # optional member of the protocol
        needed = data.vocab_size
        if needed > self.hparams["vocab_size"]:
            raise RecipeError(f"model.vocab_size is {self.hparams['vocab_size']} but the data uses {needed} token ids; set model.vocab_size >= {needed}")
        # A sequence longer than a component supports is a recipe error: report it before training starts.
        limit = self.max_seq_len
        if limit is not None and data.seq_len > limit:
            raise RecipeError(f"data: the task makes sequences of {data.seq_len} tokens, longer than the {limit} tokens {self.network.length_bound()} supports")

    def parameter_groups(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(dense, sparse) optimizer param groups: weight decay on matrices only, per-parameter learning-rate scales.

        A parameter's ``_hydra_lr_scale``, ``_hydra_no_weight_decay`` and ``_hydra_sparse_grad`` marks (set by
        components) choose its group; frozen parameters are left out.
        """
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
        return dense, sparse_groups

    def configure_optimizers(self) -> Any:  # Lightning's optimizer + scheduler config dict
        hp = self.hparams
        dense, sparse_groups = self.parameter_groups()
        optimizer: torch.optim.Optimizer
        if sparse_groups:
            optimizer = DenseSparseAdam(dense, sparse_groups, lr=hp["lr"], betas=tuple(hp["betas"]))
        else:
            optimizer = torch.optim.AdamW(dense, lr=hp["lr"], betas=tuple(hp["betas"]))
        trainer = compat.attached_trainer(self)
        total = max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1000
        scheduler = ScaledLambdaLR(optimizer, warmup_cosine(total, hp["warmup_steps"], hp["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _prefix_network_keys(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load hook: rename the keys of checkpoints written before HydraLM held a network (``embed.weight`` ->
    ``network.embed.weight``), so they load into this model unchanged."""
    assert isinstance(state_dict, dict)
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].startswith(_NETWORK_CHILDREN)]:
        state_dict[f"{prefix}network.{key[len(prefix):]}"] = state_dict.pop(key)
