"""The MoE example of docs/moe.md: a tiny hybrid MoE, pruned to an active-parameter budget and distilled.

1. Upcycle the example model (`examples/model`, or whatever checkpoint `--model` names) into a hybrid MoE:
   each MLP block becomes an MoE block computing nearly the same function. Its most important FFN neurons
   (activation importance on calibration text) become the shared expert; the others are copied into every
   routed expert with a little relative noise; a random router picks the top-k experts, whose weights sum
   to 1 (norm_topk_prob, routed_scaling_factor 1), so the routed experts add up to the rest of the MLP.
2. Train it briefly on `examples/data/sample.txt` (`compress train`): the experts drift apart.
3. Prune it to an active-parameter budget (and a total one, so experts go too) with `compress prune`.
4. Distill the trained MoE into the pruned one (`compress distill`).
5. Evaluate all of them on the held-out plays (`compress eval`) and print the before/after table
   (parameters total / active from `compress info`).

Every step but the upcycling is a `compress` command, run as it would be by hand (the commands are
printed). About 5 minutes on 2 CPU cores; `--quick` is a smoke run.

    python benchmarks/moe_example.py                 # the table in docs/moe.md
    python benchmarks/moe_example.py --quick --out runs/moe_quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from compressor.budget import parse_params  # noqa: E402
from compressor.checkpoint import load_model, save_model  # noqa: E402
from compressor.config import KIND_CHARS, MLP, MOE  # noqa: E402
from compressor.data import load_sequences  # noqa: E402
from compressor.importance import Importance, estimate  # noqa: E402
from compressor.model import HybridLM  # noqa: E402


@torch.no_grad()
def upcycle(
    model: HybridLM,
    importance: Importance,
    *,
    experts: int,
    top_k: int,
    shared: int,
    noise: float = 0.01,
    seed: int = 0,
) -> HybridLM:
    """The model with every MLP block turned into an MoE block of `experts` routed experts (top `top_k`) and
    a shared expert of `shared` FFN neurons (module docstring). Other blocks are copied unchanged."""
    source = model.config
    ffn = source.intermediate_size
    if not 0 < shared < ffn:
        raise SystemExit(f"--shared must be between 1 and the MLP width - 1 ({ffn - 1}), got {shared}")
    config = source.replace(
        hybrid_override_pattern=source.pattern.replace(KIND_CHARS[MLP], KIND_CHARS[MOE]),
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=ffn - shared,
        moe_shared_expert_intermediate_size=shared,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        mlp_bias=False,
    )
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if (
            name.startswith("backbone.layers.")
            and parts[3] == "mixer"
            and model.backbone.layers[int(parts[2])].kind == MLP
        ):
            continue  # rebuilt below
        state[name] = tensor
    for block in model.backbone.layers:
        if block.kind != MLP:
            continue
        prefix = f"backbone.layers.{block.index}.mixer."
        order = importance.ffn[block.index].argsort(descending=True)
        kept, routed = order[:shared].sort().values, order[shared:].sort().values
        up, down = block.mixer.up_proj.weight, block.mixer.down_proj.weight  # (ffn, hidden), (hidden, ffn)
        state[prefix + "shared_experts.up_proj.weight"] = up[kept]
        state[prefix + "shared_experts.down_proj.weight"] = down[:, kept]
        for e in range(experts):
            for name, weight in (("up_proj", up[routed]), ("down_proj", down[:, routed])):
                jitter = 1 + noise * torch.randn(weight.shape, generator=gen)
                state[prefix + f"experts.{e}.{name}.weight"] = weight * jitter
        hidden = source.hidden_size
        state[prefix + "gate.weight"] = torch.randn(experts, hidden, generator=gen) / hidden**0.5
        state[prefix + "gate.e_score_correction_bias"] = torch.zeros(experts)
    with torch.device("meta"):
        out = HybridLM(config)
    out.load_state_dict({k: v.float().clone() for k, v in state.items()}, assign=True)
    return out.eval()


def compress(*args: str, json_output: bool = False) -> dict | list | None:
    """Run one `compress` command (this checkout's cli.py), print it, return its --json output."""
    command = [str(a) for a in args] + (["--json"] if json_output else [])
    print("$ compress " + " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *command],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE if json_output else None,
        text=True,
    )
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return json.loads(result.stdout) if json_output else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="examples/model")
    parser.add_argument("--data", default="examples/data/sample.txt")
    parser.add_argument("--valid", default="examples/data/valid.txt")
    parser.add_argument("--out", default="runs/moe_example")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--shared", type=int, default=None, help="Shared-expert FFN (default: a third of the MLP's).")
    parser.add_argument("--train-tokens", default="100k")
    parser.add_argument("--active", default=None, help="Active-parameter budget (default: the dense model's).")
    parser.add_argument("--total", default=None, help="Parameter budget (default: 70%% of the upcycled model's).")
    parser.add_argument("--distill-tokens", default="200k")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="A smoke run: few tokens everywhere.")
    args = parser.parse_args()
    eval_sequences = "128"
    if args.quick:
        args.train_tokens, args.distill_tokens, eval_sequences = "16k", "16k", "16"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    common = ["--seq-len", str(args.seq_len), "--device", "cpu"]
    training = [*common, "--batch-size", "16", "--micro-batch-size", "8", "--eval-sequences", "16", "--quiet"]

    # 1. upcycle
    dense = load_model(ROOT / args.model, dtype="float32")
    calibration = load_sequences(ROOT / args.data, seq_len=args.seq_len, tokenizer=ROOT / args.model)
    scores = estimate(dense, calibration.head(32).batches(8, shuffle=False))
    shared = args.shared or dense.config.intermediate_size // 3
    moe = upcycle(dense, scores, experts=args.experts, top_k=args.top_k, shared=shared)
    save_model(moe, out / "upcycled", tokenizer_from=ROOT / args.model, overwrite=True)  # a rerun replaces it
    print(f"upcycled {args.model} into {out / 'upcycled'} ({time.perf_counter() - started:.0f} s)", flush=True)

    # 2. train briefly, 3. prune to the budgets, 4. distill, 5. evaluate
    compress("train", out / "upcycled", "--data", args.data, "--tokens", args.train_tokens, *training, "--lr", "3e-4",
             "--min-lr", "3e-5", "--eval-every", "1000", "--out", out / "trained", "--overwrite")  # fmt: skip
    trained = out / "trained" / "model"
    info = {name: compress("info", path, json_output=True) for name, path in (("dense", args.model), ("moe", trained))}
    active = args.active or str(info["dense"]["parameters"]["total"])
    total = args.total or str(int(0.7 * info["moe"]["parameters"]["total"]))
    compress("prune", trained, "--target-active-params", active, "--target-params", total,
             "--axes", "hidden,moe_experts,moe_ffn,moe_shared_ffn,depth", "--data", args.data, "--samples", "64",
             "--score-samples", "32", "--batch-size", "8", *common, "--out", out / "pruned", "--overwrite")  # fmt: skip
    compress("distill", trained, out / "pruned", "--data", args.data, "--tokens", args.distill_tokens, *training,
             "--lr", "1e-3", "--min-lr", "1e-4", "--eval-every", "1000", "--out", out / "distilled",
             "--overwrite")  # fmt: skip
    models = {
        "dense original (`examples/model`)": args.model,
        f"upcycled: {args.experts} experts, top-{args.top_k}": out / "upcycled",
        f"upcycled + trained ({args.train_tokens} tokens)": trained,
        "pruned": out / "pruned",
        f"pruned + distilled ({args.distill_tokens} tokens)": out / "distilled" / "model",
    }
    results = compress("eval", *models.values(), "--teacher", trained, "--data", args.valid, "--max-sequences",
                       eval_sequences, "--batch-size", "8", *common, json_output=True)  # fmt: skip
    label = json.loads((out / "pruned" / "compression.json").read_text())["candidates"][0]["label"]

    print(f"\nheld-out: {args.valid}, {eval_sequences} x {args.seq_len} tokens; KL and top-1 to the trained MoE")
    print("| model | parameters | active | loss | perplexity | KL to trained MoE | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, path), result in zip(models.items(), results, strict=True):
        params = compress("info", path, json_output=True)["parameters"]
        name = f"pruned ({label})" if name == "pruned" else name
        print(f"| {name} | {params['total']:,} | {params['active']:,} | {result['loss']:.4f} | "
              f"{result['perplexity']:.2f} | {result['kl']:.4f} | {100 * result['top1_agreement']:.1f}% |")  # fmt: skip
    print(
        f"\nbudget: <= {parse_params(active):,} active and <= {parse_params(total):,} parameters; "
        f"{time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
