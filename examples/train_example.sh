#!/usr/bin/env bash
# Reproduce examples/model: the example Nemotron-H-format hybrid (6.7M parameters: 5 Mamba-2, 2 attention
# and 5 MLP blocks, hidden 256, 4 Mamba groups, GQA 8/2) trained from scratch on Shakespeare's plays with
# the example BPE tokenizer. About 30 minutes on 2 CPU cores. Run from a set-up checkout (examples/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
[ -f examples/data/train.txt ] || python examples/prepare_data.py
run=runs/example
compress init "$run/init" --config examples/example_config.json --tokenizer examples/data --seed 0 --overwrite
compress train "$run/init" --data examples/data/train.txt --out "$run/train" --overwrite \
  --seq-len 256 --batch-size 32 --micro-batch-size 8 --steps 720 --lr 1.5e-3 --min-lr 1.5e-4 \
  --warmup-steps 30 --valid-fraction 0.02 --eval-every 60 --save-every 60 --seed 0
# ship the weights in bf16 (half the size), with the tokenizer
python - "$run/train/model" examples/model <<'PY'
import sys
from compressor import load_model, save_model
save_model(load_model(sys.argv[1], dtype="bfloat16"), sys.argv[2], tokenizer_from=sys.argv[1], overwrite=True)
PY
compress eval examples/model --data examples/data/valid.txt --seq-len 256
