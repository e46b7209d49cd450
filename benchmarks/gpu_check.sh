#!/usr/bin/env bash
# One unattended check of compressor on a GPU machine that has no network, from the carried wheelhouse to
# one summary table, in at most 8 minutes on one H100 (docs/gpu.md: how to prepare, run and read it).
#
#   bash benchmarks/gpu_check.sh --prepare     # on a networked machine: fill the wheelhouse, print its sizes
#   bash benchmarks/gpu_check.sh [--out DIR] [--only PART,...] [--skip PART,...]   # on the GPU machine
#   bash benchmarks/gpu_check.sh --list        # the parts and their timeouts
#
# The GPU machine brings Python, a CUDA build of torch, Triton, nvcc and most libraries; the rest travels in
# benchmarks/gpu/wheelhouse/ (--prepare): the wheels of benchmarks/gpu/wheels.txt, the source distributions
# of benchmarks/gpu/sources.txt and the example data as token files. Nothing is downloaded on the machine.
#
# Parts, in the order they run, each under its own timeout. A part that fails or times out is reported and
# the next one runs; without a CUDA device the GPU parts (all but setup) are marked "no CUDA device".
#   setup     the wheelhouse installed offline into $CACHE/site (pip --no-index --no-deps --target, first on
#             PYTHONPATH, so the machine's CUDA torch is used as it is); mamba-ssm from its source without
#             its CUDA extension (only its Triton ops are used); each carried package's import checked
#   conv      causal-conv1d's CUDA extension compiled for this GPU alone, in the background while kd_loss,
#             qad and distill run (they measure nothing that depends on it). Its timeout is theirs summed,
#             so waiting for it never lengthens the check; if it has not finished by then, the convolution
#             runs in torch and the parts after it say so
#   kd_loss   the chunked KD loss against Liger's fused loss and full logits: time, peak memory, agreement
#   qad       NVFP4 PTQ and quantization-aware distillation of the README's distilled model: the KL increase
#             and the share of it QAD recovers (against an unquantized control)
#   distill   a 2-step distillation from a teacher cache under torchrun, one process per GPU (FSDP2 needs 2 or
#             more)
#   env       GPU, versions, and which Mamba ops run as kernels
#   parity    tests/test_kernels.py on CUDA: each kernel op and the whole model against the torch path
#   engine    tokens/s and peak memory, kernel path vs torch path, at 4k and 32k tokens
#   estimate  compress estimate --measure: measured decode latency against the roofline
#
# Output: --out DIR (default $OUT when set, else a new /tmp/gpu_check.XXXXXX) receives summary.md (the
# table), summary.tsv (part, status, seconds, result) and logs.tar.gz (each part's log and result files).
#
# Environment: WHEELHOUSE (default benchmarks/gpu/wheelhouse); PYTHON (default python3; --prepare defaults
# to .venv/bin/python, as it needs torch and compressor's dependencies); CACHE (default /tmp/compressor-gpu:
# the installed site, the causal-conv1d build and the Triton cache, reused by a second run on the machine);
# QAD_STUDENT (a distilled model for qad instead of making one); NAME_TIMEOUT (seconds, e.g. PARITY_TIMEOUT).
# shellcheck disable=SC2317,SC2329  # the part_* functions are called by name: "part_$PART"
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/benchmarks/gpu_check.sh"
GPU_DIR="$ROOT/benchmarks/gpu"
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1

PARTS=(setup conv kd_loss qad distill env parity engine estimate)
# Default timeouts in seconds. conv's is kd_loss + qad + distill, which it overlaps, so the check takes at
# most setup + kd_loss + qad + distill + env + parity + engine + estimate = 480 s.
declare -A DEFAULT_TIMEOUT=([setup]=40 [kd_loss]=35 [qad]=130 [distill]=35 [env]=20 [parity]=120 [engine]=70
    [estimate]=30)
# What the GPU machine runs (/work/.library/device/KINDS.md): the wheels --prepare downloads for it
DEVICE_PYTHON=3.12
DEVICE_PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

usage() {
    sed -n '2,/^# shellcheck/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'
}

timeout_of() {  # PART: $PART_TIMEOUT (upper case) or the default
    local variable="${1^^}_TIMEOUT"
    if [ -n "${!variable:-}" ]; then
        echo "${!variable}"
    elif [ "$1" = conv ]; then
        echo $(($(timeout_of kd_loss) + $(timeout_of qad) + $(timeout_of distill)))
    else
        echo "${DEFAULT_TIMEOUT[$1]}"
    fi
}

# ------------------------------------------------------------------------------------------- prepare

prepare() {
    local py="${PYTHON:-}" new="$WHEELHOUSE.new"
    if [ -z "$py" ]; then
        py=python3
        if [ -x "$ROOT/.venv/bin/python" ]; then py="$ROOT/.venv/bin/python"; fi
    fi
    if ! PYTHONPATH="$ROOT" "$py" -c "import torch, compressor.data" 2>/dev/null; then
        echo "gpu_check --prepare: $py cannot import torch and compressor (reading the kernel sources' metadata" \
            "runs their setup.py, which imports torch; the token files need compressor): use the project's" \
            ".venv (bash examples/setup.sh) or set PYTHON" >&2
        return 1
    fi
    rm -rf "$new" && mkdir -p "$new" || return 1
    local pip=("$py" -m pip --disable-pip-version-check download --no-deps --quiet --dest "$new")
    echo "downloading the wheels of benchmarks/gpu/wheels.txt for the GPU machine (CPython $DEVICE_PYTHON, x86_64)"
    "${pip[@]}" --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp "${DEVICE_PLATFORMS[@]}" \
        -r "$GPU_DIR/wheels.txt" || return 1
    echo "... and for $py where its wheels differ (tests/test_gpu_check.py runs the check here)"
    "${pip[@]}" --only-binary=:all: -r "$GPU_DIR/wheels.txt" || return 1
    echo "downloading the source distributions of benchmarks/gpu/sources.txt"
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
        "${pip[@]}" --no-binary=:all: --no-build-isolation -r "$GPU_DIR/sources.txt" || return 1
    echo "writing the example data as token files"
    "$py" "$GPU_DIR/tokenize_data.py" "$new" || return 1
    rm -rf "$WHEELHOUSE" && mv "$new" "$WHEELHOUSE" || return 1
    echo "$WHEELHOUSE:"
    (cd "$WHEELHOUSE" && du -b -- *) | sort -n -r |
        awk '{ printf "%8.2f MiB  %s\n", $1 / 2^20, $2; total += $1 }
             END { printf "%8.2f MiB  total, %d files\n", total / 2^20, NR }'
    echo "Carry it to the GPU machine with the repository (the device tool: carry [\"benchmarks/gpu/wheelhouse\"])" \
        "and run: bash benchmarks/gpu_check.sh --out \"\$OUT\""
}

# ---------------------------------------------------------------------------------------------- parts
# Each part runs as `bash gpu_check.sh --part NAME` under `timeout`, logs to $WORK/NAME.log and writes a
# one-line result to $WORK/NAME.result; a non-zero exit marks it failed.

result() { printf '%s\n' "$*" >"$WORK/$PART.result"; }

summarized() {  # COMMAND...: run it, its output shown and kept; its last line is the part's result
    "$@" 2>&1 | tee "$WORK/$PART.out"
    local status=${PIPESTATUS[0]}
    result "$(tail -n 1 "$WORK/$PART.out")"
    return "$status"
}

spec() { grep -E "^$1==" "$GPU_DIR/sources.txt"; }  # NAME: its pinned line of sources.txt

part_setup() {
    if [ ! -d "$WHEELHOUSE" ]; then
        result "no wheelhouse at $WHEELHOUSE: run bash benchmarks/gpu_check.sh --prepare on a networked machine"
        return 1
    fi
    if ! "$PY" -c "import torch"; then
        result "$PY cannot import torch: set PYTHON to the interpreter that has the machine's CUDA torch"
        return 1
    fi
    rm -rf "$SITE" && mkdir -p "$SITE" || return 1
    # --isolated: no pip configuration or PIP_* variables of the machine apply; --target: the machine's own
    # packages (torch above all) stay as they are and the carried ones come first on PYTHONPATH
    local pip=("$PY" -m pip --isolated --disable-pip-version-check install --quiet --no-index
        --find-links "$WHEELHOUSE" --no-deps --no-compile --target "$SITE")
    "${pip[@]}" -r "$GPU_DIR/wheels.txt" || { result "pip could not install wheels.txt from $WHEELHOUSE"; return 1; }
    # mamba-ssm: no CUDA extension (SKIP_CUDA_BUILD) and no attempt to download a prebuilt wheel (FORCE_BUILD)
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "${pip[@]}" --no-build-isolation "$(spec mamba-ssm)" ||
        { result "pip could not install $(spec mamba-ssm) from its source"; return 1; }
    local init="$SITE/mamba_ssm/__init__.py" version
    version="$(grep -m 1 '^__version__' "$init")" || { result "no __version__ in $init"; return 1; }
    printf '%s\n' "# Written by benchmarks/gpu_check.sh: mamba-ssm's own __init__ imports its CUDA extension" \
        "# (selective_scan_cuda), which is not built here; the Triton ops in mamba_ssm.ops.triton need none of it." \
        "$version" >"$init"
    "$PY" "$GPU_DIR/imports.py" "$SITE" | tee "$WORK/imports.out"
    local status=${PIPESTATUS[0]} installed
    installed="$(find "$SITE" -maxdepth 1 -name '*.dist-info' | wc -l)"
    result "$installed packages installed offline; $(tail -n 1 "$WORK/imports.out")"
    return "$status"
}

part_conv() {
    local sdist
    sdist="$(find "$WHEELHOUSE" -maxdepth 1 -name 'causal_conv1d-*.tar.gz' | head -n 1)"
    if [ -z "$sdist" ]; then result "no causal-conv1d source in $WHEELHOUSE"; return 1; fi
    rm -rf "$CONV_SITE"
    summarized "$PY" "$GPU_DIR/build_conv.py" "$sdist" "$CACHE/conv-build" "$CONV_SITE"
}

part_kd_loss() {
    summarized "$PY" "$GPU_DIR/kd_loss.py"
}

part_qad() {
    local student=()
    if [ -n "${QAD_STUDENT:-}" ]; then student=(--student "$QAD_STUDENT"); fi
    summarized "$PY" "$GPU_DIR/qad.py" --data "$WHEELHOUSE" --work "$WORK/qad" "${student[@]}"
}

part_distill() {
    local gpus work="$WORK/distill"
    gpus="$("$PY" -c "import torch; print(min(torch.cuda.device_count(), 8))")" || return 1
    # the student has the quick start's pruned shape: 12 Mamba heads x 20 (not a multiple of 8)
    "$PY" cli.py init "$work/student" --config examples/model/config.json --set hidden_size=192 \
        --set mamba_num_heads=12 --set mamba_head_dim=20 --tokenizer examples/model --overwrite || return 1
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" cli.py distill examples/model \
        "$work/student" --data "$WHEELHOUSE/sample-256.npy" --out "$work/run" --seq-len 256 \
        --batch-size $((4 * gpus)) --micro-batch-size 2 --steps 2 --eval-every 2 --eval-sequences 8 \
        --save-every 2 --log-every 1 --cache-teacher --overwrite --quiet || return 1
    "$PY" - "$work/run" "$gpus" <<'EOF'
import json
import math
import os
import sys

run = sys.argv[1]
records = [json.loads(line) for line in open(run + "/metrics.jsonl")]
train = [r for r in records if r.get("kind") == "train"]
assert train and all(math.isfinite(r["loss"]) for r in train), "no finite training loss logged"
cache = json.load(open(run + "/teacher_cache/teacher_cache.json"))
assert cache["complete"] and cache["targets"] == "sampled", f"the teacher cache is not whole: {cache}"
last = train[-1]
speed = f", {last['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in last else ""
gpus = int(sys.argv[2])
how = f"{gpus} processes, FSDP2" if gpus > 1 else "1 process (one GPU: FSDP2 not engaged)"
line = f"{len(train)} steps from a sampled teacher cache, {how}, loss {last['loss']:.3f}{speed}"
print(line)
open(os.environ["WORK"] + "/distill.result", "w").write(line + "\n")
EOF
}

part_env() {
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    summarized "$PY" "$GPU_DIR/env.py"
}

part_parity() {
    local log="$WORK/parity.pytest" status summary
    # -o addopts=: the project's -q would cancel -v, which prints each test as it ends (read if it is stopped)
    "$PY" -m pytest tests/test_kernels.py -k cuda -o addopts= -v -rs -p no:cacheprovider 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    summary="$(grep -E '(passed|failed|skipped|error)' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"
    result "${summary:-no pytest summary}"
    # only passing tests count: all skipped means the kernels were not tried
    [ "$status" -eq 0 ] && grep -qE '[0-9]+ passed' <<<"$summary"
}

part_engine() {
    summarized "$PY" "$GPU_DIR/throughput.py" --table "$WORK/engine.md"
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

# ----------------------------------------------------------------------------------------------- main

export WHEELHOUSE="${WHEELHOUSE:-$GPU_DIR/wheelhouse}"
export CACHE="${CACHE:-/tmp/compressor-gpu}"
export SITE="$CACHE/site" CONV_SITE="$CACHE/conv-site"
PY="$(command -v "${PYTHON:-python3}")" || PY="${PYTHON:-python3}"
export PY

if [ "${1:-}" = "--part" ]; then
    PART="$2"
    "part_$PART"
    exit $?
fi

needs_value() {  # OPTION [VALUE]
    if [ -z "${2:-}" ]; then echo "gpu_check: $1 needs a value (see --help)" >&2; exit 2; fi
}
only="" skip="" out_dir="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) prepare; exit $? ;;
        --list)
            for part in "${PARTS[@]}"; do printf '%-9s %4s s\n' "$part" "$(timeout_of "$part")"; done
            exit 0 ;;
        --help | -h) usage; exit 0 ;;
        --out) needs_value "$@"; out_dir="$2"; shift ;;
        --only) needs_value "$@"; only="$2"; shift ;;
        --skip) needs_value "$@"; skip="$2"; shift ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for name in ${only//,/ } ${skip//,/ }; do
    if [[ " ${PARTS[*]} " != *" $name "* ]]; then
        echo "gpu_check: no part named $name; the parts: ${PARTS[*]}" >&2
        exit 2
    fi
done
selected() { [[ ( -z "$only" || ",$only," == *",$1,"* ) && ",$skip," != *",$1,"* ]]; }

out_dir="${out_dir:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$out_dir" "$CACHE" || exit 1
out_dir="$(cd "$out_dir" && pwd)"
export WORK
WORK="$(mktemp -d "$CACHE/run.XXXXXX")" || exit 1
# Everything below runs with no network: the carried packages first on the path, the libraries told to stay
# offline, Triton's compiled kernels and autotuning results kept on disk for the next process.
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PIP_NO_INDEX=1
export TRITON_CACHE_DIR="$CACHE/triton" TRITON_CACHE_AUTOTUNING=1
echo "gpu_check: repository $ROOT, wheelhouse $WHEELHOUSE, work folder $WORK, results to $out_dir"

names=() statuses=() times=()
record() {  # NAME STATUS SECONDS [RESULT]: a row of the table (RESULT replaces the part's own)
    if [ $# -gt 3 ]; then printf '%s\n' "$4" >"$WORK/$1.result"; fi
    if [ ! -s "$WORK/$1.result" ]; then  # the part said nothing: its last output line says most
        local last
        last="$(grep -v '^[[:space:]]*$' "$WORK/$1.log" 2>/dev/null | tail -n 1)"
        if [ "$2" = TIMEOUT ]; then
            last="stopped at its $(timeout_of "$1") s timeout${last:+; its last output: $last}"
        fi
        printf '%s\n' "${last:-no output}" >"$WORK/$1.result"
    fi
    names+=("$1")
    statuses+=("$2")
    times+=("$3")
}

label() {  # EXIT_STATUS of `timeout`
    case "$1" in
        0) echo ok ;;
        124 | 137) echo TIMEOUT ;;
        *) echo "FAILED ($1)" ;;
    esac
}

gpu_part_runs() {  # NAME: whether the part runs; records it as skipped when not
    if ! selected "$1"; then return 1; fi
    if [ -z "$CUDA_DEVICE" ] && [ "$1" != setup ]; then
        printf '\n=== %s: skipped, no CUDA device ===\n' "$1"
        record "$1" skipped 0 "no CUDA device"
        return 1
    fi
}

run_part() {  # NAME
    local name="$1" limit start status
    gpu_part_runs "$name" || return 0
    limit="$(timeout_of "$name")"
    printf '\n=== %s (timeout %s s) ===\n' "$name" "$limit"
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash "$SCRIPT" --part "$name" 2>&1 | tee "$WORK/$name.log"
    status=${PIPESTATUS[0]}
    if [ "$name" = parity ] && [ ! -s "$WORK/parity.result" ]; then  # stopped: what pytest had reached
        local passed failed last
        passed="$(grep -c ' PASSED' "$WORK/parity.log")"
        failed="$(grep -cE ' (FAILED|ERROR)' "$WORK/parity.log")"
        last="$(grep '::' "$WORK/parity.log" | tail -n 1)"
        record parity "$(label "$status")" $((SECONDS - start)) "$passed passed, $failed failed before it stopped; last: $last"
        return 0
    fi
    record "$name" "$(label "$status")" $((SECONDS - start))
}

conv_pid="" conv_start=0
start_conv() {  # in the background: its output goes to its log only
    gpu_part_runs conv || return 0
    printf '\n=== conv (background, timeout %s s) ===\n' "$(timeout_of conv)"
    conv_start=$SECONDS
    timeout --kill-after=10 "$(timeout_of conv)" bash "$SCRIPT" --part conv >"$WORK/conv.log" 2>&1 &
    conv_pid=$!
}

join_conv() {  # waits for the build (never past its timeout); its kernels serve the parts after it if it built
    if [ -z "$conv_pid" ]; then return 0; fi
    printf '\n=== conv: waiting for the causal-conv1d build ===\n'
    wait "$conv_pid"
    local status=$?
    tail -n 5 "$WORK/conv.log"
    if [ "$status" -eq 0 ]; then
        export PYTHONPATH="$CONV_SITE:$PYTHONPATH"
        record conv ok $((SECONDS - conv_start))
    elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        record conv TIMEOUT $((SECONDS - conv_start)) \
            "not built within $(timeout_of conv) s: conv and conv_update run in torch (its log: conv.log)"
    else
        record conv "$(label "$status")" $((SECONDS - conv_start))
    fi
}

started=$SECONDS
CUDA_DEVICE=""
run_part setup
CUDA_DEVICE="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' \
    2>/dev/null)"
start_conv
run_part kd_loss
run_part qad
run_part distill
join_conv
run_part env
run_part parity
run_part engine
run_part estimate

elapsed=$((SECONDS - started))
cell() {  # NAME: the part's result on one line, at most 400 bytes, without the table's separators
    local text
    text="$(head -c 400 "$WORK/$1.result")"
    text="${text//$'\n'/ }"
    text="${text//$'\t'/ }"
    printf '%s' "${text//|//}"
}
{
    echo "GPU check: ${CUDA_DEVICE:-no CUDA device}; $(date -u '+%Y-%m-%d %H:%M UTC'); $elapsed s in all"
    echo
    echo "| part | status | seconds | result |"
    echo "|---|---|---:|---|"
    for i in "${!names[@]}"; do
        echo "| ${names[$i]} | ${statuses[$i]} | ${times[$i]} | $(cell "${names[$i]}") |"
    done
} >"$out_dir/summary.md"
for i in "${!names[@]}"; do
    printf '%s\t%s\t%s\t%s\n' "${names[$i]}" "${statuses[$i]}" "${times[$i]}" "$(cell "${names[$i]}")"
done >"$out_dir/summary.tsv"
(cd "$WORK" && find . -name '*.log' -o -name '*.result' -o -name '*.out' -o -name '*.md' -o -name '*.pytest' \
    -o -name 'eval.json' -o -name 'metrics.jsonl' | tar -czf "$out_dir/logs.tar.gz" -T -)
printf '\n=== summary (%s s; logs in %s, results in %s) ===\n' "$elapsed" "$WORK" "$out_dir"
cat "$out_dir/summary.md"
failures=0
for status in "${statuses[@]}"; do
    case "$status" in ok | skipped) ;; *) failures=$((failures + 1)) ;; esac
done
exit "$failures"
