"""From a model and a budget to a pruned checkpoint: importance, a strategy's candidates, a proxy score,
slicing, and the record of how it was chosen.

`prune_to_budget` is what `compress prune` runs:
1. importance: read from a folder (its fingerprint must match the model) or computed on calibration data;
2. candidates: the chosen strategy searches the budget (or `export_config` names the shape directly);
3. scoring: each candidate is pruned and compared with the original model on held-out calibration
   sequences (KL(original || pruned) by default, or the pruned model's LM loss), lower is better;
4. output (atomic): the pruned checkpoint, `compression.json` (source fingerprint, budget, strategy,
   every candidate with its estimated memory, speedup and score, the chosen one, importance options) and
   `export_config.json`, the chosen shape in ModelOpt / Megatron-Bridge terms, to reproduce it at scale.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.budget import Budget, num_parameters
from compressor.checkpoint import fingerprint, load_model, write_checkpoint
from compressor.config import HybridConfig
from compressor.errors import CompressorError
from compressor.evaluate import batch_stats, teacher_targets
from compressor.importance import Importance, ImportanceOptions, estimate
from compressor.losses import LossStats
from compressor.model import HybridLM
from compressor.outputs import atomic_output, check_output
from compressor.prune import Target, prune

EXPORT_KEYS = (
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "mamba_num_heads",
    "mamba_head_dim",
    "num_layers",
)


class ProxyScorer:
    """KL(original || pruned) or the pruned model's LM loss on held-out batches; lower is better.

    The original model's final hidden states are computed once per batch and reused for every candidate."""

    def __init__(self, model: HybridLM, importance: Importance, batches: list[torch.Tensor], metric: str = "kl"):
        if metric not in ("kl", "loss"):
            raise CompressorError(f"--score {metric!r}: use kl or loss")
        if not batches:
            raise CompressorError("no held-out sequences to score candidates on: use more data or fewer --samples")
        self.name = metric
        self.model, self.importance, self.batches = model, importance, batches
        self.references = [teacher_targets(model, ids) for ids in batches] if metric == "kl" else None

    def __call__(self, target: Target) -> float:
        pruned = prune(self.model, self.importance, target).eval()
        stats = LossStats()
        for i, ids in enumerate(self.batches):
            batch_stats(pruned, ids, stats, teacher=self.references[i] if self.references else None)
        if self.name == "kl":
            return float(stats.divergence) / stats.tokens
        return float(stats.cross_entropy) / stats.label_tokens


def target_from_export_config(source: HybridConfig, importance: Importance, export: dict[str, Any]) -> Target:
    """The target a ModelOpt-style export_config names; `num_layers` drops the least important blocks."""
    unknown = set(export) - set(EXPORT_KEYS) - {"num_query_groups"}
    if unknown:
        raise CompressorError(f"unknown export_config key(s) {sorted(unknown)}: use {', '.join(EXPORT_KEYS)}")
    layers = export.get("num_layers", source.num_blocks)
    if not 0 < layers <= source.num_blocks:
        raise CompressorError(f"num_layers {layers} must be between 1 and {source.num_blocks}")
    order = importance.block_scores("drop" if importance.block_drop is not None else "influence").argsort()
    drop = sorted(order[: source.num_blocks - layers].tolist())
    return Target.uniform(
        source,
        hidden_size=export.get("hidden_size"),
        intermediate_size=export.get("ffn_hidden_size"),
        mamba_num_heads=export.get("mamba_num_heads"),
        mamba_head_dim=export.get("mamba_head_dim"),
        num_attention_heads=export.get("num_attention_heads"),
        num_key_value_heads=export.get("num_query_groups"),
        drop_blocks=drop,
    )


def export_config(config: HybridConfig) -> dict[str, int]:
    """A uniform architecture in ModelOpt's `mcore_minitron` export_config keys."""
    return {
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "mamba_num_heads": config.mamba_num_heads,
        "mamba_head_dim": config.mamba_head_dim,
        "num_layers": config.num_blocks,
    }


def prune_to_budget(
    model_path: str | Path,
    out: str | Path,
    *,
    budget: Budget | None,
    data: str | None = None,
    importance_dir: str | Path | None = None,
    importance_options: ImportanceOptions | None = None,
    samples: int = 1024,
    score_samples: int = 64,
    seq_len: int = 4096,
    batch_size: int = 1,
    score_metric: str = "kl",
    strategy: str = "minitron",
    strategy_options: dict[str, Any] | None = None,
    export: dict[str, Any] | None = None,
    tokenizer: str | Path | None = None,
    text_field: str = "text",
    device: str = "auto",
    dtype: str | None = None,
    overwrite: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole pruning pipeline (module docstring) and return what `compression.json` records."""
    from strategies import get_strategy

    say = on_progress or (lambda text: None)
    check_output(out, overwrite=overwrite)
    started = time.perf_counter()
    model, source_fingerprint, importance, held_out = _calibrate(
        model_path, data, importance_dir, importance_options,
        samples=samples, score_samples=score_samples, seq_len=seq_len, batch_size=batch_size,
        tokenizer=tokenizer, text_field=text_field, device=device, dtype=dtype, say=say,
    )  # fmt: skip
    source = model.config
    scorer = ProxyScorer(model, importance, held_out, score_metric) if held_out is not None else None

    if export is not None:
        target = target_from_export_config(source, importance, export)
        from strategies.base import Candidate

        config = target.config(source)
        chosen = Candidate(target=target, config=config, params=num_parameters(config), label="export_config")
        if budget is not None:
            missed = budget.violations(config, source)
            if missed:
                raise CompressorError(f"the export_config shape misses the budget: {'; '.join(missed)}")
            chosen.memory = budget.memory_of(config).total if budget.memory is not None else None
            chosen.speedup = budget.speedup_of(config, source)
        if scorer is not None:
            chosen.score = scorer(target)
        candidates = [chosen]
        strategy_name = "export_config"
    else:
        if budget is None:
            raise CompressorError("give a budget (--target-mem / --target-params / --min-speedup) or --export-config")
        strategy_cls = get_strategy(strategy)
        candidates = strategy_cls(**(strategy_options or {})).search(
            source, importance, budget, scorer, on_progress=say
        )
        chosen = candidates[0]
        strategy_name = strategy

    pruned = prune(model, importance, chosen.target)
    record = {
        "source": {"path": str(model_path), "fingerprint": source_fingerprint, "params": num_parameters(source)},
        "budget": _budget_record(budget),
        "strategy": {"name": strategy_name, "options": strategy_options or {}},
        "score": scorer.name if scorer else None,
        "importance": {"folder": str(importance_dir) if importance_dir else None, **importance.meta},
        "candidates": [c.to_dict(source) for c in candidates],
        "chosen": chosen.to_dict(source),
        "export_config": export_config(pruned.config) if pruned.config.is_uniform else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    with atomic_output(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, pruned.config, pruned.state_dict(), tokenizer_from=model_path)
        (tmp / "compression.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if record["export_config"] is not None:
            (tmp / "export_config.json").write_text(json.dumps(record["export_config"], indent=2) + "\n")
    return record


def _calibrate(
    model_path,
    data: str | None,
    importance_dir,
    importance_options: ImportanceOptions | None,
    *,
    samples: int,
    score_samples: int,
    seq_len: int,
    batch_size: int,
    tokenizer,
    text_field: str,
    device: str,
    dtype: str | None,
    say: Callable[[str], None],
) -> tuple[HybridLM, str, Importance, list[torch.Tensor] | None]:
    """The source model and its fingerprint; importance (read from `importance_dir`, or estimated on the
    first `samples` sequences of `data`); the held-out batches after them, for scoring (None without data)."""
    from compressor import distributed
    from compressor.data import model_sequences

    model = load_model(model_path, dtype=dtype, device=distributed.resolve_device(device))
    source_fingerprint = fingerprint(model_path)
    if importance_dir is None and data is None:
        raise CompressorError("give --importance DIR or --data to compute importance from")
    sequences = None
    if data is not None:
        sequences = model_sequences(
            data,
            model_path,
            model.config.eos_id,
            seq_len=seq_len,
            tokenizer=tokenizer,
            text_field=text_field,
            max_sequences=score_samples + (0 if importance_dir else samples),
        )
    if importance_dir is not None:
        importance = Importance.load(importance_dir, source_fingerprint)
        say(f"importance from {importance_dir}")
        first_held_out = 0
    else:
        if len(sequences) <= samples:
            raise CompressorError(
                f"{data} holds {len(sequences)} sequences of {seq_len} tokens: need --samples {samples} for "
                "importance plus held-out ones for scoring; use more data, a smaller --seq-len or fewer --samples"
            )
        say(f"estimating importance on {samples} sequences of {seq_len} tokens")
        importance = estimate(
            model,
            sequences.head(samples).batches(batch_size, shuffle=False, drop_last=False),
            importance_options,
            meta={"fingerprint": source_fingerprint, "data": str(data), "samples": samples, "seq_len": seq_len},
        )
        first_held_out = samples
    if sequences is None:
        return model, source_fingerprint, importance, None
    held_out = sequences.to_numpy()[first_held_out : first_held_out + score_samples]
    batches = [
        torch.from_numpy(held_out[i : i + batch_size].astype("int64")).to(model.lm_head.weight.device)
        for i in range(0, len(held_out), batch_size)
    ]
    return model, source_fingerprint, importance, batches


def _budget_record(budget: Budget | None) -> dict[str, Any] | None:
    if budget is None:
        return None
    record = asdict(budget)
    record["description"] = budget.describe()
    return record


# ----- compress search: candidates ranked after a short distillation -------------------------------------
SEARCH_FILE = "search.json"


@dataclass
class DistillSettings:
    """The short distillation every finalist gets: same data, seed and token count for all."""

    tokens: int = 50_000_000
    seq_len: int = 4096
    batch_size: int = 16
    micro_batch_size: int = 4
    lr: float = 1e-4
    min_lr: float = 1e-5
    eval_sequences: int = 64
    valid_fraction: float = 0.05
    seed: int = 0


def run_search(
    model_path: str | Path,
    out: str | Path,
    *,
    budget: Budget,
    data: str,
    strategy: str = "minipuzzle",
    strategy_options: dict[str, Any] | None = None,
    finalists: int = 8,
    distill: DistillSettings | None = None,
    importance_dir: str | Path | None = None,
    importance_options: ImportanceOptions | None = None,
    samples: int = 1024,
    score_samples: int = 64,
    batch_size: int = 1,
    rank_by: str = "kl",
    tokenizer: str | Path | None = None,
    text_field: str = "text",
    device: str = "auto",
    dtype: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Propose candidates with a strategy, score them zero-shot, distill the best `finalists` briefly and
    rank them again. Every finalist's result is saved as it finishes; `resume` continues a search in `out`
    where it stopped (the candidate list is read back, finished candidates are skipped)."""
    import shutil

    from compressor.train import TrainConfig, train

    say = on_progress or (lambda text: None)
    if rank_by not in ("kl", "loss"):
        raise CompressorError(f"--rank-by {rank_by!r}: use kl or loss")
    distill = distill or DistillSettings()
    out = Path(out)
    record_path = out / SEARCH_FILE
    if resume:
        if not record_path.is_file():
            raise CompressorError(f"nothing to resume: no {SEARCH_FILE} in {out} (start without --resume)")
        record = json.loads(record_path.read_text())
        say(f"resuming the search in {out}")
    else:
        check_output(out, overwrite=overwrite)
        if out.exists():
            shutil.rmtree(out)
        record = _propose_and_score(
            model_path, out, budget, data, strategy, strategy_options, finalists, distill, importance_dir,
            importance_options, samples, score_samples, batch_size, tokenizer, text_field, device, dtype, say,
        )  # fmt: skip
    for entry in record["candidates"]:
        if not entry["finalist"]:
            continue
        folder = out / "candidates" / str(entry["index"])
        result_file = folder / "result.json"
        if result_file.is_file():
            entry["distilled"] = json.loads(result_file.read_text())
            continue
        say(f"distilling finalist {entry['index']}: {entry['label']}")
        if not (folder / "pruned" / "config.json").is_file():
            _materialize(record, out, entry["index"], folder / "pruned", device=device, dtype=dtype)
        settings = record["distill"]
        config = TrainConfig(
            student=str(folder / "pruned"),
            teacher=str(model_path),
            out=str(folder / "distill"),
            data=str(data),
            tokenizer=str(tokenizer) if tokenizer else str(model_path),
            text_field=text_field,
            seq_len=settings["seq_len"],
            batch_size=settings["batch_size"],
            micro_batch_size=settings["micro_batch_size"],
            steps=max(1, settings["tokens"] // (settings["batch_size"] * settings["seq_len"])),
            lr=settings["lr"],
            min_lr=settings["min_lr"],
            eval_every=10**9,  # evaluate before and after only
            eval_sequences=settings["eval_sequences"],
            save_every=10**9,
            valid_fraction=settings["valid_fraction"],
            seed=settings["seed"],
            device=device,
            overwrite=True,
        )
        result = train(config).final_eval
        distilled = {k: result[k] for k in ("val_loss", "val_ppl", "val_kl", "val_top1_agreement")}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(distilled, indent=2) + "\n")
        tmp.replace(result_file)  # a finished candidate is recorded whole or not at all
        entry["distilled"] = distilled
        _write_record(out, record)
    key = "val_kl" if rank_by == "kl" else "val_loss"
    finished = [e for e in record["candidates"] if e.get("distilled")]
    record["ranking"] = [e["index"] for e in sorted(finished, key=lambda e: e["distilled"][key])]
    record["rank_by"] = rank_by
    record["pareto"] = pareto_front(record["candidates"], rank_by)
    _write_record(out, record)
    plot_pareto(record, out / "pareto.png")
    (out / "pareto.json").write_text(json.dumps(record["pareto"], indent=2) + "\n")
    return record


def _propose_and_score(
    model_path, out, budget, data, strategy, strategy_options, finalists, distill, importance_dir,
    importance_options, samples, score_samples, batch_size, tokenizer, text_field, device, dtype, say,
) -> dict[str, Any]:  # fmt: skip
    """Importance (saved under out/importance), the strategy's candidates scored zero-shot, the record."""
    from strategies import get_strategy

    model, source_fingerprint, importance, batches = _calibrate(
        model_path, data, importance_dir, importance_options,
        samples=samples, score_samples=score_samples, seq_len=distill.seq_len, batch_size=batch_size,
        tokenizer=tokenizer, text_field=text_field, device=device, dtype=dtype, say=say,
    )  # fmt: skip
    source = model.config
    scorer = ProxyScorer(model, importance, batches, "kl")
    candidates = get_strategy(strategy)(**(strategy_options or {})).search(
        source, importance, budget, scorer, on_progress=say
    )
    out.mkdir(parents=True)
    with atomic_output(out / "importance") as tmp:
        importance.save(tmp)
    record = {
        "source": {"path": str(model_path), "fingerprint": source_fingerprint, "params": num_parameters(source)},
        "budget": _budget_record(budget),
        "strategy": {"name": strategy, "options": strategy_options or {}},
        "distill": asdict(distill),
        "data": str(data),
        "candidates": [
            {
                "index": i,
                "finalist": i < finalists,
                "target": c.target.to_dict(),
                "zero_shot_kl": c.score,
                "distilled": None,
                **{k: v for k, v in c.to_dict(source).items() if k != "score"},
            }
            for i, c in enumerate(candidates)
        ],
    }
    _write_record(out, record)
    return record


def _write_record(out: Path, record: dict[str, Any]) -> None:
    tmp = out / (SEARCH_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(out / SEARCH_FILE)


def _materialize(record, search_dir: Path, index: int, path: Path, *, device: str = "auto", dtype: str | None = None):
    """Write candidate `index`'s pruned checkpoint (pruned again from the source and the saved importance)."""
    from compressor import distributed

    entries = {e["index"]: e for e in record["candidates"]}
    if index not in entries:
        raise CompressorError(f"the search has no candidate {index}: choose one of 0..{len(entries) - 1}")
    source_path = record["source"]["path"]
    if fingerprint(source_path) != record["source"]["fingerprint"]:
        raise CompressorError(f"{source_path} changed since the search: its fingerprint no longer matches")
    model = load_model(source_path, dtype=dtype, device=distributed.resolve_device(device))
    importance = Importance.load(search_dir / "importance", record["source"]["fingerprint"])
    pruned = prune(model, importance, Target.from_dict(entries[index]["target"]))
    with atomic_output(path, overwrite=True) as tmp:
        write_checkpoint(tmp, pruned.config, pruned.state_dict(), tokenizer_from=source_path)


def materialize(
    search_dir: str | Path, index: int, path: str | Path, *, distilled: bool = False, overwrite: bool = False, **kwargs
) -> Path:
    """Write a searched candidate as a checkpoint: pruned (default), or its short-distilled weights."""
    search_dir, path = Path(search_dir), Path(path)
    record_path = search_dir / SEARCH_FILE
    if not record_path.is_file():
        raise CompressorError(f"{search_dir} is not a search folder (no {SEARCH_FILE})")
    check_output(path, overwrite=overwrite)
    record = json.loads(record_path.read_text())
    if distilled:
        model_dir = search_dir / "candidates" / str(index) / "distill" / "model"
        if not (model_dir / "config.json").is_file():
            raise CompressorError(
                f"candidate {index} was not distilled in this search: materialize it without --distilled"
            )
        model = load_model(model_dir)
        with atomic_output(path, overwrite=overwrite) as tmp:
            write_checkpoint(tmp, model.config, model.state_dict(), tokenizer_from=model_dir)
        return path
    _materialize(record, search_dir, index, path, **kwargs)
    return path


def pareto_front(candidates: list[dict[str, Any]], rank_by: str = "kl") -> dict[str, list[int]]:
    """Candidates no other beats on both quality (after distillation when available, else zero-shot KL)
    and cost: one front against memory (or parameters), one against speedup when it was estimated."""

    def quality(e):
        if e.get("distilled"):
            return e["distilled"]["val_kl" if rank_by == "kl" else "val_loss"]
        return e["zero_shot_kl"] if e["zero_shot_kl"] is not None else float("inf")

    def front(cost) -> list[int]:
        points = [(cost(e), quality(e), e["index"]) for e in candidates]
        kept = [
            i for c, q, i in points
            if not any((c2 <= c and q2 <= q) and (c2 < c or q2 < q) for c2, q2, _ in points)
        ]  # fmt: skip
        return sorted(kept, key=lambda i: next(c for c, _, j in points if j == i))

    fronts = {"memory": front(lambda e: e["memory_bytes"] if e["memory_bytes"] is not None else e["params"])}
    if all(e["speedup"] is not None for e in candidates):
        fronts["speedup"] = front(lambda e: -e["speedup"])
    return fronts


def plot_pareto(record: dict[str, Any], path: Path) -> None:
    """Quality against memory (and against speedup when estimated), the Pareto front joined, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = {e["index"]: e for e in record["candidates"]}
    rank_key = "val_kl" if record.get("rank_by", "kl") == "kl" else "val_loss"
    panels = [("memory", "memory (MiB)")] + (
        [("speedup", "estimated speedup")] if "speedup" in record["pareto"] else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (name, label) in zip(axes[0], panels, strict=True):
        for e in candidates.values():
            x = (e["memory_bytes"] or 0) / 2**20 if name == "memory" else e["speedup"]
            distilled = e.get("distilled")
            y = distilled[rank_key] if distilled else e["zero_shot_kl"]
            ax.scatter(x, y, marker="o" if distilled else "x", color="tab:blue" if distilled else "tab:gray")
            ax.annotate(str(e["index"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = record["pareto"][name]
        xs = [
            ((candidates[i]["memory_bytes"] or 0) / 2**20 if name == "memory" else candidates[i]["speedup"])
            for i in front
        ]
        ys = [
            candidates[i]["distilled"][rank_key] if candidates[i].get("distilled") else candidates[i]["zero_shot_kl"]
            for i in front
        ]
        ax.plot(xs, ys, color="tab:red", linewidth=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{rank_key} after short distillation (o) / zero-shot KL (x)")
        ax.legend()
    fig.suptitle(f"{record['strategy']['name']} search: {record['budget']['description']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
