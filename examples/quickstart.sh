#!/usr/bin/env bash
# Quick start: set up, then compress the example model (a 6.7M-parameter Nemotron-H-format hybrid trained
# on Shakespeare, examples/model) end to end on CPU in a few minutes:
#   1. prune it to fit a memory budget (Minitron: importance on calibration text, a grid search under the
#      budget, the best of the largest fitting candidates by KL to the original),
#   2. distill the original into the pruned model for a short while,
#   3. compare original, pruned and distilled on held-out plays, and on phonebook retrieval at 1k tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=runs/quickstart
data=examples/data
compress info examples/model
compress prune examples/model --out "$out/pruned" --overwrite \
  --target-mem 20MiB --ctx 4k --axes hidden,ffn,mamba_heads,mamba_head_dim,depth \
  --data "$data/sample.txt" --samples 64 --score-samples 32 --seq-len 256 --batch-size 8
compress distill examples/model "$out/pruned" --data "$data/sample.txt" --out "$out/distilled" --overwrite \
  --tokens 400k --seq-len 256 --batch-size 16 --micro-batch-size 8 --lr 1e-3 --min-lr 1e-4 \
  --eval-every 20 --save-every 50 --eval-sequences 32
compress eval examples/model "$out/pruned" "$out/distilled/model" --teacher examples/model \
  --data "$data/valid.txt" --seq-len 256 --max-sequences 128
compress eval examples/model "$out/pruned" "$out/distilled/model" --task phonebook --ctx 1k --task-sequences 4
