#!/usr/bin/env bash
# One unattended check of compressor on a machine with an NVIDIA GPU, from nothing installed to one summary
# table. Run from anywhere:
#
#   bash benchmarks/gpu_check.sh
#
# Parts, each under its own timeout (a part that fails or times out is reported and the next one runs):
#   setup     a venv (.venv-gpu), a CUDA build of torch unless one is importable, the repo with .[dev,cuda]
#             (mamba-ssm and causal-conv1d as prebuilt wheels where they match torch/CUDA/Python)
#   env       GPU, driver, versions, and which of the five Mamba ops run as kernels
#   parity    tests/test_kernels.py on CUDA: each kernel op against its torch twin, the whole model (heads not
#             divisible by 8, dt limits, continued prompts, decoding, gradients, generate) in fp32 and bf16
#   engine    benchmarks/engine.py --device cuda: tokens/s and peak memory, kernels vs the torch path
#   estimate  compress estimate --measure: measured decode latency against the roofline estimate
#   distill   a 2-step distillation under torchrun, one process per GPU (FSDP2 sharding needs 2 or more
#             GPUs: NCCL takes one process per GPU, so on one GPU the step runs unsharded)
# The checks after setup are budgeted to 8 minutes (their default timeouts sum to 480 s); setup's time
# depends on the network (about 3 GB of wheels) and is shown on its own row.
#
# Knobs (environment variables):
#   SKIP_SETUP=1        use PYTHON as it is (torch, mamba-ssm, causal-conv1d already installed)
#   PYTHON=python3      the interpreter that creates the venv (or runs everything with SKIP_SETUP=1)
#   VENV=.venv-gpu      where the venv goes (relative to the repository)
#   TORCH_SPEC, TORCH_INDEX   the torch to install when none with CUDA is importable
#                       (default torch==2.10.* from download.pytorch.org/whl/cu128: mamba-ssm 2.3.2 and
#                       causal-conv1d 1.6.1 publish wheels for torch 2.6-2.10, CUDA 12, Python 3.10-3.13)
#   MAMBA_SPEC, CONV_SPEC     the library versions (default mamba-ssm==2.3.2.post1, causal-conv1d==1.6.1)
#   WHEELHOUSE=DIR      install offline from wheels in DIR (pip --no-index --find-links DIR)
#   WORK=DIR            where logs and scratch files go (default a new /tmp/gpu_check.XXXXXX)
#   SETUP_TIMEOUT=900 ENV_TIMEOUT=30 PARITY_TIMEOUT=210 ENGINE_TIMEOUT=120 ESTIMATE_TIMEOUT=60
#   DISTILL_TIMEOUT=60  per-part limits in seconds
# shellcheck disable=SC2329  # the part_* functions are called by name: "part_$PART"
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1

# ----------------------------------------------------------------------------------------------- parts
# Each part runs as `bash gpu_check.sh --part NAME` under `timeout`, logs to $WORK/NAME.log and writes a
# one-line result to $WORK/NAME.result; a non-zero exit marks it failed.

result() { printf '%s\n' "$*" >"$WORK/$PART.result"; }

part_setup() {
    if [ -n "${SKIP_SETUP:-}" ]; then
        result "skipped (SKIP_SETUP): using $PY"
        return 0
    fi
    local pip_source=()
    if [ -n "${WHEELHOUSE:-}" ]; then
        pip_source=(--no-index --find-links "$WHEELHOUSE")
    fi
    # --system-site-packages: a CUDA torch that the machine already has (e.g. a container's) is reused
    if [ ! -x "$VENV/bin/python" ]; then
        "${PYTHON:-python3}" -m venv --system-site-packages "$VENV" || return 1
    fi
    "$PY" -m pip install --quiet "${pip_source[@]}" --upgrade pip "setuptools>=77" wheel packaging ninja || return 1
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "no CUDA torch importable: installing ${TORCH_SPEC} from ${TORCH_INDEX}"
        if [ -n "${WHEELHOUSE:-}" ]; then
            "$PY" -m pip install --quiet "${pip_source[@]}" "$TORCH_SPEC" || return 1
        else
            "$PY" -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX" || return 1
        fi
    fi
    local torch_version
    torch_version="$("$PY" -c "import torch; print(torch.__version__)")" || return 1
    echo "torch==$torch_version" >"$WORK/constraints.txt"  # the libraries must not replace torch
    # The libraries' setup.py imports torch and fetches a prebuilt wheel matching it (from GitHub releases);
    # it compiles only when none matches (then MAX_JOBS bounds the compile).
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install --quiet "${pip_source[@]}" --no-build-isolation \
        -c "$WORK/constraints.txt" -e ".[dev,cuda]" "$MAMBA_SPEC" "$CONV_SPEC" || return 1
    "$PY" - <<'EOF' || return 1
import importlib.metadata as md
import os

import torch

names = ("torch", "mamba-ssm", "causal-conv1d", "triton", "transformers")
line = ", ".join(f"{name} {md.version(name)}" for name in names)
print(line)
open(os.environ["WORK"] + "/setup.result", "w").write(line + "\n")
assert torch.cuda.is_available(), "torch cannot see a CUDA device"
EOF
}

part_env() {
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || return 1
    "$PY" - <<'EOF'
import importlib.metadata as md
import os
import sys
import warnings

import torch

from compressor import kernels

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    fast = kernels.backend(torch.device("cuda"), torch.bfloat16, 4).fast_ops()
for warning in said:
    print(warning.message)
total = len(kernels.Backend.__dataclass_fields__)
line = (f"{torch.cuda.get_device_name()}; mamba-ssm {version('mamba-ssm')}, causal-conv1d {version('causal-conv1d')}; "
        f"kernel ops {len(fast)}/{total}")
print(line, "->", ", ".join(fast) or "none")
open(os.environ["WORK"] + "/env.result", "w").write(line + "\n")
sys.exit(0 if len(fast) == total else 1)
EOF
}

part_parity() {
    local log="$WORK/parity.pytest"
    "$PY" -m pytest tests/test_kernels.py -k cuda -rs -p no:cacheprovider 2>&1 | tee "$log"
    local status=$?
    local summary
    summary="$(grep -E '(passed|failed|skipped|error)' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
    result "${summary:-no pytest summary}"
    # only passing tests count: all skipped means the kernels were not tried
    [ "$status" -eq 0 ] && grep -qE '[0-9]+ passed' <<<"$summary"
}

part_engine() {
    local table="$WORK/engine.table"
    "$PY" benchmarks/engine.py --device cuda --quick --train --repeats 3 | tee "$table" || return 1
    "$PY" - "$table" <<'EOF'
import os
import sys

# the speed and memory ratios (kernels / torch path) of each row of the markdown table
rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in open(sys.argv[1]) if line.startswith("| ")]
line = "; ".join(f"{r[0].split(' (')[0]} {r[1]}: speed {r[4]}, memory {r[7]}" for r in rows[1:])
open(os.environ["WORK"] + "/engine.result", "w").write(line + "\n")
EOF
}

gpu_kind() {
    # budget.GPUS name for this GPU, or nothing (then only the measurement runs)
    local name
    name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr '[:upper:]' '[:lower:]')"
    case "$name" in
        *h200*) echo h200 ;;
        *h100*pcie*) ;;  # not among the presets: measured only
        *h100*) echo h100-sxm ;;
        *b200*) echo b200 ;;
        *a100*80*) echo a100-80gb ;;
        *a100*) echo a100-40gb ;;
        *l40s*) echo l40s ;;
        *a10g*) echo a10g ;;
        *l4*) echo l4 ;;
        *5090*) echo rtx-5090 ;;
    esac
}

part_estimate() {
    local memory_mib model kind out="$WORK/estimate.json"
    memory_mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)"
    model=small
    if [ "${memory_mib%%.*}" -ge 40000 ]; then model=4b; fi  # 4b: 18 GB while built in fp32, 9 GB in bf16
    kind="$(gpu_kind)"
    local args=("$model" --ctx 8k --batch 8 --osl 16 --weight-dtype bf16 --measure --device cuda --json)
    if [ -n "$kind" ]; then args+=(--gpu "$kind"); fi
    echo "compress estimate ${args[*]}"
    "$PY" cli.py estimate "${args[@]}" >"$out" || { cat "$out"; return 1; }
    "$PY" - "$out" "$model" <<'EOF'
import json
import os
import sys

report = json.load(open(sys.argv[1]))
measured, roofline = report["measured"], report["throughput"]
line = (f"{sys.argv[2]} ctx 8k batch 8 bf16: decode {1000 * measured['decode_latency_s']:.2f} ms/step measured, "
        f"cache {'=' if measured['cache_bytes'] == measured['estimated_cache_bytes'] else '!='} estimate")
if roofline is not None:
    ratio = roofline["decode_latency_s"] / measured["decode_latency_s"]
    line += f"; roofline {1000 * roofline['decode_latency_s']:.2f} ms on {roofline['gpu']} ({ratio:.1%} of it)"
print(line)
open(os.environ["WORK"] + "/estimate.result", "w").write(line + "\n")
EOF
}

part_distill() {
    local gpus work="$WORK/distill"
    gpus="$(nvidia-smi -L | wc -l)"
    if [ "$gpus" -gt 8 ]; then gpus=8; fi
    # the student has the quick start's pruned shape: 12 Mamba heads x 20 (not a multiple of 8)
    "$PY" cli.py init "$work/student" --config examples/model/config.json --set hidden_size=192 \
        --set mamba_num_heads=12 --set mamba_head_dim=20 --tokenizer examples/model --overwrite || return 1
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" cli.py distill examples/model \
        "$work/student" --data examples/data/sample.txt --out "$work/run" --seq-len 256 \
        --batch-size $((4 * gpus)) --micro-batch-size 2 --steps 2 --eval-every 2 --eval-sequences 8 \
        --save-every 2 --log-every 1 --overwrite --quiet || return 1
    "$PY" - "$work/run/metrics.jsonl" "$gpus" <<'EOF'
import json
import math
import os
import sys

records = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in records if r.get("kind") == "train"]
assert train and all(math.isfinite(r["loss"]) for r in train), "no finite training loss logged"
last = train[-1]
speed = f", {last['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in last else ""
gpus = int(sys.argv[2])
how = f"{gpus} processes, FSDP2" if gpus > 1 else "1 process (one GPU: FSDP2 not engaged)"
line = f"{len(train)} steps, {how}, loss {last['loss']:.3f}{speed}"
print(line)
open(os.environ["WORK"] + "/distill.result", "w").write(line + "\n")
EOF
}

# ------------------------------------------------------------------------------------------------ main

export VENV="${VENV:-$ROOT/.venv-gpu}"
export TORCH_SPEC="${TORCH_SPEC:-torch==2.10.*}"
export TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
export MAMBA_SPEC="${MAMBA_SPEC:-mamba-ssm==2.3.2.post1}"
export CONV_SPEC="${CONV_SPEC:-causal-conv1d==1.6.1}"
if [ -n "${SKIP_SETUP:-}" ]; then
    PY="$(command -v "${PYTHON:-python3}")"
else
    PY="$VENV/bin/python"
fi
export PY

if [ "${1:-}" = "--part" ]; then
    PART="$2"
    "part_$PART"
    exit $?
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi fails); nothing to check" >&2
    exit 1
fi
export WORK="${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$WORK"
echo "gpu_check: repository $ROOT, logs in $WORK"

names=() statuses=() times=()
run_part() {  # NAME TIMEOUT_SECONDS
    local name="$1" limit="$2" start status label
    printf '\n=== %s (timeout %s s) ===\n' "$name" "$limit"
    start=$SECONDS
    timeout --kill-after=15 "$limit" bash "${BASH_SOURCE[0]}" --part "$name" 2>&1 | tee "$WORK/$name.log"
    status=${PIPESTATUS[0]}
    case "$status" in
        0) label=ok ;;
        124 | 137) label=TIMEOUT ;;
        *) label="FAILED ($status)" ;;
    esac
    if [ ! -s "$WORK/$name.result" ]; then  # the part said nothing: show its last log line
        tail -n 1 "$WORK/$name.log" >"$WORK/$name.result"
    fi
    names+=("$name")
    statuses+=("$label")
    times+=("$((SECONDS - start))")
}

run_part setup "${SETUP_TIMEOUT:-900}"
checks_start=$SECONDS
run_part env "${ENV_TIMEOUT:-30}"
run_part parity "${PARITY_TIMEOUT:-210}"
run_part engine "${ENGINE_TIMEOUT:-120}"
run_part estimate "${ESTIMATE_TIMEOUT:-60}"
run_part distill "${DISTILL_TIMEOUT:-60}"

printf '\n=== summary (checks took %s s; logs in %s) ===\n' "$((SECONDS - checks_start))" "$WORK"
printf '%-9s %-11s %7s  %s\n' part status seconds result
failures=0
for i in "${!names[@]}"; do
    printf '%-9s %-11s %7s  %s\n' "${names[$i]}" "${statuses[$i]}" "${times[$i]}" "$(head -c 300 "$WORK/${names[$i]}.result")"
    if [ "${statuses[$i]}" != ok ]; then failures=$((failures + 1)); fi
done
exit "$failures"
