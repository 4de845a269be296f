"""Calibration: train a recipe's model on MQAR with a plain loop; print held-out accuracy over steps."""
import argparse, math, time, sys, json, copy
import numpy as np, torch, yaml
import torch.nn.functional as F
from hydra_kit.model import HydraLM
from hydra_kit.data import MQAR, IGNORE_INDEX

p = argparse.ArgumentParser()
p.add_argument("recipe"); p.add_argument("--steps", type=int, default=600); p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--bs", type=int, default=32); p.add_argument("--warmup", type=int, default=50); p.add_argument("--wd", type=float, default=0.1)
p.add_argument("--eval_every", type=int, default=100); p.add_argument("--seed", type=int, default=0); p.add_argument("--set", action="append", default=[])
p.add_argument("--pairs", type=int, default=8); p.add_argument("--threads", type=int, default=1); p.add_argument("--device", default="cpu")
p.add_argument("--min_lr", type=float, default=0.1)
a = p.parse_args()
torch.set_num_threads(a.threads)
cfg = yaml.safe_load(open(a.recipe))["model"]
for s in a.set:  # dotted.key=json
    k, v = s.split("=", 1); d = cfg; ks = k.split(".")
    for kk in ks[:-1]: d = d.setdefault(kk, {})
    d[ks[-1]] = json.loads(v)
cfg.update(lr=a.lr, weight_decay=a.wd)
torch.manual_seed(a.seed)
model = HydraLM(**cfg).to(a.device)
task = MQAR(num_pairs=a.pairs, num_queries=a.pairs, num_keys=32, num_values=32)
val = [task.sample(1000000007, "val", i) for i in range(512)]
vids = torch.from_numpy(np.stack([e.input_ids for e in val])).to(a.device); vt = torch.from_numpy(np.stack([e.targets for e in val])).to(a.device)
opt_cfg = model.configure_optimizers(); opt = opt_cfg["optimizer"]
# LambdaLR (created by configure_optimizers) already stored each group's initial_lr
def lr_at(step):
    if step < a.warmup: return (step + 1) / a.warmup
    prog = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup)); return a.min_lr + (1 - a.min_lr) * 0.5 * (1 + math.cos(math.pi * prog))
t0 = time.time(); i = 0
def evaluate():
    model.eval()
    with torch.no_grad():
        out = model(vids); m = vt != IGNORE_INDEX
        acc = (out.logits.argmax(-1)[m] == vt[m]).float().mean().item()
        loss = F.cross_entropy(out.logits.flatten(0,1), vt.flatten(), ignore_index=IGNORE_INDEX).item()
        stats = {k: round(float(v), 3) for k, v in out.stats.items() if "gate" in k}
    model.train(); return acc, loss, stats
for step in range(a.steps):
    ex = [task.sample(a.seed, "train", step * a.bs + j) for j in range(a.bs)]
    ids = torch.from_numpy(np.stack([e.input_ids for e in ex])).to(a.device); tg = torch.from_numpy(np.stack([e.targets for e in ex])).to(a.device)
    for g in opt.param_groups: g["lr"] = g["initial_lr"] * lr_at(step)
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0,1), tg.flatten(), ignore_index=IGNORE_INDEX)
    total = loss + sum(out.aux_losses.values(), torch.zeros((), device=loss.device))
    opt.zero_grad(); total.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
        acc, vl, stats = evaluate()
        print(f"step {step+1} t={time.time()-t0:.0f}s train_loss={loss.item():.3f} val_loss={vl:.3f} val_acc={acc:.3f} {stats if step+1==a.steps else ''}", flush=True)
