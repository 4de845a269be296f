"""``hydra-kit experiment NAME --merge DIR ...``: join seeds trained in separate processes into one result.

Seeds of one experiment can train in parallel, one process per core, each with its own ``--out`` and
``--first-seed``. ``--merge`` then trains nothing: it reads each folder's ``<name>.json`` and joins the
per-seed records and runs, after checking that they are joinable, i.e. the same training and evaluation
settings (:data:`MERGE_SETTINGS`), the same model configs, the same task (equal no-skill baselines on the
held-out examples) and disjoint (model, seed) pairs. The joined result is then summarised and written exactly
as a single run would be.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from hydra_kit.data.task import SyntheticTask
from hydra_kit.errors import RecipeError
from hydra_kit.experiments.models import ModelSpec
from hydra_kit.experiments.settings import Settings, describe_task, print_run


def merged_grid(
    console: Console,
    specs: Sequence[ModelSpec],
    task: SyntheticTask,
    settings: Settings,
    name: str,
    baselines: list[dict[str, Any]] | None,
    where: dict[str, Any],
    merged_lists: dict[str, list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`~hydra_kit.experiments.runner.run_grid` under ``--merge``: the folders' records and runs that match ``where``, each run printed.

    Raises:
        RecipeError: besides :func:`load_merged`'s checks, a kept run was trained on another task than ``task``
            (runs written before runs recorded their ``train_task`` are not checked).
    """
    merged = load_merged(settings, name, specs, baselines, extra_keys=tuple(merged_lists))

    def keep(row: dict[str, Any]) -> bool:
        return all(row.get(k) == v for k, v in where.items())

    # In the order one run would have made them (seed by seed, models in the experiment's order), whatever order the
    # folders were given in: the tables list the full Hydra first and the joined files equal a single run's.
    order = {spec.label: i for i, spec in enumerate(specs)}

    def one_run_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted((row for row in rows if keep(row)), key=lambda row: (row.get("seed", 0), order.get(row.get("model", ""), len(order))))

    for key, target in merged_lists.items():
        target.extend(one_run_order(merged[key]))
    runs = one_run_order(merged["runs"])
    ours = json.loads(json.dumps(describe_task(task)))
    for run in runs:
        theirs = run.get("train_task", ours)
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise RecipeError(
                f"experiment {name} --merge: {run['merged_from']}: {run['model']} seed {run['seed']} was trained on a task with other "
                f"{', '.join(differ)} ({', '.join(f'{k}={theirs.get(k)!r}' for k in differ)}; this command: "
                f"{', '.join(f'{k}={ours.get(k)!r}' for k in differ)}); pass the same task options"
            )
        print_run(console, run, settings.steps)
    return one_run_order(merged["records"]), runs


# What must agree between the runs that --merge joins: how they were trained and evaluated.
MERGE_SETTINGS = ("size", "steps", "batch_size", "eval_per_level", "recipe", "lr", "transformer_lr", "curriculum")
# Settings added later: a file written before them was trained with this value.
MERGE_SETTING_DEFAULTS: dict[str, Any] = {"curriculum": []}


def load_merged(
    settings: Settings, name: str, specs: Sequence[ModelSpec], baselines: list[dict[str, Any]] | None, extra_keys: Sequence[str] = ()
) -> dict[str, list[dict[str, Any]]]:
    """The records, runs and ``extra_keys`` lists of the ``<name>.json`` in each ``settings.merge`` folder, joined.

    Each run is tagged ``merged_from`` (its folder). ``settings.seeds`` and ``settings.first_seed`` are set to
    what was joined, so the written settings describe the merged result. With ``settings.models`` only those
    models' rows are taken from every folder (and only their configurations checked): a folder of several
    models, such as an earlier joined result, then gives just the runs that are still valid.

    Raises:
        RecipeError: a file is missing or unreadable, is another experiment's, was trained with other settings
            (:data:`MERGE_SETTINGS`), holds runs of a model whose configuration differs from this command's (or that
            it does not have), was run on another task (its no-skill baselines differ), or two folders hold the
            same (model, seed).
    """
    joined: dict[str, list[dict[str, Any]]] = {key: [] for key in ("records", "runs", *extra_keys)}
    seen: dict[tuple[str, int, Any], str] = {}
    wanted_models = {s.label: json.loads(json.dumps(s.config)) for s in specs}
    wanted_baselines = None if baselines is None else json.loads(json.dumps(baselines, default=str))
    for folder in settings.merge:
        path = Path(folder) / f"{name}.json"
        where = f"experiment {name} --merge: {path}"
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"{where}: no such file (a folder written by `hydra-kit experiment` with --out holds it)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecipeError(f"{where}: not a readable experiment result ({error})") from None
        if not isinstance(payload, dict) or payload.get("experiment") != name:
            found = payload.get("experiment") if isinstance(payload, dict) else type(payload).__name__
            raise RecipeError(f"{where}: holds experiment {found!r}, not {name!r}")
        for key in MERGE_SETTINGS:
            theirs, ours = payload.get("settings", {}).get(key, MERGE_SETTING_DEFAULTS.get(key)), getattr(settings, key)
            if theirs != ours:
                raise RecipeError(f"{where}: trained with {key} = {theirs!r}, but this command has {key} = {ours!r}; merge only runs of the same settings")
        for key in joined:
            if key not in payload:
                raise RecipeError(f"{where}: has no {key!r} list; it was not written by this version of the experiment")
            if settings.models:
                payload[key] = [row for row in payload[key] if row.get("model") in settings.models]
        # Only the models a folder has runs of must match: a folder of transformer runs still joins after a change
        # to Hydra's recipe, which its JSON (describing every model of its command) lists as it was then.
        models = {label: entry.get("config") for label, entry in payload.get("models", {}).items()}
        trained = sorted({run["model"] for run in payload["runs"]})
        differ = [m for m in trained if m not in wanted_models or models.get(m) != wanted_models[m]]
        if differ:
            raise RecipeError(f"{where}: its models differ from this command's ({', '.join(differ)}); merge only runs of the same recipe and task options")
        if wanted_baselines is not None and payload.get("baselines") != wanted_baselines:
            raise RecipeError(f"{where}: its task differs from this command's (other no-skill baselines on the held-out examples); pass the same task options")
        for run in payload["runs"]:
            # E6 trains each (model, seed) once per number of pairs: the level is part of a run's identity there.
            identity = (run["model"], run["seed"], run.get("pairs"))
            if identity in seen:
                raise RecipeError(f"{where}: {run['model']} seed {run['seed']} is also in {seen[identity]}; merge folders of disjoint seeds (--first-seed)")
            seen[identity] = folder
        for key in joined:
            joined[key].extend(dict(row, merged_from=folder) if key == "runs" else row for row in payload[key])
    seeds = sorted({r["seed"] for r in joined["runs"]})
    if not seeds:
        of = f" of {', '.join(map(repr, settings.models))}" if settings.models else ""
        raise RecipeError(f"experiment {name} --merge: the folders {', '.join(settings.merge)} hold no finished seed{of}")
    settings.seeds, settings.first_seed = len(seeds), seeds[0]
    return joined
