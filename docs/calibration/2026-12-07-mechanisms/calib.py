"""Issue 32 calibration: train one experiment model on E4 or MQAR and print what its mechanisms do over training.

The task, model configs, warm-up schedule and training (Lightning, warm-up then cosine over --steps, clipping
1.0, float32, batch 32) are those of `hydra-kit experiment distant-premise` / `mqar` at their CPU size. Every
--every steps it prints: held-out accuracy per level (--eval examples each), and per block the mean router
gate of each gated component, the LayerScale values, and for SGA blocks on E4 the share of asked premises
whose key or value token is visible to the question (in the local window or among the globals).

Usage: python calib.py hydra --task e4 --steps 1000 [--drop sga] [--set components.router.args.budget_weight=0]
"""

import argparse
import json
import time

import lightning as L
import torch

from hydra_kit.callbacks import Curriculum
from hydra_kit.components.sga import global_schedule
from hydra_kit.data import MQAR, DistantPremise, SyntheticDataModule
from hydra_kit.experiments import models, runner
from hydra_kit.experiments.distant_premise import EASY_TASK
from hydra_kit.model import HydraLM

p = argparse.ArgumentParser()
p.add_argument("model", choices=["hydra", "transformer"])
p.add_argument("--task", choices=["e4", "mqar"], default="e4")
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--easy-steps", type=int, default=None, help="E4 warm-up steps (default 40%% of --steps, as the experiment)")
p.add_argument("--lr", type=float, default=None, help="default: 3e-3 for hydra, 1e-3 for the transformer (the experiments')")
p.add_argument("--every", type=int, default=100)
p.add_argument("--eval", type=int, default=200)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--drop", nargs="*", default=[])
p.add_argument("--set", nargs="*", default=[], metavar="PATH=JSON", help="override a model-config key, e.g. components.sga.args.max_global=64")
p.add_argument("--lr-scale", nargs="*", default=[], metavar="INSTANCE=X", help="learning-rate multiplier for every parameter of a component instance")
p.add_argument("--ls-lr", type=float, default=None, help="learning-rate multiplier for the LayerScale scalars")
p.add_argument("--stop", type=int, default=None, help="stop after this step (the schedule still spans --steps)")
p.add_argument("--distances", type=int, nargs="+", default=[16, 32, 64])
a = p.parse_args()
torch.set_num_threads(1)

if a.task == "e4":
    task = DistantPremise(distance=a.distances, num_distractors=15, num_keys=32, num_values=16, num_questions=8)
    levels, level_key = a.distances, "distance"
else:
    task = MQAR(num_pairs=8, num_queries=8, num_keys=32, num_values=32)
    levels, level_key = [8], "pairs"
examples = runner.eval_set(task, level_key, levels, a.eval)
hydra = models.hydra_config("cpu", task.vocab_size)
config = hydra if a.model == "hydra" else models.dense_transformer(hydra)[0]
if a.drop:
    config = models.without(config, *a.drop)
for item in a.set:
    path, _, value = item.partition("=")
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = json.loads(value)
lr = a.lr or (3e-3 if a.model == "hydra" else 1e-3)


def premise_visibility(module: HydraLM, batch: list) -> dict[int, float]:
    """Per SGA block: share of asked premises whose key or value token the question's answer position can see."""
    ids, _ = runner.stack(batch)
    captured: dict[int, torch.Tensor] = {}

    def capture(idx: int):
        def route_hook(route):
            def wrapped(u, **kw):
                out = route(u, **kw)
                captured[idx] = out.global_score.detach()
                return out
            return wrapped
        return route_hook

    originals = {}
    for i, block in enumerate(module.tri_path_blocks):
        if block.router is not None and "sga" in block.mixers:
            originals[i] = block.router.route
            block.router.route = capture(i)(block.router.route)
    with torch.inference_mode():
        module(ids)
    for i, fn in originals.items():
        del module.tri_path_blocks[i].router.route
    out = {}
    for i, score in captured.items():
        sga = module.tri_path_blocks[i].mixers["sga"]
        sched = global_schedule(score, sga.window, sga.max_global)  # (B, C, M)
        seen = total = 0
        for b, ex in enumerate(batch):
            q_at = len(ex.input_ids) - 2 * len(ex.meta["offsets"])
            for qi, off in enumerate(ex.meta["offsets"]):
                t = q_at + 2 * qi + 1  # the answer position (the question's key token)
                start = q_at + 2 * qi - off
                toks = {start + 1, start + 2}
                local = any(t - s <= sga.window for s in toks)
                glob = set(sched[b, t // sga.window].tolist())
                seen += local or bool(toks & glob)
                total += 1
        out[i] = seen / total
    return out


class Diagnostics(L.Callback):
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # noqa: D102
        step = trainer.global_step
        if step % a.every and step != a.steps:
            return
        accs = {level: runner.evaluate(module, examples[level]).accuracy for level in levels}
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        cells = " ".join(f"{level_key[0].upper()}{level}={acc:.3f}" for level, acc in accs.items())
        print(f"step {step} t={time.perf_counter() - self.start:.0f}s train_loss={loss:.3f} {cells}", flush=True)
        # Gates per block on held-out inputs of the first level.
        ids, _ = runner.stack(examples[levels[-1]][:64])
        rows = []
        with torch.inference_mode():
            h = module.embed(ids)
            for i, block in enumerate(module.tri_path_blocks):
                gates = ""
                if block.router is not None:
                    g = block.router.route(block.norm(h)).gates.mean((0, 1))
                    gates = " ".join(f"{n}={g[j]:.2f}" for n, j in block.gate_index.items())
                ls = " ".join(f"{n}={float(v):.2f}" for n, v in block.layerscale.items())
                rows.append(f"  b{i} gates[{gates}] ls[{ls}]")
                h = block(h).hidden
        if a.task == "e4" and a.model == "hydra" and "sga" not in a.drop:
            vis = premise_visibility(module, examples[levels[-1]][:64])
            rows.append("  premise visible to question (D=%d): " % levels[-1] + " ".join(f"b{i}={v:.2f}" for i, v in vis.items()))
        print("\n".join(rows), flush=True)
        module.train()
        if a.stop is not None and step >= a.stop:
            trainer.should_stop = True


L.seed_everything(a.seed, verbose=False)
model = HydraLM(**dict(config, lr=lr, warmup_steps=50))
for item in a.lr_scale:
    name, _, scale = item.partition("=")
    for block in model.tri_path_blocks:
        if name in block.mixers:
            for param in block.mixers[name].parameters():
                param._hydra_lr_scale = float(scale)
if a.ls_lr is not None:
    for block in model.tri_path_blocks:
        for param in block.layerscale.values():
            param._hydra_lr_scale = a.ls_lr
data = SyntheticDataModule(task, batch_size=32, train_size=a.steps * 32, val_size=32, seed=a.seed)
callbacks: list[L.Callback] = [Diagnostics()]
if a.task == "e4":
    easy = int(0.4 * a.steps) if a.easy_steps is None else a.easy_steps
    if easy:
        callbacks.append(Curriculum([{"name": "easy", "at_step": 0, "data": dict(EASY_TASK)}, {"name": "full", "at_step": easy, "data": task.params()}]))
print(f"{a.task} {a.model} drop={a.drop} set={a.set} lr={lr} seed={a.seed} params={sum(p.numel() for p in model.parameters()):,}", flush=True)
trainer = L.Trainer(
    accelerator="cpu", devices=1, max_steps=a.steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
    gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    callbacks=callbacks,
)
trainer.fit(model, datamodule=data)
