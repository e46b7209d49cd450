"""Does every kind of output compressor writes run in the engines people serve with, as compressor computes it?

Builds each output kind from the example model (`runs/interop/`), then runs it in every engine and compares
with our engine on held-out text (`examples/data/valid.txt`; prompts of `--length` tokens):

| output | how it is made |
|---|---|
| original | `examples/model` |
| pruned | `compress prune` (Minitron, the quick start's budget): uniform, `nemotron_h` |
| distilled | `compress distill` of the original into the pruned model (`--tokens`) |
| per-block | `compress prune --strategy minipuzzle --target-mem 32MiB`: per-block MLP widths, `nemotron_h_puzzle` |
| per-block Mamba | one Mamba block with half its heads (`compressor.prune`): `nemotron_h_compressor` |
| MoE | the MLP blocks upcycled into MoE blocks (`benchmarks/moe_example.py`), uniform |
| MoE per-block | the MoE with its two MoE-block kinds of expert counts (`compressor.prune`): `nemotron_h_puzzle` |
| fp8 | `compress quantize --format fp8` of the original (ModelOpt export): `nemotron_h_puzzle` |
| fp8 distilled | the same of the distilled model |

Engines (each in its own virtualenv, `bash benchmarks/engines.sh` sets them up; `benchmarks/engine_runners.py`
runs them): transformers (this venv, fp32), vLLM's CPU build (fp32; the fp8 export in bf16, the only dtypes
vLLM runs ModelOpt exports in; `trust_remote_code` for `nemotron_h_puzzle`, whose configuration module the
folder carries), llama.cpp (converted to an f32 GGUF by its own `convert_hf_to_gguf.py` with the three
workarounds of `engine_runners.py`; default f16 KV cache), and lm-eval's own command line (its HF backend,
`lm_eval --model hf`, and `lm-eval-compressor --model compressor`, on a local multiple-choice task).

A cell is one of: `exact` (vLLM and transformers: greedy ids equal and max |delta logprob| <= 1e-4; llama.cpp:
top-1 agreement >= 99%; the fp8 export in vLLM: top-1 >= 95% against our W8A8 simulation, in llama.cpp, whose
converter dequantizes its weights, top-1 >= 99% against ours with those weights and unquantized activations;
lm-eval: the same accuracy as `lm-eval-compressor`), `refused` (the engine stops with an error: the output is
not for it), or **WRONG** (it loads and computes something else: the failure this check exists to catch; the
run exits 1).

    bash benchmarks/engines.sh                      # once (about 10 minutes)
    python benchmarks/interop.py                    # the matrix (about 15 minutes on 2 cores)
    python benchmarks/interop.py --speed            # and the serving speed table
    python benchmarks/interop.py --write-readme     # and put the matrix into README.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import engine_runners as engines  # noqa: E402
from compressor.budget import GPUSpec, Precision, Workload, estimate_throughput  # noqa: E402
from compressor.checkpoint import load_model, save_model  # noqa: E402
from compressor.config import MAMBA, MOE, PUZZLE, HybridConfig  # noqa: E402
from compressor.data import load_sequences  # noqa: E402
from compressor.importance import estimate  # noqa: E402
from compressor.prune import prune  # noqa: E402
from compressor.target import BlockTarget, Target  # noqa: E402

DATA = ROOT / "examples" / "data"
COMPRESS = [sys.executable, str(ROOT / "cli.py")]
README_BEGIN, README_END = "<!-- interop matrix: begin -->", "<!-- interop matrix: end -->"
ENGINES = ("transformers", "vLLM", "llama.cpp", "lm-eval")
# A nominal device for `compress estimate` on this 2-core CPU: the predicted ratios depend on which of
# bytes or FLOPs bound each phase, hardly on the two numbers.
CPU = GPUSpec("2-core CPU", memory_bandwidth=20e9, bf16_flops=0.2e12, memory=24 * 2**30)


@dataclass
class Cell:
    verdict: str  # "exact", "refused" or "WRONG"
    detail: str

    def __str__(self) -> str:
        word = "**WRONG**" if self.verdict == "WRONG" else self.verdict
        return f"{word} ({self.detail})" if self.detail else word


# ----- the outputs --------------------------------------------------------------------------------------
def compress(*args: str) -> None:
    """Run `compress ARGS` as a user would; stop with its own message if it fails."""
    print("$ compress " + " ".join(args), flush=True)
    done = subprocess.run([*COMPRESS, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"interop: compress {args[0]} failed:\n{done.stderr[-2000:]}")


def build_outputs(work: Path, tokens: str) -> dict[str, Path]:
    """Every output kind (module docstring), built under `work` unless already there."""
    original = ROOT / "examples" / "model"
    out = {"original": original}
    sample = ["--data", str(DATA / "sample.txt"), "--seq-len", "256", "--batch-size", "8", "--overwrite"]
    if not (work / "pruned" / "config.json").is_file():
        compress("prune", str(original), "--out", str(work / "pruned"), "--target-mem", "20MiB", "--ctx", "4k",
                 "--axes", "hidden,ffn,mamba_heads,mamba_head_dim,depth", "--samples", "64", "--score-samples",
                 "32", *sample)  # fmt: skip
    out["pruned"] = work / "pruned"
    if not (work / "distilled" / "model" / "config.json").is_file():
        compress("distill", str(original), str(work / "pruned"), "--out", str(work / "distilled"), "--tokens",
                 tokens, "--micro-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--eval-every", "50",
                 "--eval-sequences", "16", *sample)  # fmt: skip
    out["distilled"] = work / "distilled" / "model"
    if not (work / "per_block" / "config.json").is_file():
        compress("prune", str(original), "--strategy", "minipuzzle", "--out", str(work / "per_block"),
                 "--target-mem", "32MiB", "--ctx", "4k", "--samples", "32", "--score-samples", "16",
                 *sample)  # fmt: skip
    out["per-block"] = work / "per_block"
    model = load_model(original, dtype="float32")
    sequences = load_sequences(DATA / "sample.txt", seq_len=256, tokenizer=original, max_sequences=32)
    importance = estimate(model, sequences.batches(8, shuffle=False))
    out["per-block Mamba"] = _saved(work / "per_block_mamba", original, lambda: _halve_one_mamba(model, importance))
    moe = work / "moe"
    if not (moe / "config.json").is_file():
        from benchmarks.moe_example import upcycle

        ffn = model.config.intermediate_size
        save_model(upcycle(model, importance, experts=4, top_k=2, shared=ffn // 4), moe, tokenizer_from=original)
    out["MoE"] = moe
    out["MoE per-block"] = _saved(work / "moe_per_block", original, lambda: _fewer_experts(moe, sequences))
    for name, source in (("fp8", original), ("fp8 distilled", out["distilled"])):
        folder = work / name.replace(" ", "_")
        if not (folder / "config.json").is_file():
            compress("quantize", str(source), "--format", "fp8", "--out", str(folder), "--data",
                     str(DATA / "sample.txt"), "--samples", "16", "--seq-len", "256", "--overwrite")  # fmt: skip
        out[name] = folder
    return out


def _saved(path: Path, tokenizer_from: Path, build) -> Path:
    if not (path / "config.json").is_file():
        save_model(build(), path, tokenizer_from=tokenizer_from, overwrite=True)
    return path


def _halve_one_mamba(model, importance):
    """The original with its first Mamba block keeping half its heads (the most important ones)."""
    config = model.config
    target = Target.uniform(config)
    first = next(b for b in target.blocks if b.kind == MAMBA)
    heads = max(config.n_groups, config.mamba_num_heads // 2 // config.n_groups * config.n_groups)
    blocks = tuple(BlockTarget(**{**vars(b), "mamba_num_heads": heads}) if b is first else b for b in target.blocks)
    return prune(model, importance, Target(config.hidden_size, blocks))


def _fewer_experts(moe: Path, sequences):
    """The upcycled MoE with its MoE blocks keeping 4, 2, 4, ... routed experts (per-block counts)."""
    model = load_model(moe, dtype="float32")
    importance = estimate(model, sequences.batches(8, shuffle=False))
    target = Target.uniform(model.config)
    counts = iter([4, 2] * model.config.num_blocks)
    blocks = tuple(
        BlockTarget(**{**vars(b), "n_routed_experts": next(counts)}) if b.kind == MOE else b for b in target.blocks
    )
    return prune(model, importance, Target(model.config.hidden_size, blocks))


# ----- the checks ---------------------------------------------------------------------------------------
def logprob_cell(reference, run, *, max_delta: float | None, min_top1: float) -> Cell:
    """The verdict on one engine run against ours (module docstring)."""
    if run.error:
        return Cell("refused", _short(run.error))
    a = engines.compare(reference, run)
    detail = f"max {a.max_abs_delta_logprob:.1e}, top-1 {a.top1_agreement:.1%}"
    ok = a.top1_agreement >= min_top1
    if max_delta is not None:
        ok = ok and a.max_abs_delta_logprob <= max_delta and a.greedy_equal is not False
        detail += f", greedy {'equal' if a.greedy_equal else 'differs'}"
    return Cell("exact" if ok else "WRONG", detail)


def _short(error: str) -> str:
    """The engine's one-line error, shortened for a table cell."""
    line = re.sub(r"\s+", " ", error.replace(f"{ROOT}/", "")).strip().replace("|", "/")
    return line if len(line) <= 90 else line[:87] + "..."


def write_task(folder: Path, items: int) -> None:
    """The local lm-eval task shakespeare_next_line (examples/lm_eval_tasks.py) into `folder`."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "lm_eval_tasks.py"), "--out", str(folder),
                           "--items", str(items)], capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        sys.exit(f"interop: examples/lm_eval_tasks.py failed:\n{done.stderr[-2000:]}")


def lm_eval_accuracy(program: str, model: str, path: Path, tasks: Path, limit: int) -> tuple[float | None, str]:
    """(accuracy, "") of lm-eval's command line `program` with `--model model` on shakespeare_next_line, or
    (None, its one-line error)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(Path(sys.executable).with_name(program)), "run", "--model", model, "--model_args",
                f"pretrained={path},dtype=float32", "--tasks", "shakespeare_next_line", "--include_path", str(tasks),
                "--limit", str(limit), "--batch_size", "8", "--device", "cpu", "--output_path", tmp]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        results = list(Path(tmp).rglob("results_*.json"))
        if done.returncode or not results:
            lines = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
            return None, (lines or done.stderr.strip().splitlines() or ["failed"])[-1]
        return json.loads(results[0].read_text())["results"]["shakespeare_next_line"]["acc,none"], ""


def lm_eval_cell(path: Path, tasks: Path, limit: int) -> Cell:
    """lm-eval's HF backend against lm-eval-compressor on the same task and documents."""
    ours, why = lm_eval_accuracy("lm-eval-compressor", "compressor", path, tasks, limit)
    if ours is None:
        return Cell("WRONG", f"lm-eval-compressor failed: {_short(why)}")
    theirs, why = lm_eval_accuracy("lm_eval", "hf", path, tasks, limit)
    if theirs is None:
        return Cell("refused", f"hf backend: {_short(why)}; `lm-eval-compressor` runs it (acc {ours:.3f})")
    ok = math.isclose(ours, theirs, abs_tol=1e-9)
    return Cell("exact" if ok else "WRONG", f"acc {theirs:.3f}, ours {ours:.3f}")


def check_output(name: str, path: Path, prompts: list[list[int]], tasks: Path, limit: int) -> dict[str, Cell]:
    config = HybridConfig.from_file(path)
    quantized, puzzle = config.is_quantized, config.served_format == PUZZLE
    ours = engines.compressor_logprobs(path, prompts, max_new_tokens=8)
    if ours.error:
        sys.exit(f"interop: our engine failed on {name}: {ours.error}")
    vllm_dtype = "bfloat16" if quantized else "float32"
    # llama.cpp's converter dequantizes a quantized export's weights: the model it runs is those weights alone
    weights_only = engines.compressor_logprobs(path, prompts, quantized_activations=False) if quantized else None
    strict = None if quantized else 1e-4  # a W8A8 export in bf16 is judged by its top-1 agreement
    cells = {
        "transformers": logprob_cell(
            ours, engines.transformers_logprobs(path, prompts, max_new_tokens=8), max_delta=1e-4, min_top1=1.0
        ),
        "vLLM": logprob_cell(
            ours,
            engines.vllm_logprobs(path, prompts, dtype=vllm_dtype, max_new_tokens=8, trust_remote_code=puzzle),
            max_delta=strict,
            min_top1=0.95 if quantized else 1.0,
        ),
        "llama.cpp": logprob_cell(
            weights_only or ours, engines.llamacpp_logprobs(path, prompts), max_delta=None, min_top1=0.99
        ),
        "lm-eval": lm_eval_cell(path, tasks, limit),
    }
    if quantized or puzzle:
        cells["vLLM"].detail += f", {vllm_dtype}" + (", trust_remote_code" if puzzle else "")
    if quantized:
        cells["llama.cpp"].detail += ", dequantized weights: against ours without activation quantization"
    return cells


# ----- speed --------------------------------------------------------------------------------------------
def predicted(config: HybridConfig, context: int, new_tokens: int, weight_dtype: str) -> tuple[float, float]:
    """compress estimate's roofline on `CPU`: (prefill tokens/s, decode tokens/s) of one sequence."""
    t = estimate_throughput(config, Workload(context, new_tokens, 1), CPU, precision=Precision(weight_dtype))
    return context / t.prefill_s, new_tokens / t.decode_s


def speed_rows(outputs: dict[str, Path], contexts: list[int], new_tokens: int) -> list[list[str]]:
    rows = []
    base: dict[tuple, tuple] = {}
    for name in ("original", "pruned", "per-block", "fp8"):
        path = outputs[name]
        config = HybridConfig.from_file(path)
        dtype = "fp8" if config.is_quantized else "bf16"
        for context in contexts:
            measured = {
                "vLLM bf16": engines.vllm_speed(path, context=context, new_tokens=new_tokens, dtype="bfloat16",
                                                trust_remote_code=config.served_format == PUZZLE),
                "llama.cpp f16": engines.llamacpp_speed(path, context=context, new_tokens=new_tokens, outtype="f16"),
            }  # fmt: skip
            guess = predicted(config, context, new_tokens, dtype)
            for engine, speed in measured.items():
                key = (engine, context)
                now = (speed.prefill_tokens_per_s, speed.decode_tokens_per_s, *guess)
                if name == "original":
                    base[key] = now
                if speed.error or None in now[:2] or key not in base or None in base[key][:2]:
                    rows.append([name, engine, str(context), "-", "-", "-", "-", _short(speed.error or "no figure")])
                    continue
                r = [now[i] / base[key][i] for i in range(4)]
                rows.append([name, engine, str(context), f"{now[0]:,.0f}", f"{now[1]:,.0f}",
                             f"{r[0]:.2f}x / {r[2]:.2f}x", f"{r[1]:.2f}x / {r[3]:.2f}x", ""])  # fmt: skip
    return rows


# ----- output ---------------------------------------------------------------------------------------------
def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def versions() -> str:
    import torch
    import transformers

    found = engines.available()
    return (
        f"transformers {transformers.__version__}, vLLM {found.get('vllm') or '-'} (CPU build), llama.cpp "
        f"(llama-cpp-python) {found.get('llamacpp') or '-'}, lm-eval {_version('lm_eval')}, torch {torch.__version__}"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = content.index(README_BEGIN), content.index(README_END)
    readme.write_text(content[: start + len(README_BEGIN)] + "\n" + text + "\n" + content[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "interop"), help="where the outputs are built")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts per output")
    parser.add_argument("--length", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--tokens", default="100k", help="distillation tokens of the distilled output")
    parser.add_argument("--lm-eval-limit", type=int, default=40, help="documents of the lm-eval task")
    parser.add_argument("--outputs", help="comma-separated output names to check (default: all)")
    parser.add_argument("--speed", action="store_true", help="also the serving speed table")
    parser.add_argument("--contexts", default="512,2048", help="speed: context lengths")
    parser.add_argument("--new-tokens", type=int, default=64, help="speed: decoded tokens")
    parser.add_argument("--write-readme", action="store_true", help="put the matrix between README's markers")
    args = parser.parse_args()
    missing = [engine for engine, version in engines.available().items() if version is None]
    if missing:
        sys.exit(f"interop: {', '.join(missing)} not set up: {engines.SETUP_HINT}")
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    outputs = build_outputs(work, args.tokens)
    if args.outputs:
        outputs = {name: path for name, path in outputs.items() if name in args.outputs.split(",")}
    tasks = work / "lm_eval_tasks"
    write_task(tasks, args.lm_eval_limit)
    prompts = engines.text_prompts(ROOT / "examples" / "model", DATA / "valid.txt", count=args.prompts,
                                   length=args.length)  # fmt: skip
    rows, wrong = [], 0
    for name, path in outputs.items():
        config = HybridConfig.from_file(path)
        cells = check_output(name, path, prompts, tasks, args.lm_eval_limit)
        wrong += sum(cell.verdict == "WRONG" for cell in cells.values())
        rows.append([name, f"`{config.served_format}`", *(str(cells[engine]) for engine in ENGINES)])
        print(f"{name}: " + "; ".join(f"{engine} {cell}" for engine, cell in cells.items()), flush=True)
    table = markdown(["output", "model_type", *ENGINES], rows)
    text = (
        f"{table}\n\n({versions()}; {args.prompts} held-out prompts of {args.length} tokens and 8 greedy tokens "
        f"each; `python benchmarks/interop.py`, {time.perf_counter() - started:.0f} s)"
    )
    print("\n" + text)
    if args.speed:
        contexts = [int(c) for c in args.contexts.split(",")]
        header = ["output", "engine", "context", "prefill tok/s", "decode tok/s", "prefill speedup (measured / "
                  "predicted)", "decode speedup (measured / predicted)", "note"]  # fmt: skip
        speed = markdown(header, speed_rows(outputs, contexts, args.new_tokens))
        print(f"\n{speed}\n\n(one sequence; median of 3 after a warm-up; predicted: `compress estimate` on a nominal "
              f"{CPU.memory_bandwidth / 1e9:.0f} GB/s, {CPU.bf16_flops / 1e12:.1f} TFLOP/s device)")  # fmt: skip
    if args.write_readme:
        write_readme(text)
    if wrong:
        sys.exit(f"interop: {wrong} cell(s) loaded and computed something else")


if __name__ == "__main__":
    main()
