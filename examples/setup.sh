#!/usr/bin/env bash
# Create (or update) .venv with the CPU build of torch and compressor; `--dev` adds the test tools
# (pytest, hypothesis, ruff, transformers as the reference implementation) nvidia-modelopt (quantization) and lm-eval.
#   TORCH_SPEC="torch==2.13.0" by default: the CPU build here. On a GPU machine install the CUDA build
#   of torch first (and `pip install -e ".[cuda]"` for the mamba-ssm fast path).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,modelopt,eval]"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".${extras}"
# nvidia-modelopt imports torchprofile, whose metadata pulls torchvision (not needed): install it alone
if [ -n "$extras" ]; then .venv/bin/python -m pip install --quiet --no-deps "torchprofile==0.0.4"; fi
