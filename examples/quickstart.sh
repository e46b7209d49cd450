#!/usr/bin/env bash
# Quick start: set up, then run the engine end to end on the example corpus (Shakespeare, examples/data):
# build a model with the example tokenizer, describe it, evaluate it on the held-out plays, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=runs/quickstart
compress init "$out/model" --preset small --tokenizer examples/data --overwrite
compress info "$out/model"
compress eval "$out/model" --data examples/data/valid.txt --seq-len 256 --max-sequences 64
compress generate "$out/model" --prompt "ROMEO. " --max-new-tokens 24 --temperature 0.8 --seed 0
