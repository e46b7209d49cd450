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
from compressor.errors import CompressorError, OptionError
from compressor.evaluate import EvalResult, check_same_vocab, teacher_targets
from compressor.losses import LossSpec, LossStats, head_loss, next_token_labels
from compressor.model import HybridLM
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
    "tokens",
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
    steps: int | None = None  # optimizer steps; None: from `tokens`, else one epoch of the training split
    tokens: int | None = None  # token budget, batch_size x seq_len per step (instead of `steps`)
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

    def resolved_teacher_dtype(self, device: torch.device) -> str:
        """The teacher's dtype: as asked, else bf16 on CUDA and the student's dtype elsewhere."""
        return self.teacher_dtype or ("bfloat16" if device.type == "cuda" else self.dtype)

    def validate(self) -> None:
        """Raise an OptionError naming the first option out of its range."""
        checks = [
            ("seq_len", self.seq_len >= 2, "must be at least 2"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            (
                "batch_size",
                self.batch_size % max(self.micro_batch_size, 1) == 0,
                "must be a multiple of --micro-batch-size",
            ),
            ("steps", self.steps is None or self.steps >= 1, "must be at least 1"),
            ("tokens", self.tokens is None or self.tokens >= 1, "must be at least 1"),
            ("tokens", self.tokens is None or self.steps is None, "and --steps both set the run's length: give one"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive number"),
            ("min_lr", math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr, "must be between 0 and --lr"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be at least 0"),
            ("schedule", self.schedule in ("cosine", "wsd", "constant"), "must be cosine, wsd or constant"),
            ("decay_fraction", 0 < self.decay_fraction <= 1, "must be in (0, 1]"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be at least 0"),
            ("grad_clip", math.isfinite(self.grad_clip) and self.grad_clip >= 0, "must be at least 0 (0: off)"),
            ("autocast", self.autocast in ("auto", "bf16", "off"), "must be auto, bf16 or off"),
            ("eval_every", self.eval_every >= 1, "must be at least 1"),
            ("eval_sequences", self.eval_sequences >= 1, "must be at least 1"),
            ("save_every", self.save_every >= 1, "must be at least 1"),
            ("log_every", self.log_every >= 1, "must be at least 1"),
            ("valid_fraction", 0 < self.valid_fraction < 1, "must be between 0 and 1"),
            ("max_sequences", self.max_sequences is None or self.max_sequences >= 1, "must be at least 1"),
            ("seed", self.seed >= 0, "must be at least 0"),
            ("top_k", self.top_k >= 1, "must be at least 1"),
            ("cache_teacher", not (self.cache_teacher and self.teacher is None), "needs a teacher"),
        ]
        for name, ok, problem in checks:
            if not ok:
                value = getattr(self, name)
                raise OptionError(name, problem if isinstance(value, bool) else f"{problem}, got {value}")
        parse_dtype(self.dtype)
        parse_dtype(self.teacher_dtype)


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


@dataclass
class Run:
    """A run in progress: what `setup` builds and `loop` advances."""

    config: TrainConfig
    world: distributed.World
    out: Path
    student: HybridLM
    teacher: HybridLM | None  # in memory (None with a cached teacher or without one)
    cache: TeacherCache | None
    train_set: TokenSequences
    valid_set: TokenSequences
    optimizer: torch.optim.Optimizer
    accum: int  # micro-batches per process per optimizer step
    total_steps: int
    step: int = 0  # optimizer steps done
    tokens: int = 0
    teacher_val_loss: float | None = None
    last_saved: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.seq_len

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.cache is not None

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"


def train(
    config: TrainConfig,
    reporter: Reporter | None = None,
    *,
    teacher: HybridLM | None = None,
    sequences: TokenSequences | None = None,
) -> TrainResult:
    """Run (or resume) a training / distillation run; see the module docstring. `teacher` and `sequences`
    may be given already loaded (a search distils many students from one teacher and one read of the
    data); they must be what `config.teacher` and `config.data` name."""
    reporter = reporter or SilentReporter()
    config.validate()
    out = Path(config.out)
    resumed: dict[str, Any] | None = None
    if config.resume:
        resumed = _read_trainer_state(out / "model")
        _check_resume(config, TrainConfig.from_dict(resumed["config"]))
    else:
        check_output(out, overwrite=config.overwrite)

    world = distributed.init(distributed.resolve_device(config.device))
    try:
        run = setup(config, world, resumed, reporter, teacher=teacher, sequences=sequences)
        return loop(run, reporter)
    except BaseException:
        # a new run that stops before its first checkpoint leaves nothing behind
        if not config.resume and world.is_main and out.exists() and not (out / "model").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        distributed.close(world)


def setup(
    config: TrainConfig,
    world: distributed.World,
    resumed: dict[str, Any] | None,
    reporter: Reporter,
    *,
    teacher: HybridLM | None = None,
    sequences: TokenSequences | None = None,
) -> Run:
    """The output folder, the models, the data and its split, the teacher cache, sharding, AdamW, and the
    state of a resumed run."""
    torch.manual_seed(config.seed)
    out = Path(config.out)
    if world.is_main and resumed is None:
        if out.exists():
            shutil.rmtree(out)  # --overwrite was given (checked by `train`)
        out.mkdir(parents=True)
    distributed.barrier(world)

    # a resumed run continues from its own checkpoint
    student = load_model(out / "model" if resumed else config.student, dtype=config.dtype, device=world.device)
    if teacher is None and config.teacher is not None:
        dtype = config.resolved_teacher_dtype(world.device)
        teacher = load_model(config.teacher, dtype=dtype, device=world.device)
    if teacher is not None:
        teacher.requires_grad_(False)
        check_same_vocab(teacher, student)
    train_set, valid_set, accum, total_steps = _data(config, world, student, sequences)

    cache = None
    if config.cache_teacher:
        cache = _teacher_cache(config, world, teacher, train_set, valid_set, accum, total_steps, out, reporter)
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
    run = Run(config, world, out, student, teacher, cache, train_set, valid_set, optimizer, accum, total_steps)
    if resumed is not None:
        run.step = run.last_saved = resumed["step"]
        run.tokens = resumed["tokens"]
        run.teacher_val_loss = resumed.get("teacher_val_loss")
        _load_optimizer(out / "model", student, optimizer)
        _truncate_metrics(run.metrics, run.step)
    return run


def loop(run: Run, reporter: Reporter) -> TrainResult:
    """Optimizer steps until the end, logging every `log_every`, evaluating every `eval_every` and saving
    every `save_every` steps (and at the end)."""
    config = run.config
    batches = _micro_batches(run.train_set, config.micro_batch_size, config.seed, run.step * run.accum * run.world.size)
    reporter.start(run.total_steps, run.step, run.tokens_per_step)
    first_step = run.step
    last_eval = evaluate(run, reporter) if first_step == 0 else {}
    window_start, window_tokens = time.perf_counter(), 0
    while run.step < run.total_steps:
        lr = lr_at(run.step, run.total_steps, config)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        record = step(run, batches)
        run.step += 1
        run.tokens += run.tokens_per_step
        window_tokens += run.tokens_per_step
        done = run.step
        if done % config.log_every == 0 or done == run.total_steps or done == first_step + 1:
            record.update(step=done, tokens=run.tokens, lr=lr)
            record["tokens_per_s"] = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            _append(run.metrics, {"kind": "train", **record}, run.world)
            reporter.step(record)
            window_start, window_tokens = time.perf_counter(), 0
        if done % config.eval_every == 0 or done == run.total_steps:
            last_eval = evaluate(run, reporter)
        if done % config.save_every == 0 or done == run.total_steps:
            save(run)
    if not last_eval:  # a finished run resumed: its last evaluation is in the metrics
        last_eval = _last_eval(run.metrics, run.step) or evaluate(run, reporter)
    return TrainResult(steps=run.total_steps, tokens=run.tokens, final_eval=last_eval, out=run.out)


def step(run: Run, batches: Iterator[np.ndarray]) -> dict[str, Any]:
    """One optimizer step: this process's share of the global batch in micro-batches (each loss divided by
    the global token count, so the accumulated gradient is that of one large batch), clipping, the update.
    Returns the step's training metrics; stops the run on a non-finite loss."""
    config, world = run.config, run.world
    stats = LossStats()
    step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
    autocast = _autocast(config.autocast, world.device)
    for j in range(run.accum * world.size):
        indices = next(batches)
        if j % world.size != world.rank:
            continue
        ids = run.train_set.take(indices).to(world.device)
        with autocast:
            target = None
            if run.teacher is not None:
                target = teacher_targets(run.teacher, ids)
            elif run.cache is not None:
                target = run.cache.get("train", indices, world.device)
            labels = next_token_labels(ids)
            loss_sum = run.student(
                ids,
                head=lambda hidden, weight, t=target, y=labels, s=stats: head_loss(
                    hidden.flatten(0, 1), weight, config.loss, labels=y, teacher=t, stats=s
                ),
            )
        # sum over this process's tokens / global token count; FSDP averages gradients over processes
        loss = loss_sum * (world.size / run.tokens_per_step)
        loss.backward()
        step_loss += loss_sum.detach()
    fields = [float(step_loss), float(stats.divergence), float(stats.cross_entropy), float(stats.agreement)]
    total_loss, divergence, cross_entropy, agreement, tokens, label_tokens = distributed.all_reduce_sum(
        [*fields, stats.tokens, stats.label_tokens], world
    )
    if not math.isfinite(total_loss):
        saved = run.last_saved
        where = f"the checkpoint of step {saved} is in {run.out / 'model'}" if saved else "no checkpoint yet"
        raise TrainingError(
            f"the loss became {total_loss} at step {run.step + 1} ({where}): lower --lr, raise "
            "--warmup-steps or check the data, then start again or --resume"
        )
    record: dict[str, Any] = {"loss": total_loss / run.tokens_per_step, "ce": cross_entropy / label_tokens}
    if run.has_teacher:
        record.update(kl=divergence / tokens, top1_agreement=agreement / tokens)
    if config.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), config.grad_clip)
        record["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return record


def evaluate(run: Run, reporter: Reporter) -> dict[str, Any]:
    """Validation loss and perplexity (and KL / top-1 agreement to the teacher), logged and reported."""
    autocast = _autocast(run.config.autocast, run.world.device)
    result, teacher_loss = _evaluate(
        run.student, run.teacher, run.cache, run.valid_set, run.config.micro_batch_size,
        run.config.loss.chunk_tokens, run.world, autocast,
    )  # fmt: skip
    if teacher_loss is not None:
        run.teacher_val_loss = teacher_loss
    record = {
        "kind": "eval",
        "step": run.step,
        "tokens": run.tokens,
        "val_loss": result.loss,
        "val_ppl": result.perplexity,
    }
    if run.has_teacher:
        record.update(val_kl=result.kl, val_top1_agreement=result.top1_agreement)
    if run.teacher_val_loss is not None:
        record["teacher_val_loss"] = run.teacher_val_loss
    _append(run.metrics, record, run.world)
    reporter.evaluated(record)
    return record


def save(run: Run) -> None:
    """Checkpoint the run (weights, optimizer, RNG, position) atomically, replacing the previous one."""
    _save(
        run.out / "model", run.student, run.optimizer, run.config, run.step, run.tokens, run.teacher_val_loss, run.world
    )
    run.last_saved = run.step


def _data(
    config: TrainConfig, world: distributed.World, student: HybridLM, sequences: TokenSequences | None
) -> tuple[TokenSequences, TokenSequences, int, int]:
    """(training split, validation split, micro-batches per process per step, total steps)."""
    if sequences is None:
        sequences = model_sequences(
            config.data,
            config.student,
            student.config.eos_id,
            seq_len=config.seq_len,
            tokenizer=config.tokenizer,
            text_field=config.text_field,
            max_sequences=config.max_sequences,
        )
    elif config.max_sequences is not None:
        sequences = sequences.head(config.max_sequences)
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
    accum = config.batch_size // (micro * world.size)
    per_epoch = train_set.num_batches(micro)
    if per_epoch < accum * world.size:
        raise CompressorError(
            f"the training split has {len(train_set)} sequences of {config.seq_len} tokens, fewer than one "
            f"batch of {config.batch_size}: use more data, a smaller --seq-len or a smaller --batch-size"
        )
    tokens_per_step = config.batch_size * config.seq_len
    if config.steps is not None:
        total_steps = config.steps
    elif config.tokens is not None:
        total_steps = max(1, config.tokens // tokens_per_step)
    else:
        total_steps = max(1, (per_epoch * micro) // config.batch_size)
    return train_set, valid_set.head(usable), accum, total_steps


def _teacher_cache(config, world, teacher, train_set, valid_set, accum, total_steps, out, reporter) -> TeacherCache:
    """The teacher's top-k log-probs over the sequences the run will see, written once and reused."""
    cache_dir = out / "teacher_cache"
    if not TeacherCache.is_complete(cache_dir):
        reporter.note(f"caching the teacher's top-{config.top_k} log-probs in {cache_dir}")
        distributed.shard(teacher, world, frozen=True)
        micro = config.micro_batch_size
        # only the training sequences the run will see (all of them once it passes an epoch)
        batches = _micro_batches(train_set, micro, config.seed, 0)
        needed = min(total_steps * accum * world.size, train_set.num_batches(micro))
        used = np.unique(np.concatenate([next(batches) for _ in range(needed)]))
        splits = {"train": (train_set, used), "valid": (valid_set, np.arange(len(valid_set)))}
        write_teacher_cache(cache_dir, teacher, splits, config.top_k, config.loss.temperature, world)
    return TeacherCache(cache_dir, config.top_k, config.loss.temperature)


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
        teacher_size = torch.empty(0, dtype=parse_dtype(config.resolved_teacher_dtype(device))).element_size()
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
    from compressor.config import ATTENTION, MAMBA, MOE

    gn = config.n_groups * config.ssm_state_size
    per_token = 2 * config.hidden_size  # embeddings output, final norm input
    fp32_per_token = config.hidden_size  # the final norm's normalized input (RMSNorm works in fp32)
    int64_per_token = 0
    for spec in config.blocks:
        per_token += 2 * config.hidden_size  # the block's input and its norm's output
        fp32_per_token += config.hidden_size  # the norm's normalized input
        if spec.kind == MOE:
            k, width = config.num_experts_per_tok, config.moe_latent_size or config.hidden_size
            # per routed pair: the expert's gathered input, its up_proj output after relu and squared; the
            # shared expert's two; the latent sum entering fc2_latent_proj
            per_token += k * (width + 2 * spec.moe_intermediate_size) + 2 * spec.moe_shared_expert_intermediate_size
            per_token += config.moe_latent_size or 0
            # router scores, top-k weights, each pair's weighted output (summed in fp32); the routing indices
            fp32_per_token += spec.n_routed_experts + k + k * width
            int64_per_token += 3 * k
        elif spec.kind == MAMBA:
            inner, heads = spec.mamba_intermediate, spec.mamba_num_heads
            per_token += (2 * inner + 2 * gn + heads) + 2 * (inner + 2 * gn) + inner  # in_proj, conv, out_proj in
            # the scan works in fp32: x*dt, B, C, within-chunk decays and scores, output, gated norm
            fp32_per_token += 2 * inner + 2 * gn + 2 * heads * config.chunk_size + 4 * inner
        elif spec.kind == ATTENTION:
            q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
            per_token += 3 * q + 2 * kv
        else:
            per_token += 3 * spec.intermediate_size
    return tokens * (per_token * size + fp32_per_token * 4 + int64_per_token * 8)


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


def _last_eval(path: Path, step: int) -> dict[str, Any] | None:
    """The evaluation record of `step` in the metrics file, if there is one."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    found = [r for r in records if r.get("kind") == "eval" and r.get("step") == step]
    return found[-1] if found else None


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
