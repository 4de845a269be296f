"""A warm-up task before an experiment's own: the first ``--easy-steps`` steps on a short, easy version of it.

On the CPU budget a small model left chance on neither long-context lookup task when trained on it from the
start: E4's transformer stayed at ln 16 for 4,000 steps on 141-token sequences, yet on a 21-token version of
the same task it learned the key lookup in 300 steps and then answered the long task at once
(``docs/calibration/2026-12-05-distant-premise``). An induction-style lookup forms after a loss plateau whose
length grows with the context; a short warm-up task shortens the plateau, and what is learned there carries
over. The warm-up task is the experiment's task with some of its curriculum-adjustable arguments changed
(``params``/``with_params``: same vocabulary, same format, fewer facts, shorter sequences); it is trained through
:class:`~hydra_kit.callbacks.Curriculum` data stages (:attr:`hydra_kit.experiments.runner.Settings.curriculum`),
and every model is evaluated on the experiment's own task only.
"""

from __future__ import annotations

import argparse
from typing import Any

from hydra_kit.data.task import SyntheticTask
from hydra_kit.recipe import RecipeError


def add_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--easy-steps N``: the number of training steps on the warm-up task (``what`` describes it)."""
    parser.add_argument(
        "--easy-steps", "--easy_steps", dest="easy_steps", type=int, default=None,
        help=f"train the first N of --steps on a warm-up task ({what}), then on the task itself (default: the size's share of --steps; 0: none)",
    )


def set_stages(name: str, settings: Any, easy_steps: int | None, fraction: float, task: SyntheticTask, *stages: dict[str, Any]) -> int:
    """Put the warm-up stages in ``settings.curriculum``: each of ``stages`` (changes of ``task``'s arguments) for an
    equal share of the warm-up steps, then ``task`` itself.

    Args:
        name: the experiment's command name, for errors.
        settings: the experiment's resolved settings (``steps`` is read, ``curriculum`` set).
        easy_steps: ``--easy-steps``; None takes ``fraction`` of ``settings.steps``.
        fraction: the default share of the steps spent on the warm-up task.
        task: the experiment's training task; its :meth:`params` restore it after the warm-up.
        stages: the warm-up tasks as argument changes of ``task``, easiest first.

    Returns:
        The number of warm-up steps (0: none, and no curriculum).

    Raises:
        RecipeError: ``--easy-steps`` is negative or not below ``--steps``, or a stage is not a valid task.
    """
    steps = int(fraction * settings.steps) if easy_steps is None else easy_steps
    if not 0 <= steps < settings.steps:
        raise RecipeError(f"experiment {name}: --easy-steps must be at least 0 and below --steps ({settings.steps}), got {steps}")
    if not steps:
        settings.curriculum = []
        return 0
    curriculum: list[dict[str, Any]] = []
    in_force: dict[str, Any] = {}
    for i, changes in enumerate(stages):
        in_force.update(changes)  # Curriculum stages are cumulative: a stage's data applies over the earlier ones
        try:
            task.with_params(in_force)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise RecipeError(f"experiment {name}: the warm-up task {in_force} is not valid with these options: {exc}") from None
        label = "easy" if len(stages) == 1 else f"easy {i + 1}"
        curriculum.append({"name": label, "at_step": steps * i // len(stages), "data": dict(changes)})
    curriculum.append({"name": name.replace("-", " "), "at_step": steps, "data": task.params()})  # type: ignore[attr-defined]
    settings.curriculum = curriculum
    return steps
