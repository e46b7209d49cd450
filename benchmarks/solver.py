"""How long MiniPuzzle's exact solver takes on config-only searches (no weights: a block's damage is its share
of the parameters, so the blocks of a kind tie), where most of a dry run's proposal time goes.

    python benchmarks/solver.py                 # the figures in docs/search.md
    python benchmarks/solver.py --repeats 1

Each row runs `MiniPuzzleStrategy().propose` `--repeats` times in this process and prints every time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.budget import Budget, Workload, get_gpu  # noqa: E402
from compressor.presets import get_preset  # noqa: E402
from strategies.minipuzzle import MiniPuzzleStrategy  # noqa: E402


def cases() -> dict[str, tuple]:
    reference = Budget(memory=1, context=8192).memory_of(get_preset("47b")).total
    throughput = Budget(context=24576, gpu=get_gpu("a10g"), min_speedup=1.2, workload=Workload(8192, 16384, 1))
    return {
        "56b under the 47b's memory at 8k": (get_preset("56b"), Budget(memory=reference, context=8192)),
        "12b-v2 at 1.2x a10g throughput": (get_preset("12b-v2"), throughput),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'search':<36} {'targets':>8}  seconds per proposal")
    for name, (source, budget) in cases().items():
        times, targets = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            targets = MiniPuzzleStrategy().propose(source, None, budget)
            times.append(time.perf_counter() - start)
        print(f"{name:<36} {len(targets):>8}  {', '.join(f'{t:.1f}' for t in times)}")


if __name__ == "__main__":
    main()
