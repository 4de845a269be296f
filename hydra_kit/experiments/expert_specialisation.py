"""E5: do experts specialise to input domains? Held-out accuracy and domain-expert mutual information.

Every model is trained on :class:`~hydra_kit.data.DomainMixture` (one rule domain per example: copy, reverse,
cyclic difference, modular prefix sum, ...). Evaluated per domain on held-out examples:

* accuracy at the answer positions (only those that need the domain's rule are scored, see
  :class:`~hydra_kit.data.DomainMixture`), for Hydra (MoE), Hydra with its MoE replaced by a dense SwiGLU MLP
  in the same blocks, and a dense transformer, both dense models with Hydra's *active* (per-token) parameter
  count within 5 percent; beside chance (1 / num_symbols) and the best no-skill heuristic (copying an operand,
  another domain's rule, a per-position prior, ..., see :meth:`DomainMixture.heuristics`) scored on the same
  examples, and whether the model is above it (the ``all`` row: the mean over domains of both);
* routing specialisation of each MoE layer: the normalised mutual information between the example's domain
  and the chosen expert, over all top-k assignments, NMI = I(D; E) / mean(H(D), H(E)) (1: the expert
  determines the domain and back; 0: independent). It is measured two ways, both from the outside of the
  component: ``nmi_all`` from the MoE's public ``load_e{i}`` stats (``ComponentOutput.stats``, read by a
  forward hook; every batch holds one domain, so a batch's load is that domain's expert distribution over
  all positions), and ``nmi_answer`` at the answer positions only, where the domain is known and needed (the
  task's docstring explains why operand positions cannot carry it), from the routing decision of the hooked
  module (its ``assign`` method, when it has one);
* a domain x expert heatmap (fraction of each domain's answer-position assignments per expert) per MoE layer,
  averaged over seeds.

::

    hydra-kit experiment expert-specialisation                          # CPU default
    hydra-kit experiment expert-specialisation --size full --domains 6 --seq-len 65 --steps 20000   # full (GPU)

Outputs: ``expert_specialisation.csv`` (model, domain, accuracy mean/std, chance, best_no_skill,
best_no_skill_accuracy, above_no_skill, n_examples, n_seeds; plus rows with domain ``all`` carrying
``nmi_answer`` and ``nmi_all`` for Hydra), ``expert_specialisation.json`` (also the per-layer NMI, the heatmap
counts and every heuristic's accuracy per domain) and ``expert_specialisation.png`` (accuracy per domain, with
each domain's best no-skill accuracy dashed and chance dotted, and the heatmaps).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor, nn

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.experiments import models, report, runner

NAME = "expert_specialisation"
DEFAULTS: dict[str, dict[str, Any]] = {
    # Distinct operands, n = (seq_len - 1) // 2 of num_symbols: guessing an operand (1 / n) stays near chance.
    "cpu": {"steps": 300, "batch_size": 32, "domains": 4, "seq_len": 33, "num_symbols": 32},
    "full": {"steps": 20000, "batch_size": 64, "domains": 6, "seq_len": 65, "num_symbols": 64, "lr": 1e-3},
}


def normalized_mutual_information(joint: np.ndarray) -> float:
    """NMI of a contingency table (rows: domains, columns: experts) of counts, I / mean(H_rows, H_cols).

    1.0 for a perfect one-to-one mapping, 0.0 for independence; 0.0 when either marginal is constant
    (nothing to share). Natural logarithms (the ratio does not depend on the base).

    Raises:
        ValueError: the table is not 2-D, has negative entries or sums to zero.
    """
    joint = np.asarray(joint, dtype=np.float64)
    if joint.ndim != 2 or (joint < 0).any() or joint.sum() <= 0:
        raise ValueError(f"normalized_mutual_information: need a non-negative 2-D table with a positive sum, got shape {joint.shape}")
    p = joint / joint.sum()
    pr, pc = p.sum(1), p.sum(0)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_r, h_c = entropy(pr), entropy(pc)
    if h_r == 0 or h_c == 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pr, pc)[nz])).sum())
    return max(0.0, mi / (0.5 * (h_r + h_c)))


def moe_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's mixture-of-experts components, found by their public stats (``load_e0``) on a probe forward."""
    found: dict[str, nn.Module] = {}
    handles = []
    blocks: Any = model.blocks
    for b, block in enumerate(blocks):
        for name, comp in block.mixers.items():

            def hook(module: nn.Module, args: Any, output: Any, key: str = f"{name}@{b}") -> None:
                if "load_e0" in getattr(output, "stats", {}):
                    found[key] = module

            handles.append(comp.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 8, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return found


class RoutingRecorder:
    """Forward hooks on the MoE modules that add (domain, expert) assignment counts per layer.

    Args:
        modules: layer key -> MoE module.
        n_domains: number of domains (rows).
    """

    def __init__(self, modules: dict[str, nn.Module], n_domains: int) -> None:
        self.modules = modules
        self.n_domains = n_domains
        self.all: dict[str, np.ndarray] = {}
        self.answer: dict[str, np.ndarray] = {}
        self.domain = 0
        self.answer_mask: Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            stats = output.stats
            n_experts = sum(1 for k in stats if k.startswith("load_e"))
            x = args[0]  # (B, L, D) the normalised block input
            self.all.setdefault(key, np.zeros((self.n_domains, n_experts)))
            # load_e{i} is the fraction of this batch's B * L * k assignments routed to expert i.
            loads = np.array([float(stats[f"load_e{i}"]) for i in range(n_experts)])
            self.all[key][self.domain] += loads * x.shape[0] * x.shape[1]
            assign = getattr(module, "assign", None)
            if assign is not None and self.answer_mask is not None:
                expert_idx = assign(x).expert_idx  # (B, L, k)
                chosen = expert_idx[self.answer_mask]  # (N, k)
                counts = torch.bincount(chosen.reshape(-1), minlength=n_experts).double().cpu().numpy()
                self.answer.setdefault(key, np.zeros((self.n_domains, n_experts)))
                self.answer[key][self.domain] += counts

        return record

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def dense_hydra(config: dict[str, Any], moe_name: str, target_active: int) -> tuple[dict[str, Any], dict[str, int]]:
    """Hydra with its MoE instance replaced by a dense SwiGLU MLP in the same blocks, matched on active params."""
    d_model = int(config["d_model"])
    blocks = config["components"][moe_name].get("blocks", "all")

    def make(hidden: int) -> dict[str, Any]:
        out = copy.deepcopy(config)
        del out["components"][moe_name]
        out["components"]["mlp"] = {"component": "mlp", "blocks": blocks, "args": {"hidden_mult": hidden / d_model, "multiple_of": 16}}
        return out

    return models.match_hidden(make, target_active, "active_params", "dense-MLP Hydra")


def main(argv: list[str], console: Console) -> int:
    """Domain mixture: held-out accuracy vs equal-active dense models, domain-expert NMI and heatmaps."""
    from hydra_kit.data import DomainMixture

    parser = ArgumentParser(prog="hydra-kit experiment expert-specialisation", description=main.__doc__)
    runner.add_common_arguments(parser)
    parser.add_argument("--domains", type=int, default=None, help="number of rule domains (1..6)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length ((seq_len - 1) // 2 operands)")
    args = parser.parse_args(argv)
    settings = runner.resolve_settings(args, NAME, DEFAULTS)
    d = DEFAULTS[settings.size]
    task = runner.build_task(DomainMixture, num_domains=args.domains or d["domains"], seq_len=args.seq_len or d["seq_len"], num_symbols=d["num_symbols"])
    levels = list(range(task.num_domains))
    names = {i: task.domains[i] for i in levels}
    console.print(
        f"[bold]E5 expert specialisation[/]: domains {', '.join(task.domains)}, length {task.seq_len}, {task.num_symbols} symbols; "
        f"{settings.seeds} seeds, {settings.steps} steps, {settings.eval_per_level} held-out examples per domain"
    )
    examples = runner.eval_set(task, "domain", levels, settings.eval_per_level)
    baselines = [dict(b, domain=names[b["domain"]]) for b in report.baseline_rows(task, examples, "domain")]
    report.print_baselines(console, "no-skill baselines per domain (held-out accuracy at the scored positions; bold: the best)", baselines, "domain")
    hydra = models.hydra_config(settings.size, task.vocab_size, settings.recipe)
    moe_names = [n for n, s in hydra["components"].items() if s.get("component") in ("moe", "MixtureOfExperts")]
    if not moe_names:
        raise runner.RecipeError("experiment expert-specialisation: the Hydra recipe has no moe component instance to study")
    target = models.count_parameters(hydra)["active_params"]
    dense, _ = dense_hydra(hydra, moe_names[0], target)
    transformer, _ = models.dense_transformer(hydra, match="active_params")
    specs = [
        models.ModelSpec("hydra", hydra, "full layout (MoE)"),
        models.ModelSpec("hydra dense-mlp", dense, "MoE -> SwiGLU MLP, active params matched"),
        models.ModelSpec("transformer", transformer, "attention + SwiGLU, active params matched", lr=settings.transformer_lr),
    ]
    counts = runner.describe_models(console, specs)
    routing: list[dict[str, Any]] = []

    def measure(trained: runner.TrainedModel, spec: models.ModelSpec, seed: int) -> list[dict[str, Any]]:
        modules = moe_modules(trained.model)
        recorder = RoutingRecorder(modules, len(levels)) if modules else None
        rows: list[dict[str, Any]] = []
        try:
            for level in levels:
                if recorder is not None:
                    recorder.domain = level

                def on_batch_start(ids: Tensor, targets: Tensor) -> None:
                    if recorder is not None:
                        recorder.answer_mask = targets != runner.IGNORE_INDEX

                cell = evaluate_with_mask(trained.model, examples[level], on_batch_start)
                rows.append({"domain": names[level], "accuracy": cell.accuracy, "n_examples": cell.examples})
        finally:
            if recorder is not None:
                recorder.remove()
        if recorder is not None:
            per_layer = {
                k: {
                    "nmi_all": normalized_mutual_information(recorder.all[k]),
                    "nmi_answer": normalized_mutual_information(recorder.answer[k]) if k in recorder.answer else None,
                    "answer_counts": recorder.answer[k].tolist() if k in recorder.answer else None,
                }
                for k in recorder.all
            }
            routing.append({"model": spec.label, "seed": seed, "layers": per_layer})
            nmi_answer = [v["nmi_answer"] for v in per_layer.values() if v["nmi_answer"] is not None]
            rows.append(
                {
                    "domain": "all",
                    "accuracy": float(np.mean([r["accuracy"] for r in rows])),
                    "nmi_answer": float(np.mean(nmi_answer)) if nmi_answer else None,
                    "nmi_all": float(np.mean([v["nmi_all"] for v in per_layer.values()])),
                    "n_examples": sum(r["n_examples"] for r in rows),
                }
            )
        else:
            rows.append({"domain": "all", "accuracy": float(np.mean([r["accuracy"] for r in rows])), "n_examples": sum(r["n_examples"] for r in rows)})
        return rows

    def write(records: list[dict[str, Any]], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Summarise the seeds done so far and (re)write the CSV, JSON and PNG."""
        summary = report.summarise(records, ("model", "domain"), ("accuracy", "nmi_answer", "nmi_all"))
        summary = report.with_baselines(summary, baselines, "domain", pooled={"all": "best per domain"})
        heatmaps = mean_heatmaps(routing, "hydra")
        extra = {
            "task": {"domains": list(task.domains), "seq_len": task.seq_len, "num_symbols": task.num_symbols, "chance": task.chance},
            "baselines": baselines,
            "nmi": "I(D;E) / mean(H(D), H(E)) over top-k assignments, per MoE layer",
            "routing": routing,
            "heatmaps": {k: v.tolist() for k, v in heatmaps.items()},
            "records": records,
            "paired": report.paired_rows(records, "domain", specs),
            "runs": runs,
        }
        csv_path, json_path = report.write_outputs(settings.out, NAME, summary, runner.payload(NAME, settings, specs, counts, extra))
        png = settings.out / f"{NAME}.png"
        plot(png, summary, heatmaps, list(task.domains), baselines)
        return summary, [csv_path, json_path, png]

    records, runs = runner.run_grid(
        console, specs, task, settings, measure, on_seed=write, name=NAME, baselines=baselines, merged_lists={"routing": routing}
    )
    summary, paths = write(records, runs)
    report.print_table(
        console,
        f"E5 expert specialisation: held-out accuracy per domain and domain-expert NMI (mean over MoE layers; mean ± std over "
        f"{report.seeds_phrase(records)}; an accuracy is a claim only where above no-skill)",
        summary,
        ("model", "domain"),
        [("accuracy", "accuracy", 3), ("NMI answer pos.", "nmi_answer", 3), ("NMI all pos.", "nmi_all", 3)],
    )
    report.print_paired(console, report.paired_rows(records, "domain", specs), "domain")
    report.report_files(console, paths)
    return 0


@torch.inference_mode()
def evaluate_with_mask(model: nn.Module, examples: list[Any], on_batch_start: Any, batch_size: int = 128) -> runner.CellResult:
    """:func:`runner.evaluate` with a callback before each forward (the recorder needs the answer mask)."""
    correct = answers = 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        ids, targets = (t.to(device) for t in runner.stack(examples[start : start + batch_size]))
        on_batch_start(ids, targets)
        out = model(ids)
        mask = targets != runner.IGNORE_INDEX
        correct += int((out.logits.argmax(-1)[mask] == targets[mask]).sum())
        answers += int(mask.sum())
    return runner.CellResult(correct, answers, len(examples))


def mean_heatmaps(routing: list[dict[str, Any]], model: str) -> dict[str, np.ndarray]:
    """Per MoE layer: each domain's answer-position assignments as fractions per expert, averaged over seeds."""
    maps: dict[str, list[np.ndarray]] = {}
    for r in routing:
        if r["model"] != model:
            continue
        for layer, v in r["layers"].items():
            if v["answer_counts"] is not None:
                c = np.asarray(v["answer_counts"])
                maps.setdefault(layer, []).append(c / np.maximum(c.sum(1, keepdims=True), 1))
    return {k: np.mean(v, axis=0) for k, v in maps.items()}


def plot(path: Any, summary: list[dict[str, Any]], heatmaps: dict[str, np.ndarray], domains: list[str], baselines: list[dict[str, Any]]) -> None:
    """Accuracy per domain and model (left; each domain's chance and best no-skill accuracy marked over its bars)
    and one domain x expert heatmap per MoE layer of Hydra."""
    plt = report.pyplot()
    n = len(heatmaps)
    fig, axes = plt.subplots(1, 1 + n, figsize=(5 + 2.6 * n, 3.8), squeeze=False)
    ax = axes[0][0]
    models = list(dict.fromkeys(r["model"] for r in summary))
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        rows = [next(r for r in summary if r["model"] == model and r["domain"] == dom) for dom in domains]
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(domains))]
        ax.bar(xs, [r["accuracy_mean"] for r in rows], width, yerr=[r["accuracy_std"] for r in rows], capsize=2, label=model)
    report.draw_baselines(ax, baselines, "domain", {dom: i for i, dom in enumerate(domains)}, 0.8)
    ax.set_xticks(range(len(domains)), domains, rotation=20)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    for i, (layer, hm) in enumerate(sorted(heatmaps.items(), key=lambda kv: int(kv[0].split("@")[1]))):
        a = axes[0][1 + i]
        im = a.imshow(hm, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        a.set_title(f"Hydra {layer.replace('@', ' block ')}", fontsize=9)
        a.set_xlabel("expert")
        a.set_yticks(range(len(domains)), domains if i == 0 else [""] * len(domains))
        a.set_xticks(range(hm.shape[1]))
    if n:
        fig.colorbar(im, ax=axes[0][1:].tolist(), shrink=0.8, label="fraction of domain's assignments")
    fig.suptitle("E5 expert specialisation (answer positions)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
