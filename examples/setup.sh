#!/usr/bin/env bash
# Create (or update) a virtualenv with the CPU build of torch and compressor, at the versions CI last passed
# with (constraints.txt).
#   --dev      adds the test tools (pytest, hypothesis, ruff, transformers as the reference implementation),
#              nvidia-modelopt (quantization) and lm-eval
#   --latest   the newest release of every dependency instead of constraints.txt (torch stays TORCH_SPEC);
#              `bash .ci/run --latest` runs the suite on them and writes constraints.latest.txt
#   VENV=.venv by default. TORCH_SPEC="torch==2.13.0" by default: the CPU build here. On a GPU machine
#   install the CUDA build of torch first (and `pip install -e ".[cuda]"` for the mamba-ssm fast path).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="" latest=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev,modelopt,eval]" ;;
    --latest) latest=1 ;;
    *) echo "usage: bash examples/setup.sh [--dev] [--latest] (got '$arg')" >&2; exit 2 ;;
  esac
done
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
if [ -n "$latest" ]; then
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  # every dependency at its newest release, torch held where TORCH_SPEC put it (a newer one is a CUDA build)
  held="$venv/torch-held.txt"
  "$venv/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" > "$held"
  "${pip[@]}" --upgrade --upgrade-strategy eager --constraint "$held" -e ".${extras}"
else
  "${pip[@]}" --constraint constraints.txt --upgrade pip
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  "${pip[@]}" --constraint constraints.txt -e ".${extras}"
fi
# nvidia-modelopt imports torchprofile, whose metadata pulls torchvision (not needed): install it alone
if [ -n "$extras" ]; then "${pip[@]}" --no-deps "torchprofile==0.0.4"; fi
