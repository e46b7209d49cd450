"""How the cost of each stage grows with the model: time and peak memory of init, load, importance, prune,
save and one distillation step, for models from tiny to the 4B preset, on this machine.

    python benchmarks/scale.py                          # tiny .. 4B (the table in docs/scale.md)
    python benchmarks/scale.py --models tiny,small,1/8  # a quick run
    python benchmarks/scale.py --tokens                 # importance of one model at growing token counts
    python benchmarks/scale.py --plans                  # plans against measured peaks; sharded importance

Every model has random bf16 weights (`compress init --dtype bfloat16`), written once to a temporary folder
under --tmp (the 4B checkpoint is 8.4 GiB: the free disk is checked first, and everything is removed at
the end). The sizes between `small` and `4b` are the 4B preset's 52 blocks at a fraction of its widths
(`1/8`: hidden 384, `1/4`: 768, `1/2`: 1536; vocab 32768 below 4B). Each stage runs in its own process;
its peak RSS is the kernel's high-water mark of that process (os.wait4's ru_maxrss, as RUSAGE_CHILDREN
reports it), not an in-process delta; it includes the ~0.4 GiB of the Python/torch runtime. Stages:
- init: `compress init --preset 4b --set ... --dtype bfloat16` (random weights in the target dtype);
- load: `load_model` and one read of every page of the weights;
- importance: `compress importance` on --samples x --seq-len random tokens (hooks only);
- prune: `compress prune --export-config` with the importance folder (hidden x 5/6, FFN x 3/4: the 4B's
  2560 / 9216), no scoring: slicing tensor by tensor into the new checkpoint;
- save: `load_model` then `save_model` to a new folder (shards of 5 GiB);
- distill step: `compress distill`'s setup (teacher = the model, student = the pruned one, fp32 master
  weights, AdamW) and one optimizer step of one --seq-len sequence; skipped when its memory plan does not
  fit in the available memory.

`--plans` checks compressor.planning against measured peaks on a mid-size model (`1/4`, fp32): importance on
one process and sharded on two gloo processes (per process; scores compared), candidate scoring
(`compress prune` with held-out data), one distillation step. Plan and measurement exclude the runtime: the
measured figure is the peak RSS less the process's RSS just before loading.

Times on a shared 2-core machine are provisional (others' jobs slow them 2-7x); memory is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
# the 4B preset at a fraction of its widths: name -> --set overrides (mamba heads stay a multiple of 8 groups)
SIZES = {
    "tiny": ("tiny", {}),
    "small": ("small", {}),
    "1/8": ("4b", {"hidden_size": 384, "intermediate_size": 1536, "mamba_num_heads": 16, "vocab_size": 32768}),
    "1/4": ("4b", {"hidden_size": 768, "intermediate_size": 3072, "mamba_num_heads": 32, "vocab_size": 32768}),
    "1/2": ("4b", {"hidden_size": 1536, "intermediate_size": 6144, "mamba_num_heads": 56, "vocab_size": 32768}),
    "4b": ("4b", {}),
}
STAGES = ("init", "load", "importance", "prune", "save", "distill step")


# ----- one stage in its own process -------------------------------------------------------------------------
def child(stage: str, params: dict) -> dict:
    """Run one stage in this (fresh) process; return its time and the RSS before its work."""
    import torch

    import cli
    from compressor import distributed
    from compressor.checkpoint import empty_model
    from compressor.presets import get_preset

    world = distributed.init(distributed.resolve_device("cpu"))
    empty_model(get_preset("tiny"), torch.float32)  # the first model built loads ~75 MB of code, once a process
    baseline = _rss_now()
    started = time.perf_counter()
    result: dict = {}
    if stage in ("init", "importance", "prune"):
        status = cli.app(args=params["argv"], standalone_mode=False)
        if status:
            raise SystemExit(f"compress {params['argv'][0]} failed")
    elif stage == "load":
        from compressor.checkpoint import load_model

        model = load_model(params["model"])
        result["touched"] = _touch(model)
    elif stage == "save":
        from compressor.checkpoint import load_model, save_model

        save_model(load_model(params["model"]), params["out"])
    elif stage == "distill step":
        result.update(_distill_step(params))
    elif stage == "sharded importance":
        result.update(_sharded_importance(params, world))
    result.update(seconds=result.get("seconds", time.perf_counter() - started), baseline=baseline)
    result["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    distributed.close(world)
    return result


def _touch(model) -> int:
    """Read one element of every page of every weight (what a forward pass does to the memory map)."""
    pages = 0
    for tensor in model.state_dict().values():
        flat = tensor.reshape(-1)
        step = max(1, 4096 // tensor.element_size())
        flat[::step].float().sum()
        pages += -(-flat.numel() // step)
    return pages


def _distill_step(params: dict) -> dict:
    """`compress distill`'s setup and one optimizer step; the step alone is timed."""
    from compressor import distributed
    from compressor.train import SilentReporter, TrainConfig, _micro_batches, setup, step

    config = TrainConfig(**params["config"])
    world = distributed.init(distributed.resolve_device("cpu"))
    run = setup(config, world, Path(config.out), None, SilentReporter())
    batches = _micro_batches(run.train_set, config.micro_batch_size, config.seed, 0)
    started = time.perf_counter()
    record = step(run, batches)
    return {"seconds": time.perf_counter() - started, "loss": record["loss"]}


def _sharded_importance(params: dict, world) -> dict:
    """Importance the way `compress importance` computes it, on this process's share (sharded under torchrun)."""
    from compressor.importance import ImportanceOptions
    from compressor.pipelines.source import CalibrationConfig, calibrate

    options = ImportanceOptions(drop_one=params.get("drop_one", "none"))
    config = CalibrationConfig(params["model"], params["data"], importance=options, samples=params["samples"],
                               seq_len=params["seq_len"], batch_size=1, device="cpu")  # fmt: skip
    started = time.perf_counter()
    source = calibrate(config, world=world)
    seconds = time.perf_counter() - started
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in source.model.parameters())
    if world.is_main:
        Path(params["out"]).mkdir(parents=True)
        source.importance.save(Path(params["out"]))
    return {"seconds": seconds, "local_parameters": local, "rank": world.rank}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_stage(stage: str, params: dict, *, nproc: int = 1, timeout: int = 3600) -> dict | list[dict]:
    """Run `stage` in a new process (or `nproc` under torchrun); its peak RSS from os.wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        command = [__file__, "--child", stage, "--params", json.dumps(params), "--results", str(results)]
        if nproc > 1:
            command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *command]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        with open(results / "log", "w") as log:
            process = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            tail = (results / "log").read_text()[-3000:]
            raise RuntimeError(f"stage {stage} failed:\n{tail}")
        found = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
    if nproc == 1:
        found[0]["process_peak"] = usage.ru_maxrss * 1024  # the child's high-water mark, from outside
        return found[0]
    return found


# ----- the scale table ---------------------------------------------------------------------------------------
def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def export_shape(config) -> dict:
    """Hidden x 5/6 and FFN x 3/4, multiples of 64 (the 4B: 2560 and 9216)."""
    return {
        "hidden_size": max(64, config.hidden_size * 5 // 6 // 64 * 64),
        "ffn_hidden_size": max(64, config.intermediate_size * 3 // 4 // 64 * 64),
    }


def measure_model(name: str, root: Path, tokens: Path, args) -> dict:
    from compressor import planning
    from compressor.budget import available_memory, num_parameters
    from compressor.config import HybridConfig
    from compressor.train import TrainConfig

    preset, overrides = SIZES[name]
    folder = root / name.replace("/", "_")
    settings = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    row: dict = {"model": name}
    row["init"] = run_stage("init", {"argv": ["init", str(folder / "model"), "--preset", preset, *settings,
                                              "--dtype", "bfloat16"]})  # fmt: skip
    config = HybridConfig.from_file(folder / "model")
    row["params"], row["checkpoint"] = num_parameters(config), checkpoint_bytes(folder / "model")
    row["load"] = run_stage("load", {"model": str(folder / "model")})
    row["importance"] = run_stage("importance", {"argv": [
        "importance", str(folder / "model"), "--data", str(tokens), "--samples", str(args.samples), "--seq-len",
        str(args.seq_len), "--out", str(folder / "importance"), "--device", "cpu"]})  # fmt: skip
    row["prune"] = run_stage("prune", {"argv": [
        "prune", str(folder / "model"), "--export-config", json.dumps(export_shape(config)), "--importance",
        str(folder / "importance"), "--out", str(folder / "pruned"), "--device", "cpu"]})  # fmt: skip
    row["pruned checkpoint"] = checkpoint_bytes(folder / "pruned")
    row["save"] = run_stage("save", {"model": str(folder / "model"), "out": str(folder / "saved")})
    shutil.rmtree(folder / "saved")
    distill = dict(student=str(folder / "pruned"), teacher=str(folder / "model"), out=str(folder / "run"),
                   data=str(tokens), seq_len=args.seq_len, batch_size=1, micro_batch_size=1, steps=1,
                   valid_fraction=0.05, eval_sequences=1, device="cpu")  # fmt: skip
    plan = planning.training_plan(
        TrainConfig(**distill), HybridConfig.from_file(folder / "pruned"), config, "cpu"
    ).total(1)
    if plan < 0.6 * available_memory("cpu"):  # leave the rest to whoever shares the machine
        row["distill step"] = run_stage("distill step", {"config": distill})
    else:
        row["distill step"] = {"skipped": f"plan {plan / GIB:.1f} GiB > available {available_memory('cpu') / GIB:.1f}"}
    if not args.keep:
        shutil.rmtree(folder)
    return row


def print_scale_table(rows: list[dict], args) -> None:
    tokens = args.samples * args.seq_len
    print(f"\nstage cost by model size (random bf16 weights; importance on {args.samples} x {args.seq_len} tokens; "
          f"distill step: 1 x {args.seq_len} tokens, fp32 student)\n")  # fmt: skip
    print("| model | parameters | checkpoint | " + " | ".join(STAGES) + " |")
    print("|---|---:|---:|" + "---:|" * len(STAGES))
    for row in rows:
        cells = []
        for stage in STAGES:
            result = row[stage]
            if "skipped" in result:
                cells.append("skipped")
                continue
            cells.append(f"{result['seconds']:.1f} s, {result['process_peak'] / GIB:.2f} GiB")
        print(f"| {row['model']} | {row['params']:,} | {row['checkpoint'] / GIB:.2f} GiB | " + " | ".join(cells) + " |")
    print("\npeak RSS / checkpoint bytes (the runtime's ~0.4 GiB included)\n")
    print("| model | " + " | ".join(STAGES[:5]) + " | importance s / 1k tokens | seconds per B parameters (prune) |")
    print("|---|" + "---:|" * 7)
    for row in rows:
        ratios = [f"{row[s]['process_peak'] / row['checkpoint']:.2f}x" for s in STAGES[:5]]
        per_token = row["importance"]["seconds"] / tokens * 1000
        per_param = row["prune"]["seconds"] / row["params"] * 1e9
        print(f"| {row['model']} | " + " | ".join(ratios) + f" | {per_token:.3f} | {per_param:.1f} |")


def token_table(root: Path, args) -> None:
    """Importance of one model at growing token counts: time and peak grow with tokens, the weights do not."""
    name = args.token_model
    preset, overrides = SIZES[name]
    folder = root / "tokens_model"
    settings = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    run_stage("init", {"argv": ["init", str(folder), "--preset", preset, *settings, "--dtype", "bfloat16"]})
    data = root / "tokens.npy"
    print(f"\nimportance of the {name} model by calibration tokens (batch 1)\n")
    print("| samples x seq_len | tokens | seconds | peak RSS | seconds / 1k tokens |")
    print("|---|---:|---:|---:|---:|")
    for samples, seq_len in ((1, 256), (4, 256), (4, 1024), (16, 1024)):
        result = run_stage("importance", {"argv": [
            "importance", str(folder), "--data", str(data), "--samples", str(samples), "--seq-len", str(seq_len),
            "--out", str(root / f"imp{samples}x{seq_len}"), "--device", "cpu"]})  # fmt: skip
        tokens = samples * seq_len
        print(f"| {samples} x {seq_len} | {tokens:,} | {result['seconds']:.1f} | "
              f"{result['process_peak'] / GIB:.2f} GiB | {result['seconds'] / tokens * 1000:.3f} |")  # fmt: skip


# ----- plans against measurements, sharded importance ------------------------------------------------------
def plans_check(root: Path, args) -> None:
    import torch

    from compressor import planning
    from compressor.config import HybridConfig
    from compressor.importance import Importance
    from compressor.train import TrainConfig

    preset, overrides = SIZES[args.plan_model]
    model = root / "plan_model"
    settings = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    run_stage("init", {"argv": ["init", str(model), "--preset", preset, *settings, "--dtype", "float32"]})
    config = HybridConfig.from_file(model)
    data = root / "tokens.npy"
    samples, seq_len = 4, args.plan_seq_len
    rows = []

    # importance: one process, then two sharded gloo processes
    one = run_stage("sharded importance", {"model": str(model), "data": str(data), "samples": samples,
                                           "seq_len": seq_len, "out": str(root / "imp1")})  # fmt: skip
    plan = planning.importance_plan(config, seq_len=seq_len, dtype=torch.float32)
    rows.append(("importance, 1 process", plan.total(1), one["peak"] - one["baseline"]))
    two = run_stage("sharded importance", {"model": str(model), "data": str(data), "samples": samples,
                                           "seq_len": seq_len, "out": str(root / "imp2")}, nproc=2)  # fmt: skip
    for worker in two:
        rows.append((f"importance, 2 processes (rank {worker['rank']})", plan.total(2),
                     worker["peak"] - worker["baseline"]))  # fmt: skip
    a, b = Importance.load(root / "imp1"), Importance.load(root / "imp2")
    worst = max(
        float(((x - y).abs() / y.abs().clamp(min=1e-12)).max())
        for x, y in [(a.hidden, b.hidden), *[(a.mamba[i], b.mamba[i]) for i in a.mamba],
                     *[(a.ffn[i], b.ffn[i]) for i in a.ffn], (a.block_influence, b.block_influence)]
    )  # fmt: skip
    single = one["peak"] - one["baseline"]
    shares = [(w["peak"] - w["baseline"]) / single for w in two]

    # scoring: `compress prune` with held-out data scores candidates against the source
    shape = export_shape(config)
    scoring = run_stage("prune", {"argv": [
        "prune", str(model), "--export-config", json.dumps(shape), "--importance", str(root / "imp1"), "--data",
        str(data), "--score-samples", str(samples), "--seq-len", str(seq_len), "--out", str(root / "pruned"),
        "--device", "cpu"]})  # fmt: skip
    candidate = HybridConfig.from_file(root / "pruned")
    plan = planning.scoring_plan(config, candidate, seq_len=seq_len, batches=samples, dtype=torch.float32)
    rows.append(("scoring (prune, 1 candidate)", plan.total(1), scoring["process_peak"] - scoring["baseline"]))

    # one distillation step, the pruned model from the source
    distill = dict(student=str(root / "pruned"), teacher=str(model), out=str(root / "run"), data=str(data),
                   seq_len=seq_len, batch_size=1, micro_batch_size=1, steps=1, valid_fraction=0.05,
                   eval_sequences=1, device="cpu")  # fmt: skip
    step = run_stage("distill step", {"config": distill})
    plan = planning.training_plan(TrainConfig(**distill), candidate, config, "cpu")
    rows.append(("distill step", plan.total(1), step["process_peak"] - step["baseline"]))

    print(f"\nmemory plans against measured peaks: the {args.plan_model} model ({config.hidden_size} hidden, "
          f"{config.num_blocks} blocks), fp32, {seq_len}-token sequences\n")  # fmt: skip
    print("| stage | plan | measured (peak RSS - RSS before loading) | plan / measured |")
    print("|---|---:|---:|---:|")
    for label, planned, measured in rows:
        print(f"| {label} | {planned / GIB:.3f} GiB | {measured / GIB:.3f} GiB | {planned / measured:.2f} |")
    print(f"\nsharded importance, 2 gloo processes: per-process peak / single-process peak = "
          f"{', '.join(format(s, '.2f') for s in shares)} (goal <= 0.65); parameters held "
          f"{', '.join(format(w['local_parameters'], ',') for w in two)} of {one['local_parameters']:,}; "
          f"largest relative score difference {worst:.1e} (goal <= 1e-5)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small,1/8,1/4,1/2,4b")
    parser.add_argument("--samples", type=int, default=2, help="Importance calibration sequences.")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--tokens", action="store_true", help="Also: importance at growing token counts.")
    parser.add_argument("--token-model", default="1/4")
    parser.add_argument("--plans", action="store_true", help="Also: plans against measured peaks, sharded importance.")
    parser.add_argument("--plan-model", default="1/4")
    parser.add_argument("--plan-seq-len", type=int, default=512)
    parser.add_argument("--skip-scale", action="store_true", help="Only the --tokens / --plans sections.")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints (in --tmp).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, json.loads(args.params))
        rank = os.environ.get("RANK", "0")
        Path(args.results, f"rank{rank}.json").write_text(json.dumps(result))
        return

    import numpy as np

    from compressor.budget import num_parameters
    from compressor.presets import get_preset

    names = args.models.split(",") if not args.skip_scale else []
    need = sum(2.2 * 2 * num_parameters(get_preset(SIZES[n][0]).replace(**SIZES[n][1])) for n in names[-1:])
    free = shutil.disk_usage(args.tmp).free
    print(f"free disk in {args.tmp}: {free / GIB:.1f} GiB; the largest model needs about {need / GIB:.1f} GiB")
    if need > 0.9 * free:
        raise SystemExit(f"not enough free disk in {args.tmp}: choose another --tmp or fewer --models")
    root = Path(tempfile.mkdtemp(prefix="compressor-scale-", dir=args.tmp))
    try:
        rng = np.random.default_rng(0)
        # token ids below the smallest vocabulary (tiny's 512): random weights make any id as good as another
        np.save(root / "tokens.npy", rng.integers(0, 512, size=64 * 1024).astype(np.int32))
        rows = []
        for name in names:
            print(f"measuring {name} ...", flush=True)
            rows.append(measure_model(name, root, root / "tokens.npy", args))
        if rows:
            print_scale_table(rows, args)
        if args.tokens:
            token_table(root, args)
        if args.plans:
            plans_check(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
