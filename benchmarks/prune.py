"""Does the Minitron search choose well? Prune the example model under a memory budget and compare the
chosen candidate's held-out validation loss (no retraining) with randomly drawn candidates that fit the
same budget (each pruned with the same importance scores).

    python benchmarks/prune.py                  # the table in docs/pruning.md
    python benchmarks/prune.py --random 4       # fewer random candidates

Importance and the search's KL proxy use `examples/data/sample.txt` (training plays); the losses below
are on `examples/data/valid.txt` (held-out plays).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.budget import Budget, num_parameters, parse_context, parse_size  # noqa: E402
from compressor.checkpoint import load_model  # noqa: E402
from compressor.data import load_sequences, load_tokenizer  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.importance import estimate  # noqa: E402
from compressor.pipelines.ranking import ProxyScorer, rank  # noqa: E402
from compressor.prune import prune  # noqa: E402
from compressor.target import Target  # noqa: E402
from strategies.grid import DEPTH_KINDS  # noqa: E402
from strategies.minitron import MinitronOptions, MinitronStrategy  # noqa: E402


def every_fitting_target(strategy, source, importance, budget):
    """All grid points that meet the budget (checked one by one), and all grid points."""
    import itertools

    grid = strategy.grid(source)
    scores = importance.block_scores("influence").tolist()
    ranked = sorted(range(source.num_blocks), key=lambda i: scores[i])
    order = {kind: [i for i in ranked if source.block(i).kind == kind] for kind in DEPTH_KINDS}
    points = list(
        itertools.product(
            grid["hidden"], grid["ffn"], grid["mamba_heads"], grid["head_dim"], strategy.depth_choices(source)
        )
    )
    fitting = []
    for hidden, ffn, heads, head_dim, depth in points:
        drop = [i for kind, n in zip(DEPTH_KINDS, depth, strict=True) for i in order[kind][:n]]
        target = Target.uniform(source, hidden_size=hidden, intermediate_size=ffn, mamba_num_heads=heads,
                                mamba_head_dim=head_dim, drop_blocks=tuple(drop))  # fmt: skip
        if not budget.violations(target.config(source), source):
            fitting.append(target)
    return fitting, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "model"))
    parser.add_argument("--target-mem", default="20MiB")
    parser.add_argument("--ctx", default="4k")
    parser.add_argument("--random", type=int, default=8, help="random fitting candidates to compare with")
    args = parser.parse_args()
    seq_len = 256
    model = load_model(args.model, dtype="float32").eval()
    tokenizer = load_tokenizer(args.model)
    sample = load_sequences(ROOT / "examples/data/sample.txt", seq_len=seq_len, tokenizer=tokenizer, max_sequences=96)
    valid = load_sequences(ROOT / "examples/data/valid.txt", seq_len=seq_len, tokenizer=tokenizer, max_sequences=128)
    calibration = list(sample.head(64).batches(8, shuffle=False, drop_last=False))
    held_out = [ids for i, ids in enumerate(sample.batches(8, shuffle=False, drop_last=False)) if i >= 8]
    importance = estimate(model, calibration)
    budget = Budget(memory=parse_size(args.target_mem), context=parse_context(args.ctx))
    strategy = MinitronStrategy(MinitronOptions(axes=("hidden", "ffn", "mamba_heads", "mamba_head_dim", "depth")))
    scorer = ProxyScorer(model, importance, held_out)
    proposals = strategy.propose(model.config, importance, budget)
    candidates = rank(proposals, model.config, budget, limit=strategy.top_k, scorer=scorer)
    fitting = every_fitting_target(strategy, model.config, importance, budget)
    grid_points = len(fitting[1])
    fitting = fitting[0]

    def val_loss(target) -> float:
        return evaluate(prune(model, importance, target), valid.batches(8, shuffle=False, drop_last=False)).loss

    base = evaluate(model, valid.batches(8, shuffle=False, drop_last=False)).loss
    chosen = candidates[0]
    chosen_loss = val_loss(chosen.target)
    rng = random.Random(0)
    drawn = rng.sample(fitting, min(args.random, len(fitting)))
    random_losses = [val_loss(t) for t in drawn]
    source_params = num_parameters(model.config)
    print(f"budget {budget.describe()}; {grid_points} grid points, {len(fitting)} fit; "
          f"{len(candidates)} scored by KL on held-out calibration text")  # fmt: skip
    print("\n| model | parameters | memory | validation loss |")
    print("|---|---:|---:|---:|")
    full = budget.memory_of(model.config).total / 2**20
    print(f"| original | {source_params:,} | {full:.1f} MiB | {base:.4f} |")
    print(f"| chosen: {chosen.label} | {chosen.params:,} ({chosen.params / source_params:.0%}) | "
          f"{chosen.memory_bytes / 2**20:.1f} MiB | {chosen_loss:.4f} |")  # fmt: skip
    for target, loss in zip(drawn, random_losses, strict=True):
        config = target.config(model.config)
        print(f"| random fitting: {target.describe(model.config)} | {num_parameters(config):,} | "
              f"{budget.memory_of(config).total / 2**20:.1f} MiB | {loss:.4f} |")  # fmt: skip
    print(f"\nchosen {chosen_loss:.4f} vs random fitting candidates: mean {statistics.mean(random_losses):.4f}, "
          f"best {min(random_losses):.4f}, worst {max(random_losses):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
