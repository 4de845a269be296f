"""Calibration for E4 (and E1): train one of the experiment's models on its task and print held-out accuracy over steps.

The task, the model configs and the training (Lightning, warm-up then cosine over --steps, clipping 1.0,
float32) are those of `hydra-kit experiment distant-premise` (or, with --task logic-chains, `logic-chains`) at
its CPU size; the only addition is a callback that scores --eval held-out examples per level every --every
steps, so one run shows when (if) a model leaves chance.
Usage: python calib.py transformer --steps 4000 --lr 1e-3 [--questions 8] [--task logic-chains|mqar] [--easy-steps 300 [300]]
"""
import argparse
import time

import lightning as L
import torch

from hydra_kit.data import MQAR, DistantPremise, LogicChains, SyntheticDataModule
from hydra_kit.experiments import models, runner
from hydra_kit.model import HydraLM

p = argparse.ArgumentParser()
p.add_argument("model", choices=["hydra", "transformer"])
p.add_argument("--task", choices=["distant-premise", "logic-chains", "mqar"], default="distant-premise")
p.add_argument("--steps", type=int, default=4000)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--every", type=int, default=250)
p.add_argument("--eval", type=int, default=200, help="held-out examples per distance at each check")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--distractors", type=int, default=None, help="distractor premises (default: every value stated once, 15)")
p.add_argument("--questions", type=int, default=1, help="questions per example, each about a different premise (E1: queries per training example)")
p.add_argument("--region-len", type=int, default=None, help="E4 premise region length (default: 4 tokens per premise)")
p.add_argument(
    "--easy-steps", type=int, nargs="*", default=[],
    help="curriculum: steps on the easy task (E4: D 4, 4 premises back to back, 4 questions; E1: one hop, two 2-node chains, no branch), "
    "then on a middle one if a second number is given (E4: 16 premises, D 4; E1: up to 2 hops, four 4-node chains, 4 branches), then the full task "
    "(E1 and E4 train on their first and, for E1, both warm-up tasks)",
)
p.add_argument("--blocks", type=int, default=None, help="model depth instead of the CPU size's 4 (the E1 depth probe)")
p.add_argument("--hidden-mult", type=float, default=None, help="the transformer's MLP width / d_model (default: matched to Hydra's params at 4 blocks; ignored for hydra)")
p.add_argument("--two-hop-only", action="store_true", help="E1: the middle warm-up task asks 2 hops in every query (min_hops 2); its default since EASY_TASKS[1] became two-hop-only")
p.add_argument(
    "--middle", nargs="*", default=[], metavar="KEY=INT",
    help="E1: override the middle warm-up task's LogicChains arguments, e.g. num_chains=2 chain_len=4 num_distractors=2 (a smaller two-hop task)",
)
p.add_argument("--distances", type=int, nargs="+", default=[16, 32, 64], help="E4 levels D (trained on all, scored at each)")
p.add_argument("--save-at", type=int, default=None, metavar="STEP", help="write a full Lightning checkpoint (model, optimizer, schedule, curriculum, data position) to --ckpt after STEP")
p.add_argument("--ckpt", default="calib.ckpt", help="checkpoint path for --save-at")
p.add_argument("--resume", default=None, metavar="PATH", help="continue from a --save-at checkpoint (same flags otherwise), e.g. to try a change at the last stage switch")
p.add_argument("--switch-warmup", type=int, default=0, metavar="N", help="E1 stage-switch probe: ramp the learning rate linearly from 0 over the N steps after the last stage is reached")
p.add_argument("--switch-reset", action="store_true", help="E1 stage-switch probe: clear the AdamW moments when the last stage is reached")
p.add_argument("--rehearse", type=int, default=0, metavar="K", help="E1 stage-switch probe: after the last stage is reached, every K-th batch is drawn from the middle warm-up task")
p.add_argument("--switch-lr-scale", type=float, default=None, help="E1 stage-switch probe: the last stage's lr_scale (Curriculum)")
a = p.parse_args()
torch.set_num_threads(1)

if a.task == "distant-premise":
    distances, values = a.distances, 16  # the experiment's CPU defaults: 16/32/64, every value stated once
    distractors = values - 1 if a.distractors is None else a.distractors
    task = DistantPremise(distance=distances, num_distractors=distractors, num_keys=max(32, distractors + 1), num_values=values, num_questions=a.questions, region_len=a.region_len)
    levels, chance, level_key, shape = distances, 1 / values, "distance", f"{distractors} distractors, {a.questions} questions"
    examples = runner.eval_set(task, level_key, levels, a.eval)
elif a.task == "mqar":  # the comparison: MQAR with as many pairs as E4 has premises (--distractors + 1), every key asked
    pairs = 16 if a.distractors is None else a.distractors + 1
    task = MQAR(num_pairs=pairs, num_queries=pairs, num_keys=32, num_values=32)
    levels, chance, level_key, shape = [pairs], 1 / 32, "pairs", f"{pairs} pairs, every key asked"
    examples = runner.eval_set(task, level_key, levels, a.eval)
else:  # E1 at its CPU size: 32 nodes, 8 branches; trained on 1..4 hops (every HOP supervised), scored at 1..4 and 6, 8
    distractors = 8 if a.distractors is None else a.distractors
    test_task = LogicChains(num_nodes=32, min_hops=1, max_hops=8, num_distractors=distractors)
    task = LogicChains(num_nodes=32, min_hops=1, max_hops=4, num_distractors=distractors, supervise_every_hop=True, num_queries=a.questions,
                       seq_len=test_task.seq_len if a.questions == 1 else None)
    levels, chance, level_key, shape = [1, 2, 3, 4, 6, 8], 1 / 32, "hops", f"{distractors} branches, every HOP supervised, {a.questions} queries per training example"
    examples = runner.eval_set(test_task, level_key, levels, a.eval)
hydra = models.hydra_config("cpu", task.vocab_size)
config = hydra if a.model == "hydra" else models.dense_transformer(hydra)[0]
if a.blocks:
    config["n_blocks"] = a.blocks
if a.hidden_mult and a.model == "transformer":
    config["components"]["mlp"]["args"]["hidden_mult"] = a.hidden_mult


class HeldOut(L.Callback):
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # noqa: D102
        step = trainer.global_step
        if step % a.every and step != a.steps:
            return
        accs = {level: runner.evaluate(module, examples[level]).accuracy for level in levels}
        module.train()
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        cells = " ".join(f"{level_key[0].upper()}{level}={acc:.3f}" for level, acc in accs.items())
        print(f"step {step} t={time.perf_counter() - self.start:.0f}s train_loss={loss:.3f} {cells}", flush=True)


class SwitchProbe(L.Callback):
    """Changes to the optimisation at the step the last curriculum stage is reached (--switch-warmup, --switch-reset)."""

    def __init__(self, switch_step: int) -> None:
        self.switch_step = switch_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step
        if step == self.switch_step and a.switch_reset:
            trainer.optimizers[0].state.clear()
        if a.switch_warmup and self.switch_step <= step < self.switch_step + a.switch_warmup:
            ramp = (step - self.switch_step + 1) / a.switch_warmup
            for group in trainer.optimizers[0].param_groups:  # the scheduler set lr afresh after the last step
                group["lr"] *= ramp

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if a.save_at is not None and trainer.global_step == a.save_at:
            trainer.save_checkpoint(a.ckpt)
            print(f"checkpoint at step {a.save_at}: {a.ckpt}", flush=True)


L.seed_everything(a.seed, verbose=False)
model = HydraLM(**dict(config, lr=a.lr, warmup_steps=50))
data = SyntheticDataModule(task, batch_size=a.batch_size, train_size=a.steps * a.batch_size, val_size=a.batch_size, seed=a.seed)
print(f"{a.task} calibration: {a.model}, {config['n_blocks']} blocks, {sum(p.numel() for p in model.parameters()):,} params, lr {a.lr}, batch {a.batch_size}, {a.steps} steps; {shape}, task length {task.seq_len}, chance {chance:.4f}", flush=True)
callbacks: list[L.Callback] = [HeldOut()]
if a.easy_steps:
    from hydra_kit.callbacks import Curriculum

    if a.task == "distant-premise":  # the experiment's warm-up task, then (second number) 16 premises at D 4
        easy = {"distance": 4, "num_distractors": 3, "num_questions": 4, "region_len": 12}
        middle = {"distance": 4, "num_distractors": None, "num_questions": a.questions, "region_len": None}
    else:  # the experiment's two warm-up tasks (hydra_kit/experiments/logic_chains.py)
        from hydra_kit.experiments.logic_chains import EASY_TASKS

        easy, middle = EASY_TASKS
        if a.two_hop_only:
            middle = {**middle, "min_hops": 2}
        for item in a.middle:
            key, _, value = item.partition("=")
            middle = {**middle, key: int(value)}
    stages = [{"name": "easy", "at_step": 0, "data": easy}]
    if len(a.easy_steps) > 1:
        stages.append({"name": "middle", "at_step": a.easy_steps[0], "data": middle})
    stages.append({"name": "full", "at_step": sum(a.easy_steps), "data": task.params()})
    if a.rehearse:  # batches are read in order, so example n is in batch n // batch_size
        from hydra_kit.data.synthetic import TaskSchedule

        rehearsed = task.with_params({**easy, **middle})
        first = sum(a.easy_steps) * a.batch_size
        task_for = TaskSchedule.task_for

        def task_with_rehearsal(self, number):
            if number >= first and (number // a.batch_size) % a.rehearse == 0:
                return rehearsed
            return task_for(self, number)

        TaskSchedule.task_for = task_with_rehearsal
    if a.switch_lr_scale is not None:
        stages[-1]["lr_scale"] = a.switch_lr_scale
    callbacks.append(Curriculum(stages))
callbacks.append(SwitchProbe(sum(a.easy_steps) if a.easy_steps else 0))
trainer = L.Trainer(
    accelerator="cpu", devices=1, max_steps=a.steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
    gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    callbacks=callbacks,
)
trainer.fit(model, datamodule=data, ckpt_path=a.resume)
