#!/usr/bin/env bash
# Reproduce examples/model: the example Nemotron-H-format hybrid (6.7M parameters: 5 Mamba-2, 2 attention
# and 5 MLP blocks, hidden 256, 4 Mamba groups, GQA 8/2) trained from scratch on Shakespeare's plays mixed
# with synthetic retrieval rows (phonebooks, copy rows), so that its attention blocks carry retrieval at
# 1k tokens as a long-context hybrid's do. examples/train_example.py trains it: 250 steps at 128 tokens,
# 250 at 256, 680 at 1024, one head per attention block guided to the token to copy (see its docstring).
# About 50 minutes on 2 CPU cores; after a kill, rerun the train_example.py line with --resume.
# Run from a set-up checkout (examples/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
[ -f examples/data/train.txt ] || python examples/prepare_data.py
run=runs/example
compress init "$run/init" --config examples/example_config.json --tokenizer examples/data --seed 0 --overwrite
python examples/train_example.py "$run/init" "$run/train"
# ship the weights in bf16 (half the size), with the tokenizer
python - "$run/train/model" examples/model <<'PY'
import sys
from compressor import load_model, save_model
save_model(load_model(sys.argv[1], dtype="bfloat16"), sys.argv[2], tokenizer_from=sys.argv[1], overwrite=True)
PY
compress eval examples/model --data examples/data/valid.txt --seq-len 256
python benchmarks/retrieval.py
