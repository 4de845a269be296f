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
from collections.abc import Sequence
from typing import Any

from hydra_kit.data.task import SyntheticTask
from hydra_kit.recipe import RecipeError


def add_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--easy-steps N [M ...]``: training steps on the warm-up task(s) (``what`` describes them)."""
    parser.add_argument(
        "--easy-steps", "--easy_steps", dest="easy_steps", type=int, nargs="+", default=None, metavar="N",
        help=f"train the first N of --steps on the warm-up task(s) ({what}), split evenly, or give one number per warm-up task; "
        "then the task itself (default: the size's share of --steps; 0: none)",
    )


def set_stages(
    name: str, settings: Any, easy_steps: int | Sequence[int] | None, fraction: float, task: SyntheticTask, *stages: dict[str, Any], rehearse: float = 0.0
) -> int:
    """Put the warm-up stages in ``settings.curriculum``: each of ``stages`` (changes of ``task``'s arguments) for its
    share of the warm-up steps, then ``task`` itself.

    Args:
        name: the experiment's command name, for errors.
        settings: the experiment's resolved settings (``steps`` is read, ``curriculum`` set).
        easy_steps: ``--easy-steps``: the warm-up steps, split evenly over the stages, or one count per stage;
            None takes ``fraction`` of ``settings.steps``.
        fraction: the default share of the steps spent on the warm-up task.
        task: the experiment's training task; its :meth:`params` restore it after the warm-up.
        stages: the warm-up tasks as argument changes of ``task``, easiest first.
        rehearse: share of the batches after the warm-up drawn from the last warm-up task (Curriculum ``rehearse``);
            0: none.

    Returns:
        The number of warm-up steps (0: none, and no curriculum).

    Raises:
        RecipeError: ``--easy-steps`` is negative, not below ``--steps`` in all, gives neither one count nor one per
            stage, a stage is not a valid task, or ``rehearse`` is not in [0, 1).
    """
    if not 0 <= rehearse < 1:
        raise RecipeError(f"experiment {name}: --rehearse must be at least 0 and below 1, got {rehearse}")
    counts = [int(fraction * settings.steps)] if easy_steps is None else [easy_steps] if isinstance(easy_steps, int) else list(easy_steps)
    if len(counts) not in (1, len(stages)):
        raise RecipeError(f"experiment {name}: --easy-steps takes one number (split evenly over the {len(stages)} warm-up tasks) or {len(stages)}, one per task; got {len(counts)}")
    steps = sum(counts)
    if min(counts) < 0 or steps >= settings.steps:
        raise RecipeError(f"experiment {name}: --easy-steps must be at least 0 and below --steps ({settings.steps}) in all, got {' + '.join(map(str, counts))}")
    # where each stage starts: an even split of one count, or the running sum of one count per stage
    starts = [steps * i // len(stages) for i in range(len(stages))] if len(counts) == 1 else [sum(counts[:i]) for i in range(len(stages))]
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
        curriculum.append({"name": label, "at_step": starts[i], "data": dict(changes)})
    final: dict[str, Any] = {"name": name.replace("-", " "), "at_step": steps, "data": task.params()}  # type: ignore[attr-defined]
    if rehearse:
        final["rehearse"] = rehearse
    curriculum.append(final)
    settings.curriculum = curriculum
    return steps
