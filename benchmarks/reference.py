"""How far are compressor's logits from transformers' NemotronHForCausalLM on trained checkpoints?

The Mamba step size softplus(dt + dt_bias) is where releases differ: transformers 5.25 and newer clamp it to
config.json's time_step_limit, as compressor, mamba-ssm and the original implementation do; 5.6-5.24
ignored time_step_limit and floored it at time_step_min (0.001). Checkpoints carry time_step_limit [0, inf].
This script loads each checkpoint in both engines (fp32, the same folder) and reports, over held-out text,
with the installed transformers:

1. as shipped: the share of (token, Mamba head) step sizes under time_step_min, max and mean |logit
   difference|, and both losses;
2. with time_step_limit raised to [time_step_min, inf] (what the retired `--hf-exact` wrote): max |logit
   difference| between the two engines then, compressor's loss then, and how far that moves compressor's
   own logits (a raised limit is another model to engines that ignore the key: vLLM, llama.cpp);
3. whether the installed transformers floors dt (its logits change with time_step_min alone) and how far
   its cached decoding is from its forward pass.

    python benchmarks/reference.py                          # the example model and a pruned child of it
    python benchmarks/reference.py --models runs/quickstart/distilled/model --sequences 16

The pruned child: importance on 32 x 256 tokens of sample.txt, then hidden 192, FFN 512, Mamba 12 heads x
20, and the least influential attention block dropped (the quick start's architecture).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.checkpoint import load_model, save_model  # noqa: E402
from compressor.config import ATTENTION  # noqa: E402
from compressor.data import load_sequences  # noqa: E402
from compressor.importance import estimate  # noqa: E402
from compressor.model import MambaMixer  # noqa: E402
from compressor.prune import prune  # noqa: E402
from compressor.target import Target  # noqa: E402


def pruned_child(model_dir: Path, out: Path) -> Path:
    """The quick start's pruned architecture, cut from `model_dir` with importance on sample.txt."""
    model = load_model(model_dir, dtype="float32")
    sample = load_sequences(ROOT / "examples/data/sample.txt", seq_len=256, tokenizer=model_dir, max_sequences=32)
    scores = estimate(model, sample.batches(8, shuffle=False))
    influence = scores.block_scores("influence").tolist()
    attention = [spec.index for spec in model.config.blocks if spec.kind == ATTENTION]
    drop = min(attention, key=influence.__getitem__)
    target = Target.uniform(
        model.config, hidden_size=192, intermediate_size=512, mamba_num_heads=12, mamba_head_dim=20, drop_blocks=(drop,)
    )
    return save_model(prune(model, scores, target), out, tokenizer_from=model_dir, overwrite=True)


def dt_below_floor(model, batches: list[torch.Tensor]) -> float:
    """Share of (token, Mamba head) values of softplus(dt + dt_bias) under time_step_min."""
    floor = model.config.time_step_min
    counts = torch.zeros(2, dtype=torch.float64)

    def hook(mixer, args, output):
        dt = output[..., -mixer.num_heads :]  # in_proj's last H outputs are dt
        step = torch.nn.functional.softplus(dt.float() + mixer.dt_bias.float())
        counts[0] += (step < floor).sum()
        counts[1] += step.numel()

    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    handles = [m.in_proj.register_forward_hook(lambda mod, a, o, m=m: hook(m, a, o)) for m in mixers]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for handle in handles:
        handle.remove()
    return float(counts[0] / counts[1])


def edited_copy(folder: Path, tmp: Path, name: str, edit) -> Path:
    """A copy of a checkpoint folder with its config.json edited by `edit(path)`."""
    out = tmp / name
    shutil.copytree(folder, out)
    edit(out)
    return out


def set_config(folder: Path, **values) -> None:
    file = folder / "config.json"
    raw = json.loads(file.read_text())
    raw.update(values)
    file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def decode_gap(theirs, ids: torch.Tensor, prefill: int = 64, steps: int = 16) -> float:
    """max |logits of transformers' cached one-token steps - its full forward's| at the same positions."""
    with torch.no_grad():
        full = theirs(ids[:, : prefill + steps], use_cache=False).logits[:, prefill:]
        cache = theirs(ids[:, :prefill], use_cache=True).cache
        gap = 0.0
        for t in range(steps):
            out = theirs(ids[:, prefill + t : prefill + t + 1], cache=cache, use_cache=True)
            cache = out.cache
            gap = max(gap, float((out.logits[:, -1] - full[:, t]).abs().max()))
    return gap


def compare(folder: Path, batches: list[torch.Tensor]) -> dict[str, float]:
    import transformers

    def hf(path: Path):
        return transformers.NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    time_step_min = json.loads((folder / "config.json").read_text()).get("time_step_min", 0.001)
    with tempfile.TemporaryDirectory() as tmp:
        raise_limit = lambda p: set_config(p, time_step_limit=[time_step_min, math.inf])  # noqa: E731
        raised = edited_copy(folder, Path(tmp), "raised", raise_limit)
        no_min = edited_copy(folder, Path(tmp), "no_min", lambda p: set_config(p, time_step_min=0.0))
        models = {
            "ours": load_model(folder, dtype="float32"),
            "theirs": hf(folder),
            "ours_raised": load_model(raised, dtype="float32"),
            "theirs_raised": hf(raised),
            "theirs_no_min": hf(no_min),
        }
    pairs = {"shipped": ("ours", "theirs"), "raised": ("ours_raised", "theirs_raised"),
             "moved": ("ours_raised", "ours"), "floors": ("theirs", "theirs_no_min")}  # fmt: skip
    diffs = {name: 0.0 for name in pairs}  # max |logit difference| of each pair
    losses = dict.fromkeys(models, 0.0)
    abs_sum, count, tokens = 0.0, 0, 0
    with torch.no_grad():
        for ids in batches:
            logits = {
                name: model(ids, use_cache=False).logits if name.startswith("theirs") else model(ids)
                for name, model in models.items()
            }
            for name, (a, b) in pairs.items():
                diffs[name] = max(diffs[name], float((logits[a] - logits[b]).abs().max()))
            diff = (logits["ours"] - logits["theirs"]).abs()
            abs_sum, count = abs_sum + float(diff.double().sum()), count + diff.numel()
            labels = ids[:, 1:].reshape(-1)
            for name, value in logits.items():
                loss = torch.nn.functional.cross_entropy(value[:, :-1].flatten(0, 1).float(), labels, reduction="sum")
                losses[name] += float(loss)
            tokens += labels.numel()
    return {
        "below": dt_below_floor(models["ours"], batches),
        "max": diffs["shipped"],
        "mean": abs_sum / count,
        "loss_ours": losses["ours"] / tokens,
        "loss_theirs": losses["theirs"] / tokens,
        "raised_max": diffs["raised"],
        "loss_raised": losses["ours_raised"] / tokens,
        "moved_max": diffs["moved"],
        "floors": diffs["floors"] > 0,
        "decode_gap": decode_gap(models["theirs"], batches[0][:2]),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "model"))
    parser.add_argument("--models", nargs="*", default=[], help="more checkpoint folders to compare")
    parser.add_argument("--sequences", type=int, default=32, help="held-out sequences of 256 tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = Path(args.model)
    valid = load_sequences(
        ROOT / "examples/data/valid.txt", seq_len=256, tokenizer=model_dir, max_sequences=args.sequences
    )
    batches = list(valid.batches(8, shuffle=False, drop_last=False))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"example model": model_dir, "pruned child": pruned_child(model_dir, Path(tmp) / "pruned")}
        folders.update({str(m): Path(m) for m in args.models})
        rows = {name: compare(folder, batches) for name, folder in folders.items()}
    tokens = next(iter(rows.values()))["tokens"]
    floors = {r["floors"] for r in rows.values()}
    behaviour = {
        frozenset({True}): "floors dt at time_step_min, ignores time_step_limit",
        frozenset({False}): "clamps dt to time_step_limit",
    }.get(frozenset(floors), "mixed (see the rows)")
    print(f"transformers {transformers_version()}: {behaviour}")
    print(f"held-out: {tokens:,} predicted tokens of examples/data/valid.txt (sequences of 256), fp32\n")
    print("as shipped (time_step_limit [0, inf])")
    print("| model | dt under time_step_min | max abs logit diff | mean abs logit diff | loss compressor | "
          "loss transformers | difference | transformers decode vs forward |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['below']:.2%} | {r['max']:.1e} | {r['mean']:.1e} | {r['loss_ours']:.5f} | "
            f"{r['loss_theirs']:.5f} | {r['loss_theirs'] - r['loss_ours']:+.5f} | {r['decode_gap']:.1e} |"
        )
    print("\ntime_step_limit raised to [time_step_min, inf] (what the retired --hf-exact wrote)")
    print("| model | max abs logit diff | loss compressor | its change | max abs change of compressor's logits |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['raised_max']:.1e} | {r['loss_raised']:.5f} | {r['loss_raised'] - r['loss_ours']:+.5f} | "
            f"{r['moved_max']:.4f} |"
        )


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
