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
from dataclasses import asdict
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
    from compressor import distributed
    from compressor.data import load_sequences, load_tokenizer
    from strategies import get_strategy

    say = on_progress or (lambda text: None)
    check_output(out, overwrite=overwrite)
    started = time.perf_counter()
    device_ = distributed.resolve_device(device)
    model = load_model(model_path, dtype=dtype, device=device_)
    source = model.config
    source_fingerprint = fingerprint(model_path)

    sequences = None
    if data is not None:
        token_file = Path(data).suffix.lower() in (".npy", ".safetensors")
        needed = score_samples + (0 if importance_dir else samples)
        sequences = load_sequences(
            data,
            seq_len=seq_len,
            tokenizer=None if token_file else load_tokenizer(tokenizer or model_path),
            text_field=text_field,
            max_sequences=needed,
            eos_id=source.eos_token_id if isinstance(source.eos_token_id, int) else None,
        )
    if importance_dir is not None:
        importance = Importance.load(importance_dir, source_fingerprint)
        say(f"importance from {importance_dir}")
    else:
        if sequences is None:
            raise CompressorError("give --importance DIR or --data to compute importance from")
        if len(sequences) <= samples:
            raise CompressorError(
                f"{data} holds {len(sequences)} sequences of {seq_len} tokens: need --samples {samples} for importance "
                f"plus held-out ones for scoring; use more data, a smaller --seq-len or fewer --samples"
            )
        say(f"estimating importance on {samples} sequences of {seq_len} tokens")
        calibration = sequences.head(samples)
        importance = estimate(
            model,
            calibration.batches(batch_size, shuffle=False, drop_last=False),
            importance_options,
            meta={"fingerprint": source_fingerprint, "data": str(data), "samples": samples, "seq_len": seq_len},
        )
    scorer = None
    if sequences is not None:
        held_out = sequences.to_numpy()[0 if importance_dir else samples :][:score_samples]
        batches = [
            torch.from_numpy(held_out[i : i + batch_size].astype("int64")).to(device_)
            for i in range(0, len(held_out), batch_size)
        ]
        scorer = ProxyScorer(model, importance, batches, score_metric)

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


def _budget_record(budget: Budget | None) -> dict[str, Any] | None:
    if budget is None:
        return None
    record = asdict(budget)
    record["description"] = budget.describe()
    return record
