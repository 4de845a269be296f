"""Knock-outs (instances switched off at evaluation, no retraining) and checks of dropped instances."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from hydra_kit.callbacks.instances import instance_parameters, network_of
from hydra_kit.recipe import RecipeError


class KnockOut(Callback):
    """Switch component instances off while validating or testing, and back on afterwards (no retraining).

    A knocked-out instance is not run and contributes nothing; its parameters stay (see
    :meth:`hydra_kit.network.HydraNetwork.disable`). Instances already switched off (by a curriculum stage)
    stay off. The router cannot be knocked out: the block has no output path without it to remove.

    Args:
        names: component instance names, e.g. ``["pkm"]``.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._saved: frozenset[str] | None = None

    def _start(self, pl_module: L.LightningModule) -> None:
        network = network_of(pl_module)
        self._saved = network.knocked_out
        network.disable(self.names)

    def _end(self, pl_module: L.LightningModule) -> None:
        if self._saved is not None:
            network_of(pl_module).set_knocked_out(self._saved)
            self._saved = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(pl_module)


class Ablation(Callback):
    """Check at ``setup`` that the dropped component instances have no parameters in the model, and log them.

    The removal is the model's ``dropped`` hyper-parameter, applied before the model is built, so the ablated
    model never allocates the instance (no parameters, FLOPs or optimizer state) and its checkpoint reloads as
    the same smaller model. Listing this callback in a recipe is enough: hydra-kit's CLI adds its ``drop`` to
    ``model.dropped`` before instantiating the model::

        trainer:
          callbacks:
            - {class_path: hydra_kit.callbacks.Ablation, init_args: {drop: [pkm]}}

    (``--model.dropped '[pkm]'`` and ``hydra-kit ablate --drop pkm`` do the same). At ``setup`` the callback
    checks that the instances are really gone, fails loudly when they are not (a model built outside the CLI),
    and logs the ablation.

    Args:
        drop: instance names that must be absent.
    """

    def __init__(self, drop: list[str]) -> None:
        if not drop:
            raise ValueError("Ablation: drop must name at least one component instance")
        self.drop = list(drop)
        self._reported = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        present = [n for n in self.drop if instance_parameters(pl_module, n)]
        declared = set(pl_module.hparams.get("dropped") or [])
        if present:
            raise RecipeError(
                f"Ablation: instance(s) {present} still have parameters in the model; an ablation removes them "
                f"before the model is built: set model.dropped to include them (model.dropped is {sorted(declared)})"
            )
        if self._reported:
            return
        self._reported = True
        total = sum(p.numel() for p in pl_module.parameters())
        rank_zero_info(f"ablation: dropped {', '.join(self.drop)} (model.dropped = {sorted(declared)}); {total:,} parameters remain")
