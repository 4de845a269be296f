"""Run lm-evaluation-harness tasks on a :class:`~.lm_eval_adapter.HydraEvalLM`: task lookup, results table, JSON.

Task names are checked before anything runs, so a typo is one line naming it (with the closest names)
instead of a traceback after the model has loaded. Tasks come from ``include_path`` folders (YAML task
files, such as the tiny local tasks of ``tests/evaluation/tasks``) and from the harness's own catalogue of
several thousand tasks, which is only indexed (about ten seconds on two cores) when a task is not found in
``include_path``.

Nothing here downloads: the caller (``hydra-kit eval``) sets the Hugging Face offline switches before the
harness is imported, so a task whose data is not already in the local datasets cache fails in one line.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from hydra_kit.errors import RecipeError

__all__ = ["format_results", "run_tasks", "write_results"]


def _task_manager(tasks: list[str], include_path: list[str]) -> Any:
    """A TaskManager that knows every name in ``tasks``, or a one-line error naming those it does not."""
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise RecipeError(f"--include_path {folder!r}: no such folder (it should hold lm-eval task YAML files)")
    names = [t for t in tasks if not Path(t).is_file()]  # a YAML file given as a task needs no lookup
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([n]) for n in names):
            return local
    manager = TaskManager(include_path=include_path or None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        hints = sorted({m for n in unknown for m in difflib.get_close_matches(n, manager.all_tasks, n=3)})
        hint = f"; close names: {', '.join(hints)}" if hints else ""
        where = f" in --include_path {', '.join(include_path)} or" if include_path else " in"
        raise RecipeError(f"--tasks: unknown task(s) {', '.join(unknown)}{where} lm-eval's {len(manager.all_tasks)} tasks{hint} (list them with `lm-eval ls tasks`)")
    return manager


def run_tasks(
    lm: Any,
    tasks: list[str],
    *,
    include_path: list[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 100000,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate ``lm`` on ``tasks`` with ``lm_eval.simple_evaluate``; returns the harness's results dict.

    Args:
        lm: the model (:class:`~.lm_eval_adapter.HydraEvalLM`).
        tasks: task, group or tag names (glob patterns allowed), or task YAML files.
        include_path: folders of extra task YAML files.
        limit: at most this many examples per task (a fraction below 1: that share of them).
        num_fewshot: few-shot examples per prompt (None: each task's default).
        bootstrap_iters: bootstrap resamples for the standard errors (0: none).
        seed: seed of the harness's Python, NumPy, torch and few-shot sampling.

    Raises:
        RecipeError: a task is unknown, or its data cannot be read offline.
    """
    if not tasks:
        raise RecipeError("--tasks: give at least one task name (e.g. --tasks hellaswag,lambada_openai)")
    from lm_eval import evaluator

    manager = _task_manager(tasks, list(include_path or []))
    try:
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as exc:
        # Offline, "download the dataset" fails here, as does a local task whose data file is missing.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(
            f"--tasks {','.join(tasks)}: a task's data cannot be read offline ({first}); a Hugging Face dataset must be in "
            "the local cache first (docs/eval.md)"
        ) from None
    if results is None:  # simple_evaluate returns None on ranks other than 0, never in one process
        raise RecipeError("lm-eval returned no results")
    return dict(results)


def format_results(results: dict[str, Any]) -> str:
    """The harness's results table (and its groups table when a group ran), as Markdown."""
    from lm_eval.utils import make_table

    table = str(make_table(results))
    if results.get("groups"):
        table += "\n" + str(make_table(results, "groups"))
    return table


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the results dict as JSON (values JSON cannot hold are written as strings); returns the path."""
    from lm_eval.utils import handle_non_serializable

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n", encoding="utf-8")
    return target

