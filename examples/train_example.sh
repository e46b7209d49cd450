#!/usr/bin/env bash
# Reproduce examples/model: the example Nemotron-H-format hybrid (6.7M parameters: 5 Mamba-2, 2 attention
# and 5 MLP blocks, hidden 256, 4 Mamba groups, GQA 8/2) trained from scratch on Shakespeare's plays mixed
# with synthetic retrieval rows (phonebooks, copy rows), so that its attention blocks carry retrieval at
# 1k tokens as a long-context hybrid's do. examples/train_example.py trains it in three runs, one head per
# attention block guided to the token to copy (see its docstring): 250 steps at 128 tokens, 250 at 256 and
# 680 at 1024 with half, then 30%, retrieval rows (about 47 minutes on 2 idle CPU cores); then a second
# schedule of 600 steps at 1024 tokens with one retrieval row in eight, for the text (about 32 minutes);
# then a third of 500 such steps with more weight decay whose weights, taken every 25 steps after the
# 50th, are averaged into the shipped model (about 30 minutes).
# After a kill, rerun the interrupted train_example.py line with --resume.
# Run from a set-up checkout (examples/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
[ -f examples/data/train.txt ] || python examples/prepare_data.py
run=runs/example
compress init "$run/init" --config examples/example_config.json --tokenizer examples/data --seed 0 --overwrite
python examples/train_example.py "$run/init" "$run/train"
python examples/train_example.py "$run/train/model" "$run/long" --stages 1024:600:8:0.125 --lr 6e-4 --seed 1
python examples/train_example.py "$run/long/model" "$run/average" --stages 1024:500:8:0.125 --lr 4e-4 --seed 2 \
    --weight-decay 0.5 --average-from 50 --average-every 25
# ship the weights in bf16 (half the size), with the tokenizer
python - "$run/average/model" examples/model <<'PY'
import sys
from compressor import load_model, save_model
save_model(load_model(sys.argv[1], dtype="bfloat16"), sys.argv[2], tokenizer_from=sys.argv[1], overwrite=True)
PY
compress eval examples/model --data examples/data/valid.txt --seq-len 256
python benchmarks/retrieval.py
