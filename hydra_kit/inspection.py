"""``hydra-kit inspect``: what each block of a trained checkpoint does on held-out examples of a synthetic task.

::

    hydra-kit inspect --ckpt_path runs/full/version_0/checkpoints/last.ckpt [--task mqar] [--examples 64] [--out gates.png]

The checkpoint is loaded as ``generate`` loads it (:func:`hydra_kit.checkpoint.load_model`) and runs ``--examples``
held-out examples of a task in one batch, in evaluation mode, with per-block diagnostics on
(``HydraLM.forward(..., diagnostics=True)``). The task is, by default, the one the run was trained on: the
``data.init_args.task`` of the ``config.yaml`` saved beside the checkpoint's ``checkpoints/`` folder, with the
curriculum stage the checkpoint had reached, and the run's data seed; ``--task NAME`` (and ``--task_args JSON``)
names another one of :data:`TASKS`.

Printed: a table per block and instance (mean gate r, LayerScale g, ||g * r * update|| / ||x||, and the component's
own statistics, as the ``diag/`` training logs have them), and, for a task that says where each answer's fact is
stated (:meth:`hydra_kit.data.SyntheticTask.evidence`: MQAR's key-value pair, DistantPremise's premise), a table
per component that offers an ``attention_map`` (sparse global attention): of the answer positions, how many have
the fact inside the local window, how many of the others find it among the global tokens visible to them
(recall), and the attention mass the answer position puts on the fact's tokens. A PNG shows the gates per block
and instance as a heatmap and that attention mass per block.

The core never imports a component: gates and statistics come from the model's diagnostics, and the attention
from a component's optional ``attention_map`` method, called on the inputs a forward pre-hook recorded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from hydra_kit.data import MQAR, DistantPremise, DomainMixture, FactRecall, LogicChains, SyntheticTask
from hydra_kit.data.task import IGNORE_INDEX, Example
from hydra_kit.model import HydraLM
from hydra_kit.protocol import AttentionMap, ComponentContext
from hydra_kit.recipe import RecipeError

#: The tasks ``--task`` names, built with their default arguments updated by ``--task_args``.
TASKS: dict[str, Callable[..., SyntheticTask]] = {
    "mqar": MQAR,
    "distant-premise": DistantPremise,
    "logic-chains": LogicChains,
    "fact-recall": FactRecall,
    "domain-mixture": DomainMixture,
}
# What every run instance's diagnostics hold; the rest of its statistics are the component's own.
GENERIC = ("gate_mean", "gate", "layerscale", "update_rel_norm")


@dataclass
class InstanceRow:
    """One block's instance: its gate, LayerScale, relative update norm and own statistics (batch means)."""

    block: int
    instance: str
    component: str
    gate: float | None
    layerscale: float | None
    update_rel_norm: float | None
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class EvidenceRow:
    """Where one attending block's answer positions look, relative to the fact each answer needs.

    Attributes:
        questions: answer positions over all examples.
        in_window: those whose fact (any of its tokens) lies in the query's local (non-global) view.
        recalled: of the others, those with a token of the fact among the global tokens visible to them.
        attention: mean attention mass (heads averaged) an answer position puts on its fact's tokens.
        via_global: the part of that mass read through the global tokens.
    """

    block: int
    instance: str
    questions: int
    in_window: int
    recalled: int
    attention: float
    via_global: float

    @property
    def recall(self) -> float | None:
        outside = self.questions - self.in_window
        return self.recalled / outside if outside else None


@dataclass
class Inspection:
    """Everything ``hydra-kit inspect`` reports about one checkpoint on one task."""

    task: str
    examples: int
    seed: int
    accuracy: float
    rows: list[InstanceRow]
    evidence: list[EvidenceRow] | None  # None: the task does not say where its facts are
    n_blocks: int


# ------------------------------------------------------------------------------------------------- tasks
def build_task(name: str, args_json: str | None) -> SyntheticTask:
    """The task ``--task NAME`` (``--task_args`` JSON keywords) names.

    Raises:
        RecipeError: unknown name, unreadable JSON or arguments the task rejects.
    """
    if name not in TASKS:
        raise RecipeError(f"inspect: unknown task {name!r}; tasks: {', '.join(TASKS)}")
    try:
        kwargs = json.loads(args_json) if args_json else {}
    except json.JSONDecodeError as exc:
        raise RecipeError(f"inspect: --task_args is not JSON ({exc.msg}); e.g. --task_args '{{\"num_pairs\": 4}}'") from None
    if not isinstance(kwargs, dict):
        raise RecipeError(f"inspect: --task_args must be a JSON object of keyword arguments, got {args_json}")
    try:
        return TASKS[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"inspect: --task {name} --task_args {args_json}: {exc}") from None


def run_config(ckpt_path: str) -> Path | None:
    """The ``config.yaml`` a training run saved beside the checkpoint's folder, if there is one."""
    path = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    return path if path.is_file() else None


def trained_task(ckpt_path: str, checkpoint: dict[str, Any]) -> tuple[SyntheticTask, int] | None:
    """The task (at the curriculum stage the checkpoint reached) and data seed of the run, or None if unknown.

    Read from the run's saved ``config.yaml`` (``data.init_args.task``; a synthetic data module without one uses
    MQAR) and the data module's state in the checkpoint (the seed and the curriculum's task changes).

    Raises:
        RecipeError: the saved configuration names a task that cannot be built.
    """
    import yaml

    config = run_config(ckpt_path)
    if config is None:
        return None
    try:
        data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        raise RecipeError(f"inspect: {config}: not a readable run configuration; name the task with --task ({', '.join(TASKS)})") from None
    if not isinstance(data, dict) or not str(data.get("class_path", "")).endswith("SyntheticDataModule"):
        return None  # text data, or a data module whose task is not known here
    init = data.get("init_args") or {}
    spec = init.get("task")
    task: SyntheticTask
    if spec is None:
        task = MQAR()
    else:
        module, _, name = str(spec.get("class_path", "")).rpartition(".")
        try:
            cls = getattr(import_module(module), name)
            task = cls(**(spec.get("init_args") or {}))
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            raise RecipeError(f"inspect: {config}: data.init_args.task {spec.get('class_path')!r} cannot be built ({exc}); name one with --task") from None
        if not isinstance(task, SyntheticTask):
            return None
    state = checkpoint.get("SyntheticDataModule") or {}
    schedule = state.get("task_schedule") or []
    if schedule and hasattr(task, "with_params"):  # a curriculum changed the task: inspect its last stage
        task = task.with_params(schedule[-1][1])
    return task, int(state.get("seed", init.get("seed", 0)) or 0)


def check_task(model: HydraLM, task: SyntheticTask, name: str) -> None:
    """Refuse a task the model cannot read (a larger vocabulary) or process (longer sequences)."""
    vocab = int(model.hparams["vocab_size"])
    if task.vocab_size > vocab:
        raise RecipeError(f"inspect: task {name} uses {task.vocab_size} token ids but the model reads only {vocab} (vocab_size); choose a smaller task with --task_args or the task it was trained on")
    limit = model.max_seq_len
    if limit is not None and task.seq_len > limit:
        raise RecipeError(f"inspect: task {name} makes sequences of {task.seq_len} tokens; the model supports at most {limit}")


def describe(task: SyntheticTask) -> str:
    """The task's class and its adjustable arguments, e.g. ``MQAR(num_pairs=8, num_queries=8)``."""
    params = getattr(task, "params", None)
    args = ", ".join(f"{k}={v}" for k, v in (params() if callable(params) else {}).items())
    return f"{type(task).__name__}({args})"


# ---------------------------------------------------------------------------------------------- analysis
def select_instances(model: HydraLM, wanted: list[str]) -> set[str]:
    """The instances ``--component`` values name (an instance name, or the component it uses), all without any.

    Raises:
        RecipeError: a value names nothing in the checkpoint; the message lists what it has.
    """
    names = {r.name: r.entry.name for r in model.resolved}
    if not wanted:
        return {n for n, r in zip(names, model.resolved, strict=True) if not r.is_router}
    chosen: set[str] = set()
    for value in wanted:
        hits = {n for n, component in names.items() if value in (n, component)}
        if not hits:
            have = ", ".join(f"{n} ({c})" if n != c else n for n, c in names.items())
            raise RecipeError(f"inspect: the checkpoint has no component {value!r}; its instances: {have}")
        chosen |= hits
    return chosen


def _record_inputs(model: HydraLM, seen: dict[tuple[int, str], tuple[Tensor, ComponentContext | None]]) -> list[Any]:
    """Forward pre-hooks that keep the input and context of every component offering ``attention_map``."""
    handles = []
    for block in model.tri_path_blocks:
        for name, component in block.components().items():
            if not callable(getattr(component, "attention_map", None)):
                continue

            def record(module: nn.Module, args: tuple[Any, ...], key: tuple[int, str] = (block.layer_idx, name)) -> None:
                seen[key] = (args[0], args[1] if len(args) > 1 else None)

            handles.append(component.register_forward_pre_hook(record))
    return handles


def evidence_rows(
    model: HydraLM, seen: dict[tuple[int, str], tuple[Tensor, ComponentContext | None]], facts: list[dict[int, list[int]]], chosen: set[str]
) -> list[EvidenceRow]:
    """For each recorded attending instance, where the answer positions look relative to their facts."""
    positions = sorted({t for per_example in facts for t in per_example})
    column = {t: i for i, t in enumerate(positions)}
    rows = []
    for (block_idx, name), (x, context) in sorted(seen.items()):
        if name not in chosen:
            continue
        component = model.tri_path_blocks[block_idx].components()[name]
        amap: AttentionMap = component.attention_map(x, context, torch.tensor(positions, device=x.device))  # type: ignore[operator]
        weights = amap.weights.mean(1)  # (B, Q, L): heads averaged
        questions = in_window = recalled = 0
        mass = via = 0.0
        for b, per_example in enumerate(facts):
            for t, where in per_example.items():
                q, at = column[t], torch.tensor(where, device=x.device)
                local = amap.visible[b, q, at] & ~amap.via_global[b, q, at]
                questions += 1
                if bool(local.any()):
                    in_window += 1
                else:
                    recalled += int(bool(amap.via_global[b, q, at].any()))
                mass += float(weights[b, q, at].sum())
                via += float((weights[b, q, at] * amap.via_global[b, q, at]).sum())
        rows.append(EvidenceRow(block_idx, name, questions, in_window, recalled, mass / max(questions, 1), via / max(questions, 1)))
    return rows


def _instance_rows(model: HydraLM, diagnostics: list[dict[str, dict[str, Tensor]]], chosen: set[str]) -> list[InstanceRow]:
    component_of = {r.name: r.entry.name for r in model.resolved}
    rows = []
    for block, per_instance in zip(model.tri_path_blocks, diagnostics, strict=True):
        for name, stats in per_instance.items():
            if name not in chosen:
                continue

            def get(key: str, stats: dict[str, Tensor] = stats) -> float | None:
                return float(stats[key]) if key in stats else None

            own = {k: float(v) for k, v in stats.items() if k not in GENERIC and v.dim() == 0}
            rows.append(InstanceRow(block.layer_idx, name, component_of.get(name, name), get("gate_mean"), get("layerscale"), get("update_rel_norm"), own))
    return rows


@torch.no_grad()
def inspect_model(model: HydraLM, task: SyntheticTask, examples: list[Example], chosen: set[str], task_name: str, seed: int) -> Inspection:
    """Run ``examples`` through ``model`` in one batch with diagnostics on and collect what the tables show."""
    model.eval()
    input_ids = torch.stack([torch.from_numpy(e.input_ids) for e in examples])  # (N, L)
    targets = torch.stack([torch.from_numpy(e.targets) for e in examples])
    seen: dict[tuple[int, str], tuple[Tensor, ComponentContext | None]] = {}
    handles = _record_inputs(model, seen)
    try:
        out = model(input_ids, diagnostics=True)
    finally:
        for handle in handles:
            handle.remove()
    answered = targets != IGNORE_INDEX
    accuracy = float((out.logits.argmax(-1)[answered] == targets[answered]).float().mean()) if answered.any() else math.nan
    facts = [task.evidence(e) for e in examples]
    evidence = None if any(f is None for f in facts) else evidence_rows(model, seen, [f for f in facts if f is not None], chosen)
    rows = _instance_rows(model, out.diagnostics, chosen)
    return Inspection(task_name, len(examples), seed, accuracy, rows, evidence, len(model.tri_path_blocks))


# ----------------------------------------------------------------------------------------------- reports
def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def format_stats(stats: dict[str, float]) -> str:
    """``k=v`` pairs; numbered families (``load_e0``, ``load_e1``, ...) as one ``load_e[0..3]=a b c d``."""
    families: dict[str, list[tuple[int, float]]] = {}
    parts = []
    for key, value in stats.items():
        match = re.fullmatch(r"(.*?)(\d+)", key)
        if match:
            families.setdefault(match.group(1), []).append((int(match.group(2)), value))
        else:
            parts.append(f"{key}={value:.3f}")
    for prefix, items in families.items():
        items.sort()
        label = f"{prefix}{items[0][0]}" if len(items) == 1 else f"{prefix}[{items[0][0]}..{items[-1][0]}]"
        parts.append(f"{label}=" + " ".join(f"{v:.2f}" for _, v in items))
    return ", ".join(parts)


def print_report(report: Inspection, ckpt_path: str, console: Console) -> None:
    console.print(
        f"[bold]inspect[/] {ckpt_path}: {report.examples} held-out examples of {report.task} (seed {report.seed}), "
        f"accuracy at the answer positions {_fmt(report.accuracy)}"
    )
    table = Table(title="per block and instance (batch means; rel. update = ||g * r * update|| / ||x||)")
    for column in ("block", "instance", "gate r", "LayerScale g", "rel. update", "component statistics"):
        table.add_column(column, justify="left" if column in ("instance", "component statistics") else "right")
    for row in report.rows:
        table.add_row(str(row.block), row.instance, _fmt(row.gate), _fmt(row.layerscale), _fmt(row.update_rel_norm), format_stats(row.stats))
    console.print(table)
    if report.evidence is None:
        console.print(f"{report.task} does not say where each answer's fact is stated: no attention-on-evidence table")
        return
    if not report.evidence:
        console.print("no inspected instance offers an attention map (sparse global attention does): no attention-on-evidence table")
        return
    table = Table(title="attention of the answer positions on the fact they need (MQAR: its key-value pair; DistantPremise: its premise)")
    for column in ("block", "instance", "answers", "fact in window", "recall among globals", "attention on fact", "of it via globals"):
        table.add_column(column, justify="left" if column == "instance" else "right")
    for e in report.evidence:
        outside = e.questions - e.in_window
        recall = "-" if e.recall is None else f"{e.recall:.3f} ({e.recalled}/{outside})"
        table.add_row(str(e.block), e.instance, str(e.questions), f"{e.in_window / max(e.questions, 1):.3f}", recall, f"{e.attention:.3f}", f"{e.via_global:.3f}")
    console.print(table)


def plot(report: Inspection, path: Path) -> Path:
    """Gates per block and instance (heatmap) and attention on the fact per attending block (bars) as a PNG."""
    from hydra_kit.experiments.report import pyplot

    plt = pyplot()
    gated = list(dict.fromkeys(r.instance for r in report.rows if r.gate is not None))
    grid = [[math.nan] * len(gated) for _ in range(report.n_blocks)]
    for r in report.rows:
        if r.gate is not None:
            grid[r.block][gated.index(r.instance)] = r.gate
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.5 * report.n_blocks + 1.5)))
    if gated:
        image = left.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    left.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
        left.set_xticks(range(len(gated)), gated)
        left.set_yticks(range(report.n_blocks), [f"block {i}" for i in range(report.n_blocks)])
        fig.colorbar(image, ax=left, label="mean gate r")
    else:
        left.text(0.5, 0.5, "no gated instance (no router)", ha="center", va="center")
        left.set_axis_off()
    left.set_title("router gates per block and path")
    if report.evidence:
        labels = [f"block {e.block}\n{e.instance}" for e in report.evidence]
        x = range(len(labels))
        right.bar([i - 0.2 for i in x], [e.attention for e in report.evidence], width=0.4, label="attention on the fact")
        right.bar([i + 0.2 for i in x], [math.nan if e.recall is None else e.recall for e in report.evidence], width=0.4, label="recall among globals")
        right.set_xticks(list(x), labels)
        right.set_ylim(0, 1)
        right.legend(fontsize=8)
    else:
        reason = "no attention map" if report.evidence is not None else f"{report.task}: no fact positions"
        right.text(0.5, 0.5, reason, ha="center", va="center")
        right.set_axis_off()
    right.set_title("answer positions' attention on their fact")
    fig.suptitle(f"{report.task}, {report.examples} held-out examples, accuracy {_fmt(report.accuracy)}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
