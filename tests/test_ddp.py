"""DDP on 2 CPU processes (gloo) follows the same loss curve as 1 process with the same global batch, and a DDP
run stopped half way and resumed from its checkpoint follows the uninterrupted DDP run.

Why the curves can agree: the synthetic data module shards the training stream in order (rank r of W reads
examples r, r + W, ...; see ``SyntheticDataModule.train_dataloader``), so in every step the two ranks together
read exactly the batch the single process reads; both runs start from the same seed (DDP also broadcasts rank
0's weights); DDP averages the gradients of the per-rank mean losses, which is the gradient of the global mean
because every MQAR example has the same number of answer tokens; and the logged ``train/loss`` is the mean over
the ranks (``sync_dist``).

What may still differ, and the tolerance: float32 sums taken in another order (the gradient all-reduce, the
per-rank loss means), about 1e-6 on a loss of 4; and the router's usage-budget loss (HYDRA.md R4), a square
of the mean gate that each rank computes over its own half of the batch, so its gradient differs from the
one-process gradient by lambda * (rank mean - global mean), with lambda = 0.01 and gate means within 1e-3 of
each other. A mixture-of-experts load-balance loss would differ the same way (not in this recipe). Measured on
the development machine: at most 4.8e-7 over the 8 steps. The tolerance, 1e-4 absolute, is 200 times that,
while the loss itself moves by at least 9e-3 from one step to the next (the test requires more than 10 times
the tolerance), so it cannot hide a real divergence: a data-sharding error (Lightning's default shuffling
sampler) already moved the first loss by 2.4e-2.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import yaml
from support import REPO, run_cli

STEPS = 8
PER_DEVICE_BATCH = 8
TOLERANCE = 1e-4


def _recipe(tmp_path: Path, name: str, batch_size: int, steps: int = STEPS) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["data"]["init_args"]["batch_size"] = batch_size
    recipe["trainer"].update(
        max_steps=steps, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        val_check_interval=None, limit_val_batches=0,
    )
    recipe["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


DDP_ARGS = ("--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2", "--trainer.accelerator", "cpu")


def _train_losses(tmp_path: Path, name: str) -> dict[int, float]:
    with open(tmp_path / "runs" / name / "version_0" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted 2-process DDP run of STEPS steps: (its folder, its stdout + stderr)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    # Also keep the checkpoint of step STEPS / 2: what a run killed half way leaves behind.
    mid_run = ("--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", str(STEPS // 2), "--checkpoint.save_top_k", "-1")
    ddp = run_cli("fit", "--config", str(_recipe(tmp_path, "ddp", PER_DEVICE_BATCH)), *DDP_ARGS, *mid_run, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return tmp_path, ddp.stdout + ddp.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, ddp_run):
    one = run_cli("fit", "--config", str(_recipe(tmp_path, "one", 2 * PER_DEVICE_BATCH)), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp_dir, ddp_output = ddp_run
    assert "distributed_backend=gloo" in ddp_output and "Starting with 2 processes" in ddp_output
    assert ddp_output.count("run directory:") == 1  # one end-of-fit report, from rank 0
    single, distributed = list(_train_losses(tmp_path, "one").values()), list(_train_losses(ddp_dir, "ddp").values())
    assert len(single) == len(distributed) == STEPS
    worst = max(abs(a - b) for a, b in zip(single, distributed, strict=True))
    assert worst <= TOLERANCE, f"DDP loss curve {distributed} differs from the 1-process curve {single} by {worst:.2e}"
    # The comparison means something only if the curve moves by far more than the tolerance between steps.
    assert min(abs(a - b) for a, b in itertools.pairwise(single)) > 10 * TOLERANCE, single


@pytest.mark.slow
def test_ddp_run_resumed_from_its_checkpoint_follows_the_uninterrupted_run(tmp_path, ddp_run):
    """Resume the uninterrupted run's step-STEPS/2 checkpoint in a new run: weights, optimizer, learning-rate
    schedule, RNG and each rank's position in its data shard must all come back for the second half to match."""
    half = STEPS // 2
    ddp_dir = ddp_run[0]
    checkpoint = ddp_dir / "runs" / "ddp" / "version_0" / "checkpoints" / f"best-step={half}.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in checkpoint.parent.iterdir())
    resumed = run_cli(
        "fit", "--config", str(_recipe(tmp_path, "resumed", PER_DEVICE_BATCH)), *DDP_ARGS, "--ckpt_path", str(checkpoint), cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _train_losses(ddp_dir, "ddp")
    second_half = _train_losses(tmp_path, "resumed")
    assert sorted(second_half) == list(range(half, STEPS)), second_half  # only the steps after the checkpoint ran
    worst = max(abs(second_half[s] - straight[s]) for s in second_half)
    assert worst <= TOLERANCE, f"resumed DDP losses {second_half} differ from the uninterrupted run {straight} by {worst:.2e}"


@pytest.mark.slow
def test_ddp_curriculum_changes_the_data_at_the_same_step_as_one_process(tmp_path, ddp_run):
    """A curriculum stage that lengthens the task mid-run: under DDP every rank switches at the same global batch
    (otherwise batches of different lengths would not stack, or the curves would part), as in one process."""
    stages = [{"name": "longer", "at_step": 3, "data": {"num_pairs": 6}}]
    curriculum = [{"class_path": "hydra_kit.callbacks.Curriculum", "init_args": {"stages": stages}}]

    def with_curriculum(path: Path) -> Path:
        recipe = yaml.safe_load(path.read_text())
        recipe["trainer"]["callbacks"] = curriculum
        path.write_text(yaml.safe_dump(recipe))
        return path

    one = run_cli("fit", "--config", str(with_curriculum(_recipe(tmp_path, "one", 2 * PER_DEVICE_BATCH))), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = run_cli("fit", "--config", str(with_curriculum(_recipe(tmp_path, "ddp", PER_DEVICE_BATCH))), *DDP_ARGS, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single, distributed = _train_losses(tmp_path, "one"), _train_losses(tmp_path, "ddp")
    assert sorted(single) == sorted(distributed) == list(range(STEPS))
    worst = max(abs(single[s] - distributed[s]) for s in single)
    assert worst <= TOLERANCE, f"DDP curriculum losses {distributed} differ from one process {single} by {worst:.2e}"
    # The stage did change the data: the same run without the curriculum agrees before the change, not after it.
    plain = _train_losses(ddp_run[0], "ddp")
    assert max(abs(plain[s] - distributed[s]) for s in range(3)) <= TOLERANCE
    assert abs(plain[STEPS - 1] - distributed[STEPS - 1]) > 10 * TOLERANCE, (plain, distributed)
