#!/usr/bin/env bash
# The first check of hydra-kit's GPU paths on a CUDA machine, written into one report folder.
#
#   scripts/gpu-check.sh                          # installs the GPU extras into .venv-gpu, then checks
#   SKIP_INSTALL=1 PY=/path/to/python scripts/gpu-check.sh   # an environment that already has CUDA torch,
#                                                            # hydra-kit (editable) and the GPU extras
#   REPORT=docs/gpu-check/h100 scripts/gpu-check.sh          # where the report goes
#
# Steps, each with its own time limit (60 + 2 x 120 + 10 + 170 s: together at most 8 minutes after the
# install; the first fit also compiles the Triton kernels, hence its margin):
#   1. pytest -m gpu tests/kernels: the Triton PKM kernel and the mamba-ssm SSD scan against their references;
#   2. hydra-kit fit --config full-29m for 50 steps in bf16-mixed and in fp32 (same seed, same data), then a
#      Python check that both losses fall and that they agree over the first steps;
#   3. hydra-kit bench --accelerator gpu at 8K and 16K (inference, training step, decoding).
# The report folder holds one log per step, the training metrics, the bench output and summary.md. The script
# goes on after a failed step, so the report covers every step, and exits non-zero if any failed. Without an
# NVIDIA GPU it stops at once and installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu-check.sh: $*" >&2; exit 1; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
  die "nvidia-smi not found: this script checks the GPU paths and needs a CUDA machine. On CPU, 'make test' is the check."
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
  die "nvidia-smi fails (no NVIDIA GPU or no driver): $(nvidia-smi -L 2>&1 | head -1)"
fi

STAMP="$(date -u +%Y%m%d-%H%M%S)"
REPORT="${REPORT:-docs/gpu-check/$STAMP}"
VENV="${VENV:-.venv-gpu}"
PY="${PY:-$VENV/bin/python}"
STEPS="${STEPS:-50}"               # training steps per precision
AGREE_STEPS="${AGREE_STEPS:-10}"   # the first steps over which bf16-mixed and fp32 losses must agree
AGREE_RTOL="${AGREE_RTOL:-0.03}"   # ... to this relative difference
SCRATCH="$(mktemp -d)"             # checkpoints of the training runs: large, not part of the report
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$REPORT"
REPORT="$(cd "$REPORT" && pwd)"
SUMMARY="$REPORT/summary.md"
FAILED=0

# One step: its name, its time limit in seconds, its log file, the command. Records the outcome in RESULTS.
RESULTS=()
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "== $name (limit ${limit}s) -> $log"
  local start=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" >"$REPORT/$log" 2>&1
  status=$?
  local took=$((SECONDS - start)) outcome="passed"
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    outcome="TIMED OUT after ${limit}s"
  elif [ "$status" -ne 0 ]; then
    outcome="FAILED (exit status $status)"
  fi
  [ "$outcome" = "passed" ] || FAILED=1
  echo "   $outcome in ${took}s"
  RESULTS+=("| $name | $outcome | ${took}s | \`$log\` |")
  return "$status"
}

# Mark the last step failed after the fact (its command succeeded, but what it printed shows a problem).
fail_last() {
  FAILED=1
  local last=$((${#RESULTS[@]} - 1))
  RESULTS[last]="${RESULTS[last]/| passed |/| FAILED ($1) |}"
  echo "   but FAILED: $1"
}

# ---------------------------------------------------------------- install
if [ "${SKIP_INSTALL:-0}" = "1" ]; then
  echo "== install skipped (SKIP_INSTALL=1); using $PY"
  INSTALL="skipped (SKIP_INSTALL=1), environment of \`$PY\`"
else
  step "install (scripts/install-gpu.sh)" 1800 install.log env VENV="$VENV" scripts/install-gpu.sh \
    || die "the GPU extras did not install; see $REPORT/install.log"
  INSTALL="scripts/install-gpu.sh into \`$VENV\`"
fi
[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || die "no python at $PY (set PY or VENV)"
"$PY" - >"$REPORT/environment.txt" 2>&1 <<'EOF' || die "torch sees no CUDA device: $(tail -1 "$REPORT/environment.txt")"
import sys
import torch
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) reports no usable CUDA device")
from hydra_kit.ops.mamba_ssd import unavailable_reason
from hydra_kit.ops.pkm_topk import triton_unavailable_reason
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
print(f"device: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
print(f"mamba-ssm (SSD scan): {unavailable_reason() or 'ready'}")
print(f"triton (PKM kernel): {triton_unavailable_reason() or 'ready'}")
EOF
nvidia-smi >>"$REPORT/environment.txt" 2>&1
HYDRA=("$PY" -c "import sys; from hydra_kit.cli import main; sys.exit(main(sys.argv[1:]))")

# ------------------------------------------------- 1. GPU kernel tests
step "pytest -m gpu tests/kernels" 60 kernels.log "$PY" -m pytest -q -m gpu tests/kernels -rs
# On a GPU machine a skipped GPU test means a kernel's package or device is missing: that is what is checked.
if grep -qE "[0-9]+ skipped" "$REPORT/kernels.log"; then fail_last "GPU tests skipped"; fi

# ------------------------------------- 2. training, bf16-mixed and fp32
for precision in bf16-mixed 32-true; do
  step "fit full-29m, $STEPS steps, precision $precision" 120 "fit-$precision.log" "${HYDRA[@]}" fit --config full-29m \
    --trainer.accelerator gpu --trainer.precision "$precision" --trainer.max_steps "$STEPS" \
    --trainer.log_every_n_steps 1 --trainer.val_check_interval "$STEPS" --trainer.default_root_dir "$SCRATCH" \
    --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$SCRATCH" \
    --trainer.logger.name "$precision" --trainer.logger.version 0
  if [ -f "$SCRATCH/$precision/version_0/metrics.csv" ]; then
    cp "$SCRATCH/$precision/version_0/metrics.csv" "$REPORT/metrics-$precision.csv"
  fi
done
step "losses fall and bf16-mixed agrees with fp32" 10 loss-check.log "$PY" - "$REPORT" "$STEPS" "$AGREE_STEPS" "$AGREE_RTOL" <<'EOF'
"""Both training runs' losses fall, and over the first steps bf16-mixed stays within a relative tolerance of fp32."""
import csv
import math
import sys
from pathlib import Path

report, steps, agree_steps, rtol = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


def losses(precision: str) -> dict[int, float]:
    path = report / f"metrics-{precision}.csv"
    if not path.exists():
        sys.exit(f"{path.name} missing: the {precision} run wrote no metrics (see fit-{precision}.log)")
    with path.open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


bf16, fp32 = losses("bf16-mixed"), losses("32-true")
problems = []
for name, run in (("bf16-mixed", bf16), ("fp32", fp32)):
    values = [run[s] for s in sorted(run)]
    if len(values) < steps // 2:
        problems.append(f"{name}: only {len(values)} logged losses for {steps} steps")
        continue
    if not all(math.isfinite(v) for v in values):
        problems.append(f"{name}: non-finite loss")
        continue
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    print(f"{name}: mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f}")
    if not last < 0.95 * first:
        problems.append(f"{name}: the loss did not fall ({first:.4f} -> {last:.4f})")
print(f"step | fp32 | bf16-mixed | relative difference (bound {rtol})")
for s in sorted(set(bf16) & set(fp32))[:agree_steps]:
    diff = abs(bf16[s] - fp32[s]) / abs(fp32[s])
    print(f"{s} | {fp32[s]:.4f} | {bf16[s]:.4f} | {diff:.4f}")
    if not diff <= rtol:
        problems.append(f"step {s}: bf16-mixed {bf16[s]:.4f} vs fp32 {fp32[s]:.4f} (relative difference {diff:.4f} > {rtol})")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF

# ------------------------------------------------------ 3. bench on the GPU
step "bench --accelerator gpu at 8K and 16K" 170 bench.log env COLUMNS=200 "${HYDRA[@]}" bench --accelerator gpu \
  --seq_lens 8192 16384 --modes infer train decode --repeats 3 --out "$REPORT/bench" ${BENCH_ARGS:-}

# ----------------------------------------------------------------- report
{
  echo "# GPU check, $STAMP"
  echo
  echo "\`scripts/gpu-check.sh\` at commit \`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'). Install: $INSTALL."
  echo
  echo '```'
  head -4 "$REPORT/environment.txt"
  echo '```'
  echo
  echo "| step | outcome | took | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${RESULTS[@]}"
  echo
  echo "## Kernel tests"
  echo
  echo '```'
  tail -15 "$REPORT/kernels.log"
  echo '```'
  echo
  echo "## Training: bf16-mixed against fp32"
  echo
  echo '```'
  cat "$REPORT/loss-check.log"
  echo '```'
  echo
  echo "## Bench (\`bench/\` holds bench.json, bench.csv, the plots)"
  echo
  echo '```'
  grep -v '^\s*$' "$REPORT/bench.log" | tail -60
  echo '```'
} >"$SUMMARY"
echo "report: $REPORT (summary.md)"
exit "$FAILED"
