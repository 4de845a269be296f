#!/usr/bin/env bash
# Install hydra-kit's GPU accelerators on a CUDA machine: triton (our PKM kernel) and mamba-ssm (the SSM's fused
# SSD scan). Neither is ever needed on CPU, where hydra-kit runs pure PyTorch.
#
#   scripts/install-gpu.sh                  # into .venv (created with a CUDA torch if missing)
#   VENV=/path/to/venv scripts/install-gpu.sh
#   MAMBA_FORCE_BUILD=TRUE scripts/install-gpu.sh   # compile mamba-ssm locally (needs nvcc) instead of using
#                                                   # its prebuilt wheel for this torch/CUDA/Python
#
# mamba-ssm cannot be a pip extra: it is a source distribution whose setup.py imports torch, so it must be built
# against the torch already installed (--no-build-isolation; otherwise pip builds it against a fresh torch in an
# isolated environment), with its build requirements installed beforehand. Its package __init__ imports its
# CUDA extension, so the extension is not skipped here (MAMBA_SKIP_CUDA_BUILD would leave `import mamba_ssm`
# broken); setup.py first tries the matching prebuilt wheel and compiles only when none matches.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
MAMBA_SSM_VERSION="${MAMBA_SSM_VERSION:-2.3.2.post1}"

die() { echo "install-gpu.sh: $*" >&2; exit 1; }

# Refuse before downloading anything on a machine without an NVIDIA GPU: the CUDA torch alone is ~3 GB.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  die "no NVIDIA GPU found (nvidia-smi missing or failing). On CPU machines install nothing extra: 'make setup' is all."
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

# hydra-kit with the kernels extra. No constraints/cpu.txt here: pip takes the CUDA build of torch from PyPI,
# and that build brings the triton release it was built with.
"${PIP[@]}" -e '.[dev,kernels]'

"$PY" - <<'EOF' || die "torch sees no CUDA device (see the message above); fix the driver / torch build first"
import sys
import torch
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) reports no usable CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

# Build requirements of mamba-ssm's setup.py, needed up front because of --no-build-isolation.
"${PIP[@]}" packaging ninja wheel "setuptools>=68"
"${PIP[@]}" --no-build-isolation "mamba-ssm==${MAMBA_SSM_VERSION}"

# Both accelerators must now report themselves available; say why not otherwise.
"$PY" - <<'EOF'
import sys
from hydra_kit.ops.mamba_ssd import unavailable_reason
from hydra_kit.ops.pkm_topk import triton_unavailable_reason
problems = {
    "triton (PKM kernel)": triton_unavailable_reason(),
    "mamba-ssm (SSD scan)": unavailable_reason(),
}
for name, reason in problems.items():
    print(f"{name}: {'ready' if reason is None else reason}")
sys.exit(1 if any(problems.values()) else 0)
EOF
echo "GPU accelerators installed. Check them with: $VENV/bin/pytest -q tests/kernels"
