"""Staged training as a Lightning callback: components on and off, frozen, data difficulty, learning rate."""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from hydra_kit import compat
from hydra_kit.callbacks.instances import network_of
from hydra_kit.data.protocol import CurriculumData, check_curriculum_data
from hydra_kit.optim import LR_SCALE_KEY, ScaledLambdaLR
from hydra_kit.recipe import RecipeError


def check_recipe_callbacks(path: str, recipe: dict[str, Any]) -> None:
    """Validate the Curriculum stages of a recipe's ``trainer.callbacks`` before LightningCLI instantiates them.

    jsonargparse would report a bad stage as a failed type match with a deep traceback; this names the file.

    Raises:
        RecipeError: ``<file>: trainer.callbacks[i]: Curriculum: stage ...``.
    """
    trainer = recipe.get("trainer") or {}
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    for i, entry in enumerate(callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []):
        if not isinstance(entry, dict) or str(entry.get("class_path", "")).rsplit(".", 1)[-1] != Curriculum.__name__:
            continue
        init_args = entry.get("init_args") or {}
        try:
            Curriculum(init_args.get("stages") if isinstance(init_args, dict) else None)  # type: ignore[arg-type]
        except RecipeError as exc:
            raise RecipeError(f"{path}: trainer.callbacks[{i}]: {exc}") from None


STAGE_KEYS = ("name", "at_step", "when", "enable", "disable", "freeze", "unfreeze", "data", "rehearse", "lr_scale")
_NAME_LISTS = ("enable", "disable", "freeze", "unfreeze")


@runtime_checkable
class StageAware(Protocol):
    """A callback told when a curriculum stage is reached (e.g. :class:`hydra_kit.checkpoint.StageCheckpoint`)."""

    def on_curriculum_stage(self, stage_index: int) -> None:
        """Stage ``stage_index`` was reached (called once per stage, on every rank, before its first batch)."""
        ...


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate_stage(i: int, stage: Any) -> dict[str, Any]:
    where = f"Curriculum: stage {i}"
    if not isinstance(stage, dict):
        raise RecipeError(f"{where}: expected a mapping with keys {', '.join(STAGE_KEYS)}; got {stage!r}")
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(STAGE_KEYS)}")
    if "at_step" not in stage and "when" not in stage:
        raise RecipeError(f"{where}: needs a trigger: at_step (a step) or when ({{metric: NAME, above|below: VALUE}})")
    if "at_step" in stage and (not isinstance(stage["at_step"], int) or isinstance(stage["at_step"], bool) or stage["at_step"] < 0):
        raise RecipeError(f"{where}: at_step must be an integer >= 0, got {stage['at_step']!r}")
    if "when" in stage:
        when = stage["when"]
        if not isinstance(when, dict) or not isinstance(when.get("metric"), str) or set(when) - {"metric", "above", "below"}:
            raise RecipeError(f"{where}: when must be {{metric: NAME, above: VALUE}} or {{metric: NAME, below: VALUE}}, got {when!r}")
        bounds = [k for k in ("above", "below") if k in when]
        if len(bounds) != 1 or not _is_number(when[bounds[0]]):
            raise RecipeError(f"{where}: when needs exactly one of above/below with a finite number, got {when!r}")
    for key in _NAME_LISTS:
        names = stage.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RecipeError(f"{where}: {key} must be a list of component instance names, got {names!r}")
    for a, b in (("enable", "disable"), ("freeze", "unfreeze")):
        both = sorted(set(stage.get(a, [])) & set(stage.get(b, [])))
        if both:
            raise RecipeError(f"{where}: {both} both in {a} and {b}")
    if "data" in stage and (not isinstance(stage["data"], dict) or not all(isinstance(k, str) for k in stage["data"])):
        raise RecipeError(f"{where}: data must map task attribute names to values, got {stage['data']!r}")
    if "rehearse" in stage:
        if "data" not in stage:
            raise RecipeError(f"{where}: rehearse keeps a share of batches on the task before this stage's data change, but the stage has no data")
        if not _is_number(stage["rehearse"]) or not 0 < stage["rehearse"] < 1:
            raise RecipeError(f"{where}: rehearse must be a fraction of batches in (0, 1), got {stage['rehearse']!r}")
    if "lr_scale" in stage and (not _is_number(stage["lr_scale"]) or stage["lr_scale"] <= 0):
        raise RecipeError(f"{where}: lr_scale must be a positive number, got {stage['lr_scale']!r}")
    return dict(stage)


class Curriculum(Callback):
    """Training in stages: switch components on and off, freeze them, change the data, scale the learning rate.

    Stages are reached in order. Stage ``i`` is reached at the start of the first training batch at which stage
    ``i-1`` has been reached and its own trigger holds: ``at_step: N`` (``trainer.global_step >= N``, so the
    batch of step N is the first trained under it) or ``when: {metric: M, above: V}`` (the newest value of ``M``
    logged after the previous stage was reached is >= V; ``below``: <= V). Metrics named ``val/...`` are
    read at the end of each validation, so such a stage is reached at the first batch after the validation
    that met it; other metrics are read after every training batch. A value logged before the previous stage
    (on its easier task, with fewer components) never triggers the next one. With both, whichever comes first. A stage may:

    * ``disable`` / ``enable`` instances: a disabled instance is knocked out (not run, zero contribution,
      parameters kept; :meth:`hydra_kit.network.HydraNetwork.set_knocked_out` with the union of the disabled names).
    * ``freeze`` / ``unfreeze`` instances: ``requires_grad`` of the instance's parameters in every block,
      LayerScale g included (for the router: the router's parameters). Instances no stage names are untouched.
    * ``data: {arg: value}``: change the task's length or difficulty through the data module's curriculum hook
      (:class:`hydra_kit.data.CurriculumData`, e.g. :meth:`hydra_kit.data.SyntheticDataModule.set_task_params`; for MQAR ``num_pairs`` and
      ``num_queries``). Every stage's data is checked at ``setup``, against the task and the model's sequence
      limit, before training starts. Examples are generated when a batch is loaded and Lightning loads batches
      ahead, so the change takes effect at the first example not yet drawn: with ``num_workers: 0`` the batch
      of step ``N + 1`` for a stage reached at step ``N`` (the data module records this, so a resumed run draws
      the same examples). With worker processes it takes effect at the next epoch, and a warning says so.
      Validation follows the current task.
    * ``rehearse: f`` (with ``data``): a share ``f`` of this stage's training batches, whole batches spread
      evenly, is drawn from the task in force before the stage (:class:`hydra_kit.data.synthetic.Rehearsal`),
      until a later stage changes the data. Why: after thousands of steps at near-zero loss on a warm-up task,
      the first batches of a harder task can drive a model to uniform predictions, losing what it had learned
      (docs/design-decisions.md); batches of the old task keep that cheap way out costly.
    * ``lr_scale: s``: multiply the learning rate of every parameter group by ``s`` (cumulative over stages).
      The total scale is recorded in each param group (``curriculum_lr_scale``), which HydraLM's schedule
      (:class:`hydra_kit.optim.ScaledLambdaLR`) multiplies its rates by, so warm-up and cosine decay continue on
      the scaled rate; the group's current ``lr`` is scaled at once. The entry is saved with the optimizer, so
      a scale is never applied twice.

    Effects are cumulative: the state after stage ``k`` is the composition of stages 0..k, recomputed and applied
    as a whole whenever the position changes and at the start of fitting. The position is saved in checkpoints
    (``state_dict``), so a resumed run continues in its stage with the same knock-outs, freezes, data and
    learning rate scale. Every callback that is :class:`StageAware` is told when a stage is reached:
    :class:`hydra_kit.checkpoint.StageCheckpoint` (``hydra-kit fit``'s best checkpoint) then starts its "best" over,
    so the best checkpoint is the best of the current stage (a harder stage's loss does not compare with an
    easier one's); earlier stages' best files stay on disk. A plain ``ModelCheckpoint`` that monitors a metric
    keeps one best across stages, and a warning at ``setup`` says so. The current stage index (-1 before the first) is logged as ``curriculum/stage``. The
    watched metric values (with their steps) are saved too, so a stage due at the first batch after a
    validation is still reached on resume when the checkpoint was written before that batch.

    Args:
        stages: list of mappings with keys ``name`` (label), ``at_step``, ``when``, ``enable``, ``disable``,
            ``freeze``, ``unfreeze``, ``data``, ``rehearse``, ``lr_scale``.
    """

    def __init__(self, stages: list[dict[str, Any]]) -> None:
        if not isinstance(stages, list) or not stages:
            raise RecipeError("Curriculum: stages must be a non-empty list of stage mappings")
        self.stages = [_validate_stage(i, s) for i, s in enumerate(stages)]
        last_step, last_idx = -1, -1
        for i, stage in enumerate(self.stages):
            if "at_step" not in stage:
                continue
            if stage["at_step"] < last_step:  # equal steps are fine: those stages are reached together, in order
                raise RecipeError(
                    f"Curriculum: stages out of order: stage {i} at_step {stage['at_step']} comes after stage "
                    f"{last_idx} at_step {last_step}; stages are reached in list order"
                )
            last_step, last_idx = stage["at_step"], i
        self.position = 0  # number of stages reached
        self._data_defaults: dict[str, Any] = {}
        self._watched = sorted({s["when"]["metric"] for s in self.stages if "when" in s})
        self._metrics: dict[str, tuple[int, float]] = {}  # watched metric -> (global step it was read at, value)
        self._reached_step = -1  # global step at which the current stage was reached

    # ---------------------------------------------------------------- state
    @property
    def stage_index(self) -> int:
        """Index of the current stage; -1 before the first is reached."""
        return self.position - 1

    def state_dict(self) -> dict[str, Any]:
        metrics = {k: [step, value] for k, (step, value) in self._metrics.items()}
        return {"position": self.position, "n_stages": len(self.stages), "reached_step": self._reached_step, "metrics": metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = int(state_dict.get("position", 0))
        if position > len(self.stages):
            raise RecipeError(f"Curriculum: the checkpoint reached stage {position - 1} but this curriculum has only {len(self.stages)} stages")
        if state_dict.get("n_stages", len(self.stages)) != len(self.stages):
            rank_zero_warn(f"Curriculum: the checkpoint's curriculum had {state_dict['n_stages']} stages, this one has {len(self.stages)}")
        self.position = position
        self._reached_step = int(state_dict.get("reached_step", -1))
        self._metrics = {str(k): (int(v[0]), float(v[1])) for k, v in dict(state_dict.get("metrics", {})).items()}

    # ------------------------------------------------------------ composition
    def cumulative(self, position: int | None = None) -> dict[str, Any]:
        """The combined effect of stages 0..position-1: disabled, frozen, thawed names, data values, rehearsal, lr scale.

        ``rehearse`` is None or ``(data values before the newest data stage, its share of batches)``.
        """
        disabled: set[str] = set()
        frozen: set[str] = set()
        data: dict[str, Any] = {}
        rehearse: tuple[dict[str, Any], float] | None = None
        scale = 1.0
        for stage in self.stages[: self.position if position is None else position]:
            disabled = (disabled | set(stage.get("disable", []))) - set(stage.get("enable", []))
            frozen = (frozen | set(stage.get("freeze", []))) - set(stage.get("unfreeze", []))
            if "data" in stage:
                rehearse = (dict(data), float(stage["rehearse"])) if "rehearse" in stage else None
                data.update(stage["data"])
            scale *= float(stage.get("lr_scale", 1.0))
        touched = {n for s in self.stages for n in (*s.get("freeze", []), *s.get("unfreeze", []))}
        return {"disabled": disabled, "frozen": frozen, "thawed": touched - frozen, "data": data, "rehearse": rehearse, "lr_scale": scale}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        network = network_of(pl_module)
        names, routers = set(network.instance_names), set(network.router_names)
        for i, s in enumerate(self.stages):
            for key in _NAME_LISTS:
                valid = names - routers if key in ("enable", "disable") else names
                unknown = sorted(set(s.get(key, [])) - valid)
                if unknown:
                    extra = " (the router cannot be disabled; freeze it instead)" if set(unknown) & routers else ""
                    raise RecipeError(f"Curriculum: stage {i}: {key}: unknown component instance(s) {unknown}; instances: {', '.join(sorted(valid))}{extra}")
        data_keys = {k for s in self.stages for k in s.get("data", {})}
        if data_keys:
            datamodule = self._datamodule(trainer)
            adjustable = datamodule.task_params()
            task_name = type(datamodule.task).__name__
            for i, s in enumerate(self.stages):
                unknown = sorted(set(s.get("data", {})) - set(adjustable))
                if unknown:
                    raise RecipeError(
                        f"Curriculum: stage {i}: data: {task_name} cannot change {', '.join(map(repr, unknown))}; "
                        f"adjustable: {', '.join(adjustable) or 'none'}"
                    )
            self._data_defaults = {k: adjustable[k] for k in data_keys}
            limit = network.max_seq_len
            for i in range(len(self.stages)):  # the data of every stage, as it will be in force, checked now
                values = {**self._data_defaults, **self.cumulative(i + 1)["data"]}
                try:
                    task = datamodule.task_with(values)
                except ValueError as exc:
                    raise RecipeError(f"Curriculum: stage {i}: data {values} is not a valid {task_name}: {exc}") from None
                if limit is not None and task.seq_len > limit:
                    raise RecipeError(f"Curriculum: stage {i}: data {values} makes sequences of {task.seq_len} tokens; the model supports {limit}")
            workers = getattr(datamodule, "num_workers", 0)
            if workers:
                rank_zero_warn(
                    f"Curriculum: data changes reach the {workers} DataLoader workers only when the loader is recreated "
                    "(the next epoch); use num_workers: 0 for changes at the stage's step"
                )
        blind = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor is not None and not isinstance(cb, StageAware)]
        for callback in blind:
            rank_zero_warn(
                f"Curriculum: {type(callback).__name__}(monitor={callback.monitor!r}) keeps one best checkpoint across stages, whose "
                "losses do not compare; use hydra_kit.checkpoint.StageCheckpoint to keep the best of each stage"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the sanity check: a resumed run's position is loaded by now; stages due at this step are reached.
        self._advance(trainer, pl_module, force_apply=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Again after Lightning restored optimizer and scheduler states (after on_fit_start): idempotent.
        self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._advance(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._read_metrics(trainer, validation=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._read_metrics(trainer, validation=False)
        pl_module.log("curriculum/stage", float(self.stage_index), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.position < len(self.stages):
            when = self.stages[self.position].get("when")
            if when and when["metric"] not in trainer.callback_metrics:
                logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
                rank_zero_warn(f"Curriculum: stage {self.position} waited for metric {when['metric']!r}, which was never logged; logged: {logged}")

    # -------------------------------------------------------------- mechanics
    def _read_metrics(self, trainer: L.Trainer, validation: bool) -> None:
        logged = trainer.callback_metrics
        for name in self._watched:
            if name in logged and name.startswith("val/") == validation:
                self._metrics[name] = (trainer.global_step, float(logged[name]))

    def _triggered(self, stage: dict[str, Any], trainer: L.Trainer) -> bool:
        if "at_step" in stage and trainer.global_step >= stage["at_step"]:
            return True
        when = stage.get("when")
        if not when:
            return False
        step, value = self._metrics.get(when["metric"], (-1, None))
        if value is None or step <= self._reached_step:  # only values logged under the previous stage count
            return False
        return value >= when["above"] if "above" in when else value <= when["below"]

    def _advance(self, trainer: L.Trainer, pl_module: L.LightningModule, force_apply: bool = False) -> None:
        reached = []
        while self.position < len(self.stages) and self._triggered(self.stages[self.position], trainer):
            reached.append(self.position)
            self.position += 1
            self._reached_step = trainer.global_step
        if reached or force_apply:
            self._apply(trainer, pl_module)
        for i in reached:
            for callback in trainer.callbacks:  # type: ignore[attr-defined]  # public, set untyped by a connector
                if isinstance(callback, StageAware):
                    callback.on_curriculum_stage(i)
        for i in reached:
            stage = self.stages[i]
            label = f" ({stage['name']!r})" if "name" in stage else ""
            changes = "; ".join(f"{k} {stage[k]}" for k in ("enable", "disable", "freeze", "unfreeze", "data", "rehearse", "lr_scale") if k in stage)
            rank_zero_info(f"curriculum: stage {i}{label} reached at step {trainer.global_step}: {changes or 'no changes'}")

    def _datamodule(self, trainer: L.Trainer) -> CurriculumData:
        return check_curriculum_data(getattr(trainer, "datamodule", None))

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make the model, data and optimizer match the cumulative state of the stages reached (idempotent)."""
        state = self.cumulative()
        network = network_of(pl_module)
        network.set_knocked_out(state["disabled"])
        network.freeze(state["frozen"])
        network.unfreeze(state["thawed"])
        if self._data_defaults:  # checked at setup, so this cannot fail mid-run
            rehearse = state["rehearse"]
            self._datamodule(trainer).set_task_params(
                {**self._data_defaults, **state["data"]}, rehearse=None if rehearse is None else ({**self._data_defaults, **rehearse[0]}, rehearse[1])
            )
        self._apply_lr_scale(trainer, state["lr_scale"])

    def _apply_lr_scale(self, trainer: L.Trainer, scale: float) -> None:
        """Make every param group's learning-rate scale ``scale``: its ``curriculum_lr_scale`` entry and current ``lr``.

        HydraLM's schedule reads the entry (:class:`hydra_kit.optim.ScaledLambdaLR`); another scheduler's base
        rates are scaled through :func:`hydra_kit.compat.scale_base_lrs`.
        """
        for optimizer in trainer.optimizers:
            foreign = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer and not isinstance(c.scheduler, ScaledLambdaLR)]
            factors = []
            for group in optimizer.param_groups:
                factor = scale / group.get(LR_SCALE_KEY, 1.0)
                factors.append(factor)
                if factor != 1.0:
                    group["lr"] *= factor
                    if foreign and "initial_lr" in group:
                        group["initial_lr"] *= factor
                group[LR_SCALE_KEY] = scale
            for scheduler in foreign:
                compat.scale_base_lrs(scheduler, factors)
