"""The training recipe: logit distillation from a teacher, or plain LM training without one.

`train(config)` reads straight through: set up the world, load the student (and teacher or its cached
top-k), read and split the data, build AdamW, then loop: for each optimizer step, run this process's share
of the global batch in micro-batches (the loss of each is divided by the global token count, so the
accumulated gradient is that of one large batch), clip, set the learning rate from the schedule, step.
Every `eval_every` steps it measures validation loss, KL to the teacher and top-1 agreement; every
`save_every` steps it writes a checkpoint. Metrics go to `OUT/metrics.jsonl`.

Output folder `OUT`:
- `model/`: the latest checkpoint, a standard checkpoint folder (loadable by `compress eval` and
  transformers) plus `trainer_state.json` and `optimizer.safetensors` (optimizer moments, RNG state):
  what `--resume` needs to continue exactly where the run stopped (same batches, same loss curve);
- `metrics.jsonl`: one JSON object per logged step and per evaluation;
- `teacher_cache/`: the teacher's top-k log-probs when the run distills from a cache.

A checkpoint replaces the previous one atomically; a killed run loses at most the steps since the last
checkpoint; a non-finite loss stops the run with the last good checkpoint left in place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from compressor import distributed
from compressor.checkpoint import load_model, parse_dtype, write_checkpoint
from compressor.data import TokenSequences, model_sequences
from compressor.errors import CompressorError
from compressor.evaluate import EvalResult, check_same_vocab, teacher_targets
from compressor.losses import LossSpec, LossStats, head_loss, next_token_labels
from compressor.outputs import atomic_output, check_output
from compressor.teacher_cache import TeacherCache, write_teacher_cache

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# Options that define the run; a resumed run must not change them.
RUN_DEFINING = (
    "student",
    "teacher",
    "data",
    "seq_len",
    "batch_size",
    "micro_batch_size",
    "steps",
    "lr",
    "min_lr",
    "warmup_steps",
    "schedule",
    "decay_fraction",
    "weight_decay",
    "grad_clip",
    "loss",
    "seed",
    "valid_fraction",
    "max_sequences",
    "dtype",
    "cache_teacher",
    "top_k",
)


class TrainingError(CompressorError):
    """The run cannot continue (non-finite loss, mismatched resume)."""


@dataclass
class TrainConfig:
    """Everything a run needs. `teacher` None means plain LM training of `student`."""

    student: str
    out: str
    data: str
    teacher: str | None = None
    tokenizer: str | None = None
    text_field: str = "text"
    seq_len: int = 512
    batch_size: int = 16  # sequences per optimizer step, all processes together
    micro_batch_size: int = 4  # sequences per forward pass of one process
    steps: int | None = None  # None: one epoch of the training split
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # WSD: the share of steps spent decaying
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    loss: LossSpec = field(default_factory=LossSpec)
    cache_teacher: bool = False
    top_k: int = 64
    eval_every: int = 50
    eval_sequences: int = 64
    save_every: int = 100
    log_every: int = 10
    valid_fraction: float = 0.05
    max_sequences: int | None = None
    seed: int = 0
    dtype: str = "float32"  # student master weights
    teacher_dtype: str | None = None  # None: bf16 on CUDA, else the student's dtype
    autocast: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        raw["loss"] = LossSpec(**raw["loss"])
        raw["betas"] = tuple(raw["betas"])
        return cls(**raw)

    def validate(self) -> None:
        checks = [
            (self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}"),
            (self.micro_batch_size >= 1, "--micro-batch-size must be at least 1"),
            (self.batch_size % self.micro_batch_size == 0, "--batch-size must be a multiple of --micro-batch-size"),
            (self.steps is None or self.steps >= 1, "--steps (or --tokens) must give at least one step"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need 0 <= --min-lr <= --lr and --lr > 0"),
            (
                self.schedule in ("cosine", "wsd", "constant"),
                f"--schedule {self.schedule!r}: use cosine, wsd, constant",
            ),
            (0 < self.decay_fraction <= 1, "--decay-fraction must be in (0, 1]"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 turns clipping off)"),
            (self.autocast in ("auto", "bf16", "off"), f"--autocast {self.autocast!r}: use auto, bf16, off"),
            (self.eval_every >= 1 and self.save_every >= 1 and self.log_every >= 1, "intervals must be >= 1"),
            (self.top_k >= 1, "--top-k must be at least 1"),
            (not (self.cache_teacher and self.teacher is None), "--cache-teacher needs a teacher"),
        ]
        for ok, message in checks:
            if not ok:
                raise CompressorError(message)


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warmup, then the schedule."""
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup - 1)
        return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = total - max(1, round(config.decay_fraction * total))  # WSD: warmup, stable, then linear decay
    if step < decay_start:
        return config.lr
    progress = (step - decay_start + 1) / (total - decay_start)
    return config.lr + (config.min_lr - config.lr) * min(progress, 1.0)


class Reporter(Protocol):
    """What the loop tells its caller (the CLI renders it; tests may ignore it)."""

    def start(self, total_steps: int, first_step: int, tokens_per_step: int) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def evaluated(self, record: dict[str, Any]) -> None: ...
    def note(self, text: str) -> None: ...


class SilentReporter:
    def start(self, total_steps: int, first_step: int, tokens_per_step: int) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def evaluated(self, record: dict[str, Any]) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_eval: dict[str, Any]
    out: Path


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run (or resume) a training / distillation run; see the module docstring."""
    reporter = reporter or SilentReporter()
    config.validate()
    out = Path(config.out)
    state_dir = out / "model"
    resumed: dict[str, Any] | None = None
    if config.resume:
        resumed = _read_trainer_state(state_dir)
        _check_resume(config, TrainConfig.from_dict(resumed["config"]))
    else:
        check_output(out, overwrite=config.overwrite)

    world = distributed.init(distributed.resolve_device(config.device))
    try:
        return _run(config, world, out, resumed, reporter)
    except BaseException:
        # a new run that stops before its first checkpoint leaves nothing behind
        if not config.resume and world.is_main and out.exists() and not (out / "model").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        distributed.close(world)


def _run(config, world, out, resumed, reporter) -> TrainResult:
    torch.manual_seed(config.seed)
    device = world.device
    if world.is_main and not config.resume:
        if out.exists():
            shutil.rmtree(out)  # --overwrite was given (checked above)
        out.mkdir(parents=True)
    distributed.barrier(world)

    # a resumed run continues from its own checkpoint
    student = load_model(out / "model" if resumed else config.student, dtype=config.dtype, device=device)
    teacher = None
    if config.teacher is not None:
        teacher_dtype = config.teacher_dtype or ("bfloat16" if device.type == "cuda" else config.dtype)
        teacher = load_model(config.teacher, dtype=teacher_dtype, device=device).requires_grad_(False)
        check_same_vocab(teacher, student)

    sequences = model_sequences(
        config.data,
        config.student,
        student.config.eos_id,
        seq_len=config.seq_len,
        tokenizer=config.tokenizer,
        text_field=config.text_field,
        max_sequences=config.max_sequences,
    )
    micro = config.micro_batch_size
    if config.batch_size % (micro * world.size):
        raise CompressorError(
            f"--batch-size {config.batch_size} must be a multiple of --micro-batch-size x processes "
            f"({micro} x {world.size})"
        )
    train_set, valid_set = sequences.split(config.valid_fraction, config.seed)
    # every process evaluates the same number of micro-batches (sharded forwards are collective)
    eval_unit = micro * world.size
    usable = min(len(valid_set), config.eval_sequences) // eval_unit * eval_unit
    if usable == 0:
        raise CompressorError(
            f"the validation split has {len(valid_set)} sequences, fewer than --micro-batch-size x processes "
            f"({eval_unit}): raise --valid-fraction or --eval-sequences, or use more data"
        )
    valid_set = valid_set.head(usable)
    accum = config.batch_size // (micro * world.size)
    per_epoch = train_set.num_batches(micro)
    if per_epoch < accum * world.size:
        raise CompressorError(
            f"the training split has {len(train_set)} sequences of {config.seq_len} tokens, fewer than one "
            f"batch of {config.batch_size}: use more data, a smaller --seq-len or a smaller --batch-size"
        )
    total_steps = config.steps or max(1, (per_epoch * micro) // config.batch_size)
    tokens_per_step = config.batch_size * config.seq_len

    cache = None
    if config.cache_teacher:
        cache_dir = out / "teacher_cache"
        if not TeacherCache.is_complete(cache_dir):
            reporter.note(f"caching the teacher's top-{config.top_k} log-probs in {cache_dir}")
            distributed.shard(teacher, world, frozen=True)
            # only the training sequences the run will see (all of them once it passes an epoch)
            batches = _micro_batches(train_set, micro, config.seed, 0)
            needed = min(total_steps * accum * world.size, per_epoch)
            used = np.unique(np.concatenate([next(batches) for _ in range(needed)]))
            splits = {"train": (train_set, used), "valid": (valid_set, np.arange(len(valid_set)))}
            write_teacher_cache(cache_dir, teacher, splits, config.top_k, config.loss.temperature, world)
        cache = TeacherCache(cache_dir, config.top_k, config.loss.temperature)
        teacher = None  # train from the cache; the teacher leaves memory
    elif teacher is not None:
        distributed.shard(teacher, world, frozen=True)
    distributed.shard(student, world)
    student.train()

    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
        foreach=True,
    )
    first_step, tokens_seen = 0, 0
    if resumed is not None:
        first_step, tokens_seen = resumed["step"], resumed["tokens"]
        _load_optimizer(out / "model", student, optimizer)
        _truncate_metrics(out / "metrics.jsonl", first_step)

    autocast = _autocast(config.autocast, device)
    spec = config.loss
    has_teacher = teacher is not None or cache is not None
    teacher_loss = resumed.get("teacher_val_loss") if resumed else None
    metrics = out / "metrics.jsonl"
    batches = _micro_batches(train_set, micro, config.seed, first_step * accum * world.size)
    reporter.start(total_steps, first_step, tokens_per_step)

    def evaluate_now(step: int) -> dict[str, Any]:
        nonlocal teacher_loss
        result, t_loss = _evaluate(student, teacher, cache, valid_set, micro, spec.chunk_tokens, world, autocast)
        teacher_loss = t_loss if t_loss is not None else teacher_loss
        record = {
            "kind": "eval",
            "step": step,
            "tokens": tokens_seen,
            "val_loss": result.loss,
            "val_ppl": result.perplexity,
        }
        if has_teacher:
            record.update(val_kl=result.kl, val_top1_agreement=result.top1_agreement)
        if teacher_loss is not None:
            record["teacher_val_loss"] = teacher_loss
        _append(metrics, record, world)
        reporter.evaluated(record)
        return record

    last_eval = evaluate_now(first_step) if first_step == 0 else {}
    last_saved = first_step
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(first_step, total_steps):
        lr = lr_at(step, total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = LossStats()
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for j in range(accum * world.size):
            indices = next(batches)
            if j % world.size != world.rank:
                continue
            ids = train_set.take(indices).to(device)
            with autocast:
                target = None
                if teacher is not None:
                    target = teacher_targets(teacher, ids)
                elif cache is not None:
                    target = cache.get("train", indices, device)
                labels = next_token_labels(ids)
                loss_sum = student(
                    ids,
                    head=lambda hidden, weight, t=target, y=labels, s=stats: head_loss(
                        hidden.flatten(0, 1), weight, spec, labels=y, teacher=t, stats=s
                    ),
                )
            # sum over this process's tokens / global token count; FSDP averages gradients over processes
            loss = loss_sum * (world.size / tokens_per_step)
            loss.backward()
            step_loss += loss_sum.detach()
        total_loss, *sums = distributed.all_reduce_sum(
            [
                float(step_loss),
                float(stats.divergence),
                float(stats.cross_entropy),
                float(stats.agreement),
                stats.tokens,
                stats.label_tokens,
            ],
            world,
        )
        if not math.isfinite(total_loss):
            where = f"the checkpoint of step {last_saved} is in {out / 'model'}" if last_saved else "no checkpoint yet"
            raise TrainingError(
                f"the loss became {total_loss} at step {step + 1} ({where}): lower --lr, raise "
                "--warmup-steps or check the data, then start again or --resume"
            )
        grad_norm = None
        if config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        done = step + 1
        divergence, cross_entropy, agreement, tokens, label_tokens = sums
        if done % config.log_every == 0 or done == total_steps or done == first_step + 1:
            elapsed = time.perf_counter() - window_start
            record = {
                "kind": "train",
                "step": done,
                "tokens": tokens_seen,
                "lr": lr,
                "loss": total_loss / tokens_per_step,
                "ce": cross_entropy / label_tokens,
                "tokens_per_s": window_tokens / max(elapsed, 1e-9),
            }
            if has_teacher:
                record.update(kl=divergence / tokens, top1_agreement=agreement / tokens)
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            _append(metrics, record, world)
            reporter.step(record)
            window_start, window_tokens = time.perf_counter(), 0
        if done % config.eval_every == 0 or done == total_steps:
            last_eval = evaluate_now(done)
        if done % config.save_every == 0 or done == total_steps:
            _save(out / "model", student, optimizer, config, done, tokens_seen, teacher_loss, world)
            last_saved = done
    return TrainResult(steps=total_steps, tokens=tokens_seen, final_eval=last_eval, out=out)


def memory_plan(config: TrainConfig) -> dict[str, Any]:
    """What one process will hold, from the configs alone (no weights loaded), and the device's free memory.

    Terms: student weights, gradients and AdamW's two moments (all in the student dtype, divided over the
    processes by FSDP); the teacher's weights (none with --cache-teacher); the activations autograd keeps
    for one micro-batch (an estimate per block from the tensors each mixer saves for backward); the loss
    chunk (the logits of one chunk of rows with their log-probs and gradient, and the teacher's probabilities,
    fp32).
    """
    import os

    from compressor.budget import available_memory, num_parameters
    from compressor.config import HybridConfig

    student = HybridConfig.from_file(config.student)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = distributed.resolve_device(config.device)
    size = torch.empty(0, dtype=parse_dtype(config.dtype)).element_size()
    params = num_parameters(student)
    terms = {
        "student weights": params * size // world,
        "gradients": params * size // world,
        "optimizer state (AdamW)": 2 * params * size // world,
    }
    if config.teacher is not None and not config.cache_teacher:
        teacher = HybridConfig.from_file(config.teacher)
        teacher_dtype = config.teacher_dtype or ("bfloat16" if device.type == "cuda" else config.dtype)
        teacher_size = torch.empty(0, dtype=parse_dtype(teacher_dtype)).element_size()
        terms["teacher weights"] = num_parameters(teacher) * teacher_size // world
    autocast = config.autocast == "bf16" or (config.autocast == "auto" and device.type == "cuda")
    act_size = 2 if autocast else size
    terms["activations (one micro-batch)"] = _activation_bytes(
        student, config.micro_batch_size * config.seq_len, act_size
    )
    logit_rows = min(config.loss.rows_per_chunk(student.vocab_size), config.micro_batch_size * config.seq_len)
    copies = 3 + (1 if config.teacher is not None else 0)  # logits, log-probs, gradient (+ teacher probabilities)
    terms["loss chunk"] = logit_rows * student.vocab_size * 4 * copies
    total = sum(terms.values())
    return {"terms": terms, "total": total, "available": available_memory(device), "device": str(device)}


def _activation_bytes(config, tokens: int, size: int) -> int:
    """Tensors autograd keeps for backward over all blocks, per micro-batch of `tokens` tokens."""
    from compressor.config import ATTENTION, MAMBA

    gn = config.n_groups * config.ssm_state_size
    per_token = 2 * config.hidden_size  # embeddings output, final norm input
    fp32_per_token = 0
    for spec in config.blocks:
        per_token += 2 * config.hidden_size  # the block's input and its norm's output
        if spec.kind == MAMBA:
            inner, heads = spec.mamba_intermediate, spec.mamba_num_heads
            per_token += (2 * inner + 2 * gn + heads) + 2 * (inner + 2 * gn) + inner  # in_proj, conv, out_proj in
            # the scan works in fp32: x*dt, B, C, within-chunk decays and scores, output, gated norm
            fp32_per_token += 2 * inner + 2 * gn + 2 * heads * config.chunk_size + 4 * inner
        elif spec.kind == ATTENTION:
            q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
            per_token += 3 * q + 2 * kv
        else:
            per_token += 3 * spec.intermediate_size
    return tokens * (per_token * size + fp32_per_token * 4)


def _micro_batches(train_set: TokenSequences, micro: int, seed: int, start: int) -> Iterator[np.ndarray]:
    """Indices of the global sequence of micro-batches from position `start` on, epoch after epoch."""
    per_epoch = train_set.num_batches(micro)
    epoch, offset = divmod(start, per_epoch)
    while True:
        yield from train_set.batch_indices(micro, seed=seed, epoch=epoch, start=offset)
        epoch, offset = epoch + 1, 0


def _evaluate(student, teacher, cache, valid_set, micro, chunk_tokens, world, autocast):
    """Validation statistics summed over all processes; also the teacher's loss when it is in memory."""
    student.eval()
    stats, teacher_stats = LossStats(), LossStats()
    spec = LossSpec(chunk_tokens=chunk_tokens)
    with torch.no_grad(), autocast:
        for j, indices in enumerate(valid_set.batch_indices(micro, shuffle=False, drop_last=False)):
            if j % world.size != world.rank:
                continue
            ids = valid_set.take(indices).to(world.device)
            labels = next_token_labels(ids)
            target = None
            if teacher is not None:
                target = teacher_targets(teacher, ids)
                head_loss(target.hidden, target.weight, spec, labels=labels, stats=teacher_stats)
            elif cache is not None:
                target = cache.get("valid", indices, world.device)
            student(
                ids,
                head=lambda h, w, t=target, y=labels: head_loss(
                    h.flatten(0, 1), w, spec, labels=y, teacher=t, stats=stats
                ),
            )
    student.train()
    fields = ("divergence", "cross_entropy", "agreement", "tokens", "label_tokens")
    summed = distributed.all_reduce_sum([float(getattr(s, f)) for s in (stats, teacher_stats) for f in fields], world)
    stats = LossStats(*summed[:5])
    stats.tokens, stats.label_tokens = int(stats.tokens), int(stats.label_tokens)
    teacher_loss = None
    if teacher is not None:
        teacher_loss = summed[6] / summed[9]
    result = EvalResult.from_stats(stats, with_teacher=teacher is not None or cache is not None)
    return result, teacher_loss


def _autocast(mode: str, device: torch.device):
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _append(path: Path, record: dict[str, Any], world: distributed.World) -> None:
    if world.is_main:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint a resumed run starts from."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _save(folder: Path, student, optimizer, config: TrainConfig, step: int, tokens: int, teacher_loss, world) -> None:
    """Write the checkpoint (weights, optimizer, RNG, position) atomically, replacing the previous one."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(student, options=options)
    optim_state = get_optimizer_state_dict(student, optimizer, options=options)
    if not world.is_main:
        return
    tensors = {
        f"state.{name}.{key}": value for name, entry in optim_state["state"].items() for key, value in entry.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in group.items()} for group in optim_state["param_groups"]]
    state = {
        "format": 1,
        "step": step,
        "tokens": tokens,
        "teacher_val_loss": teacher_loss,
        "param_groups": groups,
        "config": config.to_dict(),
    }
    # tokenizer files: from the previous checkpoint of this run, else from where the run got them
    tokenizer_from = folder if (folder / "tokenizer.json").is_file() else _tokenizer_folder(config)
    with atomic_output(folder, overwrite=True) as tmp:
        write_checkpoint(tmp, student.config, model_state, tokenizer_from=tokenizer_from)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _tokenizer_folder(config: TrainConfig) -> Path:
    if config.tokenizer is None:
        return Path(config.student)
    path = Path(config.tokenizer)
    return path if path.is_dir() else path.parent


def _read_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"nothing to resume: no {STATE_FILE} in {folder} (start a new run without --resume)")
    return json.loads(path.read_text())


def _check_resume(new: TrainConfig, saved: TrainConfig) -> None:
    changed = [name for name in RUN_DEFINING if getattr(new, name) != getattr(saved, name)]
    if changed:
        detail = ", ".join(f"{n} ({getattr(saved, n)!r} in the run, {getattr(new, n)!r} now)" for n in changed)
        raise TrainingError(f"--resume with different options: {detail}; resume with the run's options")


def _load_optimizer(folder: Path, student, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(folder / OPTIMIZER_FILE)
    torch.set_rng_state(tensors.pop("rng.torch"))
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field_name = key.removeprefix("state.").rpartition(".")
        entries.setdefault(name, {})[field_name] = value
    set_optimizer_state_dict(
        student,
        optimizer,
        optim_state_dict={"state": entries, "param_groups": state["param_groups"]},
        options=StateDictOptions(full_state_dict=True),
    )
