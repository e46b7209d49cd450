"""How good are the importance scores? Prune the example model along one axis at a time, without
retraining, and compare the validation loss of keeping what our scores rank highest against keeping a
random choice (mean of several seeds) and against weight magnitude. Then the cost of estimation against
a plain forward pass over the same data.

    python benchmarks/importance.py            # the tables in docs/importance.md (about 10 minutes on 2 CPU cores)
    python benchmarks/importance.py --quick    # fewer sequences and seeds
    python benchmarks/importance.py --cost     # only the cost of estimation

Scores come from `examples/data/sample.txt` (training plays); losses from `examples/data/valid.txt` (held-
out plays). Every variant is pruned by `compressor.prune.prune` (real slicing, no masks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import distributed  # noqa: E402
from compressor.checkpoint import load_model  # noqa: E402
from compressor.data import load_sequences, load_tokenizer  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.importance import EstimateProgress, Importance, ImportanceOptions, estimate  # noqa: E402
from compressor.model import Attention, MambaMixer  # noqa: E402
from compressor.prune import prune  # noqa: E402
from compressor.target import Target  # noqa: E402


def magnitude_scores(model) -> Importance:
    """Weight-magnitude baseline: the L2 norm of the weights that read or write each channel."""
    hidden = model.backbone.embeddings.weight.square().sum(0) + model.lm_head.weight.square().sum(0)
    ffn, mamba, attention, blocks = {}, {}, {}, []
    for block in model.backbone.layers:
        m = block.mixer
        if isinstance(m, MambaMixer):
            inner = m.intermediate
            rows = m.in_proj.weight.square().sum(1)  # [z, x, B, C, dt]
            per_channel = rows[:inner] + rows[inner : 2 * inner] + m.out_proj.weight.square().sum(0)
            mamba[block.index] = per_channel.sqrt().view(m.num_heads, m.head_dim)
            hidden = hidden + m.in_proj.weight.square().sum(0) + m.out_proj.weight.square().sum(1)
            blocks.append(m.out_proj.weight.norm())
        elif isinstance(m, Attention):
            per_channel = m.q_proj.weight.square().sum(1) + m.o_proj.weight.square().sum(0)
            attention[block.index] = per_channel.sqrt().view(m.num_heads, m.head_dim)
            hidden = hidden + m.q_proj.weight.square().sum(0) + m.o_proj.weight.square().sum(1)
            blocks.append(m.o_proj.weight.norm())
        else:
            ffn[block.index] = m.up_proj.weight.norm(dim=1) * m.down_proj.weight.norm(dim=0)
            hidden = hidden + m.up_proj.weight.square().sum(0) + m.down_proj.weight.square().sum(1)
            blocks.append(m.down_proj.weight.norm())
    return Importance(
        hidden=hidden.sqrt(), ffn=ffn, mamba=mamba, attention=attention, block_influence=torch.stack(blocks)
    )


def random_scores(reference: Importance, seed: int) -> Importance:
    gen = torch.Generator().manual_seed(seed)

    def rand(t):
        return torch.rand(t.shape, generator=gen)

    return Importance(
        hidden=rand(reference.hidden),
        ffn={i: rand(t) for i, t in reference.ffn.items()},
        mamba={i: rand(t) for i, t in reference.mamba.items()},
        attention={i: rand(t) for i, t in reference.attention.items()},
        block_influence=rand(reference.block_influence),
    )


def targets(config, fraction: float) -> dict[str, Target]:
    """One target per axis removing `fraction` of it."""

    def keep(value, multiple=1):
        return max(multiple, round(value * (1 - fraction) / multiple) * multiple)

    blocks = round(config.num_blocks * fraction)
    return {
        "hidden channels": Target.uniform(config, hidden_size=keep(config.hidden_size)),
        "FFN neurons": Target.uniform(config, intermediate_size=keep(config.intermediate_size)),
        "Mamba heads": Target.uniform(config, mamba_num_heads=keep(config.mamba_num_heads, config.n_groups)),
        "Mamba head_dim": Target.uniform(config, mamba_head_dim=keep(config.mamba_head_dim)),
        "attention heads": Target.uniform(
            config, num_attention_heads=keep(config.num_attention_heads, config.num_key_value_heads)
        ),
        "blocks": blocks,  # filled per scoring method (which blocks depends on the scores)
    }


def depth_target(config, scores: Importance, count: int, method: str) -> Target:
    order = scores.block_scores(method).argsort()[:count].tolist()
    return Target.uniform(config, drop_blocks=tuple(order))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "model"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cost", action="store_true", help="only the cost of estimation (about 30 s)")
    args = parser.parse_args()
    seq_len = 256
    calib_n, valid_n, seeds = (16, 16, 2) if args.quick else (64, 64, 5)
    model = load_model(args.model, dtype="float32").eval()
    tokenizer = load_tokenizer(args.model)
    calib = load_sequences(
        ROOT / "examples/data/sample.txt", seq_len=seq_len, tokenizer=tokenizer, max_sequences=calib_n
    )
    valid = load_sequences(
        ROOT / "examples/data/valid.txt", seq_len=seq_len, tokenizer=tokenizer, max_sequences=valid_n
    )

    def batches(data):
        return list(data.batches(8, shuffle=False, drop_last=False))

    if not args.cost:
        quality(model, args.model, calib, valid, seeds, batches)
    cost(model, batches(calib), calib_n, seq_len)


def quality(model, path: str, calib, valid, seeds, batches) -> None:
    """The table: held-out loss after pruning one axis by our scores, random ones and weight magnitude."""

    def loss(target, scores) -> float:
        return evaluate(prune(model, scores, target), batches(valid)).loss

    calib_n, valid_n, seq_len = len(calib), len(valid), calib.seq_len
    ours = estimate(model, batches(calib), ImportanceOptions(drop_one="kl"))
    ssm_out = estimate(model, batches(calib), ImportanceOptions(mamba_signal="ssm_out"))
    magnitude = magnitude_scores(model)
    base = evaluate(model, batches(valid)).loss
    print(f"example model {path}: validation loss {base:.4f} unpruned ({valid_n} x {seq_len} held-out tokens)")
    print(f"scores from {calib_n} x {seq_len} calibration tokens; random = mean of {seeds} seeds\n")
    print("| axis | removed | ours | random | magnitude |")
    print("|---|---:|---:|---:|---:|")
    for fraction in (0.25, 0.5):
        for axis, target in targets(model.config, fraction).items():
            if axis == "blocks":
                count = target
                rand = [
                    loss(depth_target(model.config, random_scores(ours, s), count, "influence"), ours)
                    for s in range(seeds)
                ]
                mag = loss(depth_target(model.config, magnitude, count, "influence"), ours)
                for method, label in (("influence", "blocks (block influence)"), ("drop", "blocks (drop-one KL)")):
                    mine = loss(depth_target(model.config, ours, count, method), ours)
                    print(f"| {label} | {count} of {model.config.num_blocks} | {mine:.4f} | "
                          f"{statistics.mean(rand):.4f} | {mag:.4f} |", flush=True)  # fmt: skip
                continue
            mine = loss(target, ours)
            rand = statistics.mean(loss(target, random_scores(ours, s)) for s in range(seeds))
            mag = loss(target, magnitude)
            print(f"| {axis} | {fraction:.0%} | {mine:.4f} | {rand:.4f} | {mag:.4f} |", flush=True)
            if axis.startswith("Mamba"):
                alt = loss(target, ssm_out)
                print(f"| {axis} (`--mamba-signal ssm_out`) | {fraction:.0%} | {alt:.4f} | {rand:.4f} | {mag:.4f} |")


def cost(model, data, calib_n: int, seq_len: int) -> None:
    """Activation importance (hooks) against a plain forward over the same data; and with its progress saved
    after every batch but the last (`compress importance` saves it at most 20 times a pass)."""
    timings = {"plain forward": [], "importance (hooks)": [], "saved": []}
    world = distributed.World(device=torch.device("cpu"))
    with torch.inference_mode(), tempfile.TemporaryDirectory() as scratch:
        for _ in range(3):
            start = time.perf_counter()
            for ids in data:
                model(ids)
            timings["plain forward"].append(time.perf_counter() - start)
            start = time.perf_counter()
            estimate(model, data)
            timings["importance (hooks)"].append(time.perf_counter() - start)
            progress = EstimateProgress(Path(scratch) / "progress.safetensors", world, {})
            start = time.perf_counter()
            estimate(model, data, progress=progress)
            timings["saved"].append(time.perf_counter() - start)
            progress.path.unlink()
    plain, hooks, saved = (min(timings[k]) for k in ("plain forward", "importance (hooks)", "saved"))
    print(f"\ncost over {calib_n} x {seq_len} tokens (best of 3): plain forward {plain:.2f} s, importance "
          f"{hooks:.2f} s, ratio {hooks / plain:.2f}x; with its progress saved after {len(data) - 1} of "
          f"{len(data)} batches {saved:.2f} s, {saved / hooks:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
