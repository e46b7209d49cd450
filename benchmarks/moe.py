"""MoE block forward speed: compressor's expert dispatch vs transformers' NemotronHMoE (its default
`grouped_mm` experts and its `eager` loop) on the same weights, fp32 on the CPU, plus a token-by-token
loop for scale. One MoE mixer (router, routed experts, shared expert) on `tokens` tokens; the median of
`--repeats` timed passes after a warm-up. Run it on an otherwise idle machine.

    python benchmarks/moe.py                    # Nano-3-shaped block scaled down (hidden 1024, 64 experts, top-6)
    python benchmarks/moe.py --quick
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

from compressor.checkpoint import save_model  # noqa: E402
from compressor.model import HybridLM  # noqa: E402
from compressor.presets import get_preset  # noqa: E402

SHAPES = {
    "full": dict(hidden_size=1024, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=704,
                 moe_shared_expert_intermediate_size=1408, tokens=2048),
    "quick": dict(hidden_size=256, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                  moe_shared_expert_intermediate_size=256, tokens=512),
}  # fmt: skip


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import transformers

    shape = dict(SHAPES["quick" if args.quick else "full"])
    tokens = shape.pop("tokens")
    config = get_preset("tiny-moe").replace(hybrid_override_pattern="E", num_attention_heads=4, **shape)
    torch.manual_seed(0)
    ours = HybridLM(config).eval()
    gate = ours.backbone.layers[0].mixer.gate
    gate.weight.normal_(0.0, 1.5 / config.hidden_size**0.5)  # spread routing, as a trained router does
    gate.e_score_correction_bias.normal_(0.0, 0.3)
    with tempfile.TemporaryDirectory() as folder:
        save_model(ours, Path(folder) / "moe")
        theirs = transformers.NemotronHForCausalLM.from_pretrained(Path(folder) / "moe").eval()
    x = torch.randn(1, tokens, config.hidden_size)
    mixer, reference = ours.backbone.layers[0].mixer, theirs.model.layers[0].mixer
    results = {"compressor (sort by expert, loop over experts)": _time(lambda: mixer(x), args.repeats)}
    for impl in ("grouped_mm", "eager"):
        theirs.set_experts_implementation(impl)
        results[f"transformers NemotronHMoE ({impl})"] = _time(lambda: reference(x), args.repeats)
    torch.testing.assert_close(mixer(x), reference(x), atol=1e-4, rtol=1e-4)
    per_token = x[:, : max(tokens // 16, 1)]
    loop = _time(lambda: [mixer(per_token[:, t : t + 1]) for t in range(per_token.shape[1])], 1)
    results["token by token (Python loop, scaled)"] = loop * tokens / per_token.shape[1]
    print(f"MoE block: {shape}, {tokens} tokens, fp32, {torch.get_num_threads()} CPU threads")
    for name, seconds in results.items():
        print(f"  {name:52s} {seconds * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
