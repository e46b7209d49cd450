"""The training recipe: logit distillation from a teacher, or plain LM training without one.

`train(config)` reads straight through: set up the world, load the student (and teacher or its cached
top-k), read and split the data, build AdamW, then loop: for each optimizer step, run this process's share
of the global batch in micro-batches (the loss of each is divided by the global token count, so the
accumulated gradient is that of one large batch), clip, set the learning rate from the schedule, step.
With `attention_loss` > 0 each micro-batch's loss also holds the attention transfer
(`compressor.attention_transfer`): the KL from the teacher's attention weights to the student's.
Every `eval_every` steps it measures validation loss, KL to the teacher and top-1 agreement (by the loop
of `compress eval`, `compressor.evaluate.evaluate`); every `save_every` steps it writes a checkpoint.
Metrics go to `OUT/metrics.jsonl`.

Output folder `OUT`:
- `model/`: the latest checkpoint, a standard checkpoint folder (loadable by `compress eval`, transformers
  and vLLM) plus `trainer/trainer_state.json` and `trainer/optimizer.safetensors` (optimizer moments, RNG
  state): what `--resume` needs to continue exactly where the run stopped (same batches, same loss curve).
  They sit in a subfolder because engines read every `*.safetensors` of the folder itself as weights (vLLM
  refuses a folder with the optimizer's tensors beside the model's); runs written before read from `model/`;
- `metrics.jsonl`: one JSON object per logged step and per evaluation;
- `teacher_cache/`: the teacher's targets (sampled or top-k) when the run distills from a cache.

A checkpoint replaces the previous one atomically; a killed run loses at most the steps since the last
checkpoint; a non-finite loss stops the run with the last good checkpoint left in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError

from compressor import distributed
from compressor.attention_transfer import Pair, attention_kl, attention_pairs, recording, sample_queries
from compressor.checkpoint import check_weights, fingerprint, load_model, parse_dtype, write_checkpoint
from compressor.data import DataSpec, TokenSequences, check_same_tokenizer, local_path, read_sequences, tokenizer_file
from compressor.errors import CompressorError, OptionError, check_applies, first_line
from compressor.evaluate import CachedBatch, check_same_vocab, teacher_targets
from compressor.evaluate import evaluate as evaluate_batches
from compressor.losses import CHUNK_LOGITS, LossSpec, LossStats, head_loss, next_token_labels
from compressor.model import HybridLM
from compressor.outputs import (
    atomic_output,
    check_free_space,
    check_output,
    check_record,
    open_tensors,
    output_lock,
    read_json,
    recover,
    refuse_links,
    save_tensors,
    settle,
    staging,
    swap_in,
)
from compressor.tasks import TASKS, RetrievalConfig, TaskScorer
from compressor.teacher_cache import (
    TARGETS,
    TeacherCache,
    check_cache_folder,
    extend_teacher_cache,
    write_teacher_cache,
)

STATE_FILE = "trainer_state.json"
QUANTIZED_DIR = "quantized"  # the quantized export of a quantization-aware run
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_DIR = "trainer"  # inside a checkpoint folder: STATE_FILE and OPTIMIZER_FILE
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
    "cache_targets",
    "top_k",
    "quantize",
    "quantize_keep",
    "attention_loss",
    "attention_queries",
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
    min_lr: float | None = None  # the schedule's last rate; None: lr / 10
    warmup_steps: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # WSD: the share of steps spent decaying
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    loss: LossSpec = field(default_factory=LossSpec)
    cache_teacher: bool = False
    teacher_cache_dir: str | None = None  # a cache shared by several runs (default: the run's teacher_cache/)
    cache_targets: str | None = None  # sampled | top-k; None: sampled for forward KL, else top-k
    top_k: int = 64  # the cache's draws (sampled) or most likely tokens (top-k) per position
    attention_loss: float = 0.0  # weight of the attention-transfer KL (compressor.attention_transfer); 0: off
    attention_queries: int = 256  # query positions per micro-batch whose attention rows it matches
    quantize: str | None = None  # fp8 | nvfp4: quantization-aware training of a fake-quantized student
    quantize_keep: tuple[str, ...] = ()  # ModelOpt quantizer-name patterns kept in high precision
    calib_sequences: int = 128  # training sequences that calibrate the quantizers
    eval_every: int = 50
    eval_at_start: bool = True  # also validate before the first step (a curve's start); a search's finalists do not
    eval_sequences: int = 64
    eval_task: str | None = None  # a retrieval task (compressor.tasks) measured at each validation
    eval_ctx: int = 1024  # its context length
    eval_task_sequences: int = 8  # its sequences (16 queries each)
    save_every: int = 100
    log_every: int = 10
    valid_fraction: float = 0.05
    max_sequences: int | None = None
    seed: int = 0
    dtype: str = "float32"  # student master weights
    teacher_dtype: str | None = None  # None: bf16 on CUDA, else the student's dtype
    autocast: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, more compute
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"], out["quantize_keep"] = list(self.betas), list(self.quantize_keep)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        raw["loss"] = LossSpec(**raw["loss"])
        raw["betas"] = tuple(raw["betas"])
        raw["quantize_keep"] = tuple(raw.get("quantize_keep", ()))
        raw.setdefault("cache_targets", "top-k")  # written before sampled targets
        return cls(**raw)

    @classmethod
    def from_options(cls, *, tokens: str | None = None, eval_ctx: str = "1k", **options: Any) -> TrainConfig:
        """A run from its written form: `tokens` ('50M'), `eval_ctx` ('4k'), paths as str or Path, the
        LossSpec's fields (divergence, temperature, ...) among the others; checked (`validate`)."""
        from compressor.budget import parse_context, parse_tokens

        loss = LossSpec(**{f.name: options.pop(f.name) for f in dataclasses.fields(LossSpec) if f.name in options})
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
        budget = parse_tokens(tokens) if tokens is not None else None
        config = cls(tokens=budget, eval_ctx=parse_context(eval_ctx), loss=loss, **options)
        config.validate()
        return config

    @property
    def data_spec(self) -> DataSpec:
        """The run's data: the first `max_sequences` sequences, split into training and validation by `_data`."""
        return DataSpec(self.data, self.seq_len, self.tokenizer, self.text_field, self.max_sequences)

    def resolved_teacher_dtype(self, device: torch.device) -> str:
        """The teacher's dtype: as asked, else bf16 on CUDA and the student's dtype elsewhere."""
        return self.teacher_dtype or ("bfloat16" if device.type == "cuda" else self.dtype)

    @property
    def teacher_targets(self) -> str | None:
        """What the teacher cache holds (`compressor.teacher_cache`); None without one."""
        if not self.cache_teacher:
            return None
        if self.cache_targets is not None:
            return self.cache_targets
        return "sampled" if self.loss.divergence == "forward_kl" else "top-k"

    @property
    def final_lr(self) -> float:
        """The learning rate the schedule decays to: `min_lr`, by default a tenth of `lr`."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def validate(self) -> None:
        """Raise an OptionError naming the first option out of its range."""
        checks = [
            (
                "resume",
                not (self.resume and self.overwrite),
                f"continues {self.out}, --overwrite replaces it: give one",
            ),
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
            ("min_lr", math.isfinite(self.final_lr) and 0 <= self.final_lr <= self.lr, "must be between 0 and --lr"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be at least 0"),
            ("schedule", self.schedule in ("cosine", "wsd", "constant"), "must be cosine, wsd or constant"),
            ("decay_fraction", 0 < self.decay_fraction <= 1, "must be in (0, 1]"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be at least 0"),
            ("grad_clip", math.isfinite(self.grad_clip) and self.grad_clip >= 0, "must be at least 0 (0: off)"),
            ("autocast", self.autocast in ("auto", "bf16", "off"), "must be auto, bf16 or off"),
            ("eval_every", self.eval_every >= 1, "must be at least 1"),
            ("eval_sequences", self.eval_sequences >= 1, "must be at least 1"),
            ("eval_task", self.eval_task in (None, *TASKS), f"must be one of {', '.join(TASKS)}"),
            ("eval_ctx", self.eval_ctx >= 2, "must be at least 2"),
            ("eval_task_sequences", self.eval_task_sequences >= 1, "must be at least 1"),
            ("save_every", self.save_every >= 1, "must be at least 1"),
            ("log_every", self.log_every >= 1, "must be at least 1"),
            ("valid_fraction", 0 < self.valid_fraction < 1, "must be between 0 and 1"),
            ("max_sequences", self.max_sequences is None or self.max_sequences >= 1, "must be at least 1"),
            ("seed", self.seed >= 0, "must be at least 0"),
            ("top_k", self.top_k >= 1, "must be at least 1"),
            # a token's draws are formed together, in a chunk of the head's logits (losses.CHUNK_LOGITS)
            ("top_k", self.top_k <= CHUNK_LOGITS, f"must be at most {CHUNK_LOGITS:,} (a token's draws fill a chunk)"),
            ("cache_targets", self.cache_targets in (None, *TARGETS), f"must be one of {', '.join(TARGETS)}"),
            (
                "cache_targets",
                not (self.teacher_targets == "sampled" and self.loss.divergence != "forward_kl"),
                f"must be top-k with --divergence {self.loss.divergence} (sampled targets estimate forward KL only)",
            ),
            ("cache_teacher", not (self.cache_teacher and self.teacher is None), "needs a teacher"),
            ("attention_loss", math.isfinite(self.attention_loss) and self.attention_loss >= 0, "must be at least 0"),
            ("attention_loss", not (self.attention_loss > 0 and self.teacher is None), "needs a teacher"),
            (
                "attention_loss",
                not (self.attention_loss > 0 and self.cache_teacher),
                "needs the teacher in memory: leave out --cache-teacher",
            ),
            ("attention_queries", self.attention_queries >= 1, "must be at least 1"),
            ("quantize", self.quantize in (None, "fp8", "nvfp4"), "must be fp8 or nvfp4"),
            ("calib_sequences", self.calib_sequences >= 1, "must be at least 1"),
        ]
        for name, ok, problem in checks:
            if not ok:
                value = getattr(self, name)
                raise OptionError(name, problem if isinstance(value, bool) else f"{problem}, got {value}")
        check_applies(self, {
            "top_k": ("--cache-teacher", self.cache_teacher),
            "teacher_cache_dir": ("--cache-teacher", self.cache_teacher),
            "cache_targets": ("--cache-teacher", self.cache_teacher),
            "decay_fraction": ("--schedule wsd", self.schedule == "wsd"),
            "min_lr": ("--schedule cosine or wsd", self.schedule != "constant"),
            "attention_queries": ("--attention-loss", self.attention_loss > 0),
            "calib_sequences": ("--quantize", self.quantize is not None),
            "quantize_keep": ("--quantize", self.quantize is not None),
            "eval_ctx": ("--eval-task", self.eval_task is not None),
            "eval_task_sequences": ("--eval-task", self.eval_task is not None),
        })  # fmt: skip
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
        return config.final_lr + (config.lr - config.final_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = total - max(1, round(config.decay_fraction * total))  # WSD: warmup, stable, then linear decay
    if step < decay_start:
        return config.lr
    progress = (step - decay_start + 1) / (total - decay_start)
    return config.lr + (config.final_lr - config.lr) * min(progress, 1.0)


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
    teacher_seconds: float = 0.0  # spent writing the teacher cache (0 when it was there already)


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
    data_fingerprint: str = ""  # of the sequences the run reads: a resumed run must read the same
    retrieval: TaskScorer | None = None  # the `eval_task` probe, generated once
    attention_pairs: tuple[Pair, ...] = ()  # (student, teacher, heads) attention blocks, with attention_loss
    teacher_seconds: float = 0.0  # spent writing the teacher cache in this process

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
    retrieval: TaskScorer | None = None,
) -> TrainResult:
    """Run (or resume) a training / distillation run; see the module docstring. `teacher` and `sequences`
    may be given already loaded (a search distils many students from one teacher and one read of the
    data); they must be what `config.teacher` and `config.data` name. `retrieval`, a probe already built,
    is measured at each validation in place of `config.eval_task`'s."""
    reporter = reporter or SilentReporter()
    config.validate()
    out = Path(config.out)
    main_process = int(os.environ.get("RANK", "0")) == 0
    with output_lock(out) if main_process else contextlib.nullcontext():
        work, resumed = _prepare_output(config, out)
        world = distributed.init(distributed.resolve_device(config.device))
        try:
            run = setup(config, world, work, resumed, reporter, teacher=teacher, sequences=sequences,
                        retrieval=retrieval)  # fmt: skip
            result = loop(run, reporter)
        except BaseException:
            # a new run that stops before its first checkpoint leaves nothing behind, unless it cached teacher
            # targets (which --resume reuses)
            new = world.is_main and not config.resume and work.exists() and not (work / "model").exists()
            if new and not _holds_teacher_targets(work):
                shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            distributed.close(world)
        if main_process and work != out:
            swap_in(work, out)  # an --overwrite run replaces the old one only now that it is complete
    return dataclasses.replace(result, out=out)


def check_run(config: TrainConfig) -> None:
    """What a run checks of its paths before it loads anything, for a dry run to check too: its data (a path
    that exists, of a format read) and, when `config.out` is given, its output folder (`_prepare_output`:
    a new run's is new or --overwrite, a resumed one holds a run of the same options). Nothing is written,
    but for finishing a swap a kill interrupted there, as any command does."""
    if config.data is not None:
        local_path(config.data)
    if config.out is not None:
        _prepare_output(config, Path(config.out))


def _prepare_output(config: TrainConfig, out: Path) -> tuple[Path, dict[str, Any] | None]:
    """(the folder the run works in, the state of the checkpoint it resumes from, if any).

    A new run works in `out`, or, replacing an existing run (--overwrite), in `staging(out)` until it is
    complete. --resume continues a staged run if there is one, else the run in `out`; a run killed before
    its first checkpoint starts again in place (keeping its teacher cache, whole or being written). The
    folder of --teacher-cache is checked first (`teacher_cache.check_cache_folder`)."""
    inputs = (config.student, config.teacher, config.data, tokenizer_file(config.tokenizer))
    if config.teacher_cache_dir is not None:
        check_cache_folder(Path(config.teacher_cache_dir), inputs)
    if not config.resume:
        recover(out)
        if not config.overwrite and _is_run(out):  # the same advice as --resume gives for it
            recover(out / "model")
            if has_trainer_state(out / "model"):
                held = "a run with a checkpoint"
            elif _holds_teacher_targets(out):
                held = "the teacher targets of a run stopped before its first checkpoint"
            else:
                held = "no progress (a run stopped before its first checkpoint)"
            raise TrainingError(
                f"output {out} already exists and holds {held}: continue it with --resume, or pass --overwrite "
                "to start it again"
            )
        check_output(out, overwrite=config.overwrite, inputs=inputs)
        return (staging(out) if out.exists() else out), None
    work = staging(out) if _is_run(staging(out)) else out
    if work.is_dir():
        refuse_links(work, "a run folder")  # what the run writes and deletes stays inside it
    recover(work / "model")  # a kill during a checkpoint's swap
    if not has_trainer_state(work / "model"):
        if _is_run(work):  # a run killed before its first checkpoint starts again in place
            return work, None
        raise TrainingError(
            f"nothing to resume: {work} holds no run (no {STATE_FILE} in {work / 'model'}); start a run without "
            "--resume"
        )
    resumed = _read_trainer_state(work / "model")
    try:
        saved = TrainConfig.from_dict(resumed["config"])
    except (KeyError, TypeError, CompressorError) as exc:
        state_file = trainer_dir(work / "model") / STATE_FILE
        raise TrainingError(f"{state_file} is damaged ({exc}): start again with --overwrite") from None
    _check_resume(config, saved)
    return work, resumed


RUN_ENTRIES = ("model", "metrics.jsonl", "teacher_cache")
# what a run killed before any of them leaves: a checkpoint or a teacher cache being written
RUN_SCRATCH = (".model.", ".teacher_cache.")


def _holds_teacher_targets(folder: Path) -> bool:
    """Whether a run folder holds a teacher cache, whole or being written."""
    return any((folder / name).is_dir() for name in ("teacher_cache", ".teacher_cache.partial"))


def _is_run(folder: Path) -> bool:
    """Whether `folder` is a run folder this recipe started: it holds a checkpoint, metrics or a teacher
    cache, or only what a run killed before them leaves (nothing at all, when killed while loading the
    models, or the checkpoint or teacher cache it was writing)."""
    if not folder.is_dir():
        return False
    names = [entry.name for entry in folder.iterdir()]
    return any(name in RUN_ENTRIES for name in names) or all(name.startswith(RUN_SCRATCH) for name in names)


def _check_fits(config: TrainConfig, world: distributed.World, student: Path) -> None:
    """Refuse, before anything is loaded, a run its device cannot hold at its processes (the dry run's plan:
    weights, gradients, AdamW, the teacher, one micro-batch's activations and loss chunk); `student` is the
    checkpoint the run starts from (a resumed run's own)."""
    from compressor import planning

    teacher = check_weights(config.teacher) if config.teacher is not None else None
    plan = planning.training_plan(config, check_weights(student), teacher, world.device)
    planning.check_plan_fits(
        plan, world, shape=f"{config.micro_batch_size} x {config.seq_len:,} tokens a micro-batch",
        levers="--seq-len or --micro-batch-size (or --activation-checkpointing)",
    )  # fmt: skip


def setup(
    config: TrainConfig,
    world: distributed.World,
    out: Path,
    resumed: dict[str, Any] | None,
    reporter: Reporter,
    *,
    teacher: HybridLM | None = None,
    sequences: TokenSequences | None = None,
    retrieval: TaskScorer | None = None,
) -> Run:
    """The run folder `out`, the models, the data and its split, the teacher cache, sharding, AdamW, and the
    state of a resumed run."""
    torch.manual_seed(config.seed)
    if world.is_main:
        check_free_space(out, _save_bytes(config), "saving the run's checkpoints")
    if world.is_main and resumed is None:
        if out.exists() and not config.resume:
            shutil.rmtree(out)  # a stale staging folder of an earlier --overwrite attempt
        out.mkdir(parents=True, exist_ok=True)
        if (out / "metrics.jsonl").exists():  # a run killed before its first checkpoint starts again
            (out / "metrics.jsonl").unlink()
    distributed.barrier(world)

    # sharded as they load (each process reads its rows), a resumed run continuing from its own checkpoint; a
    # quantization-aware run shards after ModelOpt has replaced the student's linear layers
    if teacher is None:  # a teacher given loaded is already in the device's memory
        _check_fits(config, world, out / "model" if resumed else Path(config.student))
    qad = config.quantize is not None
    student = load_model(
        out / "model" if resumed else config.student,
        dtype=config.dtype,
        device=world.device,
        world=None if qad else world,
        frozen=False,
    )
    if teacher is None and config.teacher is not None:
        teacher = load_model(config.teacher, dtype=config.resolved_teacher_dtype(world.device), world=world)
    if teacher is not None:
        teacher.requires_grad_(False)
        check_same_vocab(teacher, student)
        check_same_tokenizer(config.teacher, config.tokenizer or config.student)
    train_set, valid_set, accum, total_steps, data_fingerprint = _data(config, world, student, sequences)
    if resumed is not None and resumed.get("data_fingerprint", data_fingerprint) != data_fingerprint:
        raise TrainingError(
            f"{config.data} no longer holds the data this run started on (its content changed): resume with the "
            "same data, or start a new run"
        )
    if qad:
        _fake_quantize(student, config, train_set, out if resumed else None)
        distributed.shard(student, world)
    pairs = None  # what may refuse the run comes before its first line and its long work (the teacher cache)
    if config.attention_loss > 0:
        pairs = attention_pairs(config.student, student.config, config.teacher, teacher.config)
    if config.eval_task is not None and retrieval is None:
        if world.size > 1:
            raise OptionError("eval_task", "is measured in one process: run without torchrun")
        probe = RetrievalConfig(config.eval_task, config.eval_ctx, config.eval_task_sequences)
        retrieval = probe.scorer(config.tokenizer or config.student, config.data, model=student, parameter="eval_ctx")
    # what the run reads (the validation split is capped at --eval-sequences): said before the teacher cache is
    # written, after a cache that is there is checked (one written for other data refuses the run)
    line = (
        f"data: {len(train_set):,} training and {len(valid_set):,} validation sequences of {config.seq_len:,} "
        f"tokens; steps: {total_steps:,} of {config.batch_size * config.seq_len:,} tokens each"
    )
    say_data = (lambda: reporter.note(line)) if resumed is None else (lambda: None)

    cache, teacher_started = None, time.monotonic()
    if config.cache_teacher:
        cache = _teacher_cache(config, world, teacher, train_set, valid_set, accum, total_steps, out, reporter,
                               first=say_data)  # fmt: skip
        teacher = None  # train from the cache; the teacher leaves memory
    if cache is None or not cache.written:  # a write said it first
        say_data()
    teacher_seconds = time.monotonic() - teacher_started if cache is not None and cache.written else 0.0
    student.train()
    student.backbone.checkpointing = config.activation_checkpointing

    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
        foreach=True,
    )
    run = Run(config, world, out, student, teacher, cache, train_set, valid_set, optimizer, accum, total_steps)
    run.teacher_seconds = teacher_seconds
    run.data_fingerprint = data_fingerprint
    run.retrieval = retrieval
    if pairs is not None:
        run.attention_pairs = pairs
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
    last_eval = evaluate(run, reporter) if first_step == 0 and config.eval_at_start else {}
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
    if config.quantize is not None and run.world.is_main:
        from compressor.quantize import export_qad_checkpoint

        reporter.note(f"writing the {config.quantize} export to {run.out / QUANTIZED_DIR}")
        export_qad_checkpoint(run.out / "model", run.out / QUANTIZED_DIR, overwrite=True)
    distributed.barrier(run.world)
    return TrainResult(
        steps=run.total_steps, tokens=run.tokens, final_eval=last_eval, out=run.out, teacher_seconds=run.teacher_seconds
    )


def step(run: Run, batches: Iterator[np.ndarray]) -> dict[str, Any]:
    """One optimizer step: this process's share of the global batch in micro-batches (each loss divided by
    the global token count, so the accumulated gradient is that of one large batch), clipping, the update.
    Returns the step's training metrics; stops the run on a non-finite loss."""
    config, world = run.config, run.world
    stats = LossStats()
    step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
    step_attention = 0.0
    autocast = _autocast(config.autocast, world.device)
    for j in range(run.accum * world.size):
        indices = next(batches)
        if j % world.size != world.rank:
            continue
        ids = run.train_set.take(indices).to(world.device)
        with _attention_maps(run, j, ids.shape[1]) as maps:
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
            if maps is not None:
                teacher_maps, student_maps = maps
                attention = attention_kl(teacher_maps(), student_maps(), run.attention_pairs)
                share = ids.numel() * world.size / run.tokens_per_step  # this micro-batch's share, as loss_sum's
                loss = loss + config.attention_loss * share * attention
                step_attention += float(attention.detach()) * share / world.size
            loss.backward()  # inside the recording: activation checkpointing recomputes the maps here
        step_loss += loss_sum.detach()
    fields = [float(step_loss), float(stats.divergence), float(stats.cross_entropy), float(stats.agreement)]
    total_loss, divergence, cross_entropy, agreement, tokens, label_tokens, attention = distributed.all_reduce_sum(
        [*fields, stats.tokens, stats.label_tokens, step_attention], world
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
    if run.attention_pairs:
        record["attention_kl"] = attention
    if config.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), config.grad_clip)
        record["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return record


@contextlib.contextmanager
def _attention_maps(run: Run, micro_batch: int, seq_len: int):
    """With --attention-loss, the teacher's and the student's recorded attention maps (functions returning
    them) for one micro-batch's forwards; the queries are drawn from (seed, step, micro-batch). Else None."""
    if not run.attention_pairs:
        yield None
        return
    rng = np.random.default_rng([run.config.seed, run.step, micro_batch])
    queries = sample_queries(seq_len, run.config.attention_queries, rng, run.world.device)
    student_blocks, teacher_blocks = [p.student for p in run.attention_pairs], [p.teacher for p in run.attention_pairs]
    with (
        recording(run.teacher, teacher_blocks, queries) as teacher_maps,
        recording(run.student, student_blocks, queries) as student_maps,
    ):
        yield teacher_maps, student_maps


def evaluate(run: Run, reporter: Reporter) -> dict[str, Any]:
    """Validation loss and perplexity (and KL / top-1 agreement to the teacher) by the one evaluation loop,
    `compressor.evaluate.evaluate`, with the retrieval probe's result; logged and reported."""
    run.student.eval()
    with _autocast(run.config.autocast, run.world.device):
        result = evaluate_batches(
            run.student, _valid_batches(run), teacher=run.teacher, chunk_tokens=run.config.loss.chunk_tokens,
            world=run.world,
        )  # fmt: skip
    run.student.train()
    if result.teacher_loss is not None:
        run.teacher_val_loss = result.teacher_loss
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
    if run.retrieval is not None:
        run.student.eval()
        retrieval = run.retrieval.result(run.student)
        run.student.train()
        record.update(val_retrieval_accuracy=retrieval.accuracy, val_retrieval_ll=retrieval.log_likelihood)
    _append(run.metrics, record, run.world)
    reporter.evaluated(record)
    return record


def _valid_batches(run: Run) -> Iterator[torch.Tensor | CachedBatch | None]:
    """This process's share of the validation micro-batches, in order; each with the teacher's cached targets
    when the run trains from a teacher cache."""
    every = run.valid_set.batch_indices(run.config.micro_batch_size, shuffle=False, drop_last=False)
    for indices in distributed.share(list(every), run.world):
        if indices is None:
            yield None
        elif run.cache is not None:
            yield CachedBatch(run.valid_set.take(indices), run.cache.get("valid", indices, run.world.device))
        else:
            yield run.valid_set.take(indices)


def save(run: Run) -> None:
    """Checkpoint the run (weights, optimizer, RNG, position) atomically, replacing the previous one; weights
    that are no longer finite stop the run instead, keeping the previous checkpoint."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in run.student.parameters())  # FSDP shards
    finite = all(bool(torch.isfinite(t.detach()).all()) for t in local)
    if distributed.all_reduce_sum([float(not finite)], run.world)[0] != 0:
        where = f"the checkpoint of step {run.last_saved} is kept" if run.last_saved else "no checkpoint was written"
        raise TrainingError(
            f"the weights became non-finite by step {run.step} ({where}): lower --lr or --weight-decay, "
            "raise --warmup-steps, then start again or --resume"
        )
    _save(run)
    run.last_saved = run.step


def _data(
    config: TrainConfig, world: distributed.World, student: HybridLM, sequences: TokenSequences | None
) -> tuple[TokenSequences, TokenSequences, int, int, str]:
    """(training split, validation split, micro-batches per process per step, total steps, the data's
    fingerprint)."""
    if sequences is None:
        arch = student.config
        sequences = read_sequences(config.data_spec, config.student, eos_id=arch.eos_id, vocab_size=arch.vocab_size)
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
    if config.warmup_steps is not None and config.warmup_steps > total_steps:  # the peak would never come
        raise OptionError("warmup_steps", f"must be at most the run's {total_steps} steps, got {config.warmup_steps}")
    return train_set, valid_set.head(usable), accum, total_steps, sequences.fingerprint()


def _save_bytes(config: TrainConfig) -> int:
    """What a checkpoint save needs on disk at its peak: the new checkpoint (weights, AdamW's two moments)
    written beside the previous one."""
    from compressor.budget import num_parameters
    from compressor.config import HybridConfig

    size = torch.empty(0, dtype=parse_dtype(config.dtype)).element_size()
    return 2 * 3 * num_parameters(HybridConfig.from_file(config.student)) * size


def _fake_quantize(student: HybridLM, config: TrainConfig, train_set: TokenSequences, resumed: Path | None) -> None:
    """Quantization-aware training (ModelOpt's QAD recipe): quantize the student and calibrate it on the
    first training sequences (the same on every process), or restore the ranges a resumed run saved."""
    from compressor.quantize import QuantRecipe, prepare_qad, read_quantizer_state, restore_fake_quant

    saved = read_quantizer_state(resumed / "model") if resumed is not None else None
    if saved is not None:
        restore_fake_quant(student, *saved)
        return
    calibration = train_set.head(config.calib_sequences).batches(config.micro_batch_size, shuffle=False)
    prepare_qad(student, QuantRecipe(config.quantize, config.quantize_keep), calibration)


def _teacher_cache(
    config, world, teacher, train_set, valid_set, accum, total_steps, out, reporter, first=lambda: None
) -> TeacherCache:
    """The teacher's targets over the sequences the run will see, written once (resuming a write that was
    killed) and reused; a shared cache (--teacher-cache) that lacks some of them, written by a shorter run,
    has them added. `first` is called before a write begins."""
    cache_dir = Path(config.teacher_cache_dir) if config.teacher_cache_dir else out / "teacher_cache"
    targets = config.teacher_targets
    micro = config.micro_batch_size
    # only the training sequences the run will see (all of them once it passes an epoch)
    batches = _micro_batches(train_set, micro, config.seed, 0)
    seen = min(total_steps * accum * world.size, train_set.num_batches(micro))
    used = np.unique(np.concatenate([next(batches) for _ in range(seen)]))
    splits = {"train": (train_set, used), "valid": (valid_set, np.arange(len(valid_set)))}
    needed = {name: positions for name, (_, positions) in splits.items()}
    teacher_id = fingerprint(config.teacher)
    data = {name: sequences.fingerprint() for name, (sequences, _) in splits.items()}

    def write(target: Path, parts: dict[str, tuple[TokenSequences, np.ndarray]]) -> None:
        write_teacher_cache(target, teacher, parts, config.top_k, config.loss.temperature, world, targets=targets,
                            seed=config.seed, teacher_id=teacher_id, data=data, say=reporter.note)  # fmt: skip

    def opened(holding: dict[str, np.ndarray] | None = None) -> TeacherCache:
        return TeacherCache(cache_dir, config.top_k, config.loss.temperature, targets, config.seed, teacher=teacher_id,
                            needed=holding, data=data)  # fmt: skip

    def missing() -> bool:  # the main process decides for all
        absent = world.is_main and not TeacherCache.is_complete(cache_dir)
        return distributed.all_reduce_sum([float(absent)], world)[0] > 0

    def lacking(cache: TeacherCache) -> dict[str, np.ndarray]:  # what it lacks of the run's; the main decides
        found = {name: positions for name, positions in cache.lacking(needed).items() if len(positions)}
        any_found = distributed.all_reduce_sum([float(world.is_main and bool(found))], world)[0] > 0
        return found if any_found else {}

    if world.is_main and config.teacher_cache_dir:  # a shared cache being put in place by another run's extension,
        settle(cache_dir)  # or left aside by a kill
    written = False
    if missing():  # a cache several runs share (--teacher-cache) is written by one of them, under a lock
        with output_lock(cache_dir) if world.is_main else contextlib.nullcontext():
            written = missing()  # another run may have written it meanwhile
            if written:
                first()
                what = f"{config.top_k} draws from" if targets == "sampled" else f"the top-{config.top_k} log-probs of"
                reporter.note(f"caching {what} the teacher's next-token distributions in {cache_dir}")
                write(cache_dir, splits)
    cache = opened()  # refuses a cache of another teacher, data or targets
    if not written and lacking(cache):  # a shared cache of a shorter run: the sequences it lacks are added
        cache.close()
        with output_lock(cache_dir) if world.is_main else contextlib.nullcontext():
            distributed.barrier(world)  # every process reads it under the main one's lock
            cache = opened()
            extra = lacking(cache)  # another run may have added them meanwhile
            if extra:
                cache.close()
                first()
                count = ", ".join(f"{len(positions):,} {name}" for name, positions in extra.items())
                reporter.note(f"adding the teacher's targets of {count} sequences to the cache in {cache_dir}")
                adding = {name: (splits[name][0], positions) for name, positions in extra.items()}
                extend_teacher_cache(cache_dir, extra, world, lambda target: write(target, adding))
                written = True
                cache = opened(needed)
    cache.written = written
    return cache


def _micro_batches(train_set: TokenSequences, micro: int, seed: int, start: int) -> Iterator[np.ndarray]:
    """Indices of the global sequence of micro-batches from position `start` on, epoch after epoch."""
    per_epoch = train_set.num_batches(micro)
    epoch, offset = divmod(start, per_epoch)
    while True:
        yield from train_set.batch_indices(micro, seed=seed, epoch=epoch, start=offset)
        epoch, offset = epoch + 1, 0


def _autocast(mode: str, device: torch.device):
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _append(path: Path, record: dict[str, Any], world: distributed.World) -> None:
    """Append one record as one line in one write (a kill leaves at most a torn last line, which readers skip)."""
    if world.is_main:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[dict[str, Any]]:
    """The metrics records, skipping a line a kill left half-written."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # a torn last line (or a damaged one): skipped
            continue
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]


def _last_eval(path: Path, step: int) -> dict[str, Any] | None:
    """The evaluation record of `step` in the metrics file, if there is one."""
    found = [r for r in _records(path) if r.get("kind") == "eval" and r["step"] == step]
    return found[-1] if found else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint a resumed run starts from (and a torn last line)."""
    if path.is_file():
        kept = [r for r in _records(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _save(run: Run) -> None:
    """Write the checkpoint (weights, optimizer, RNG, position) atomically, replacing the previous one."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    folder, student, config = run.out / "model", run.student, run.config
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(student, options=options)
    optim_state = get_optimizer_state_dict(student, run.optimizer, options=options)
    if not run.world.is_main:
        return
    tensors = {
        f"state.{name}.{key}": value for name, entry in optim_state["state"].items() for key, value in entry.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in group.items()} for group in optim_state["param_groups"]]
    state = {
        "format": 1,
        "step": run.step,
        "tokens": run.tokens,
        "teacher_val_loss": run.teacher_val_loss,
        "data_fingerprint": run.data_fingerprint,
        "param_groups": groups,
        "config": config.to_dict(),
    }
    # tokenizer files: from the previous checkpoint of this run, else from where the run got them
    tokenizer_from = folder if (folder / "tokenizer.json").is_file() else _tokenizer_folder(config)
    quantizers = {}
    if config.quantize is not None:  # a standard checkpoint of the weights + the calibrated ranges beside it
        from compressor.quantize import QuantRecipe, split_quantizer_state

        model_state, quantizers = split_quantizer_state(model_state)
    with atomic_output(folder, overwrite=True) as tmp:
        write_checkpoint(tmp, student.config, model_state, tokenizer_from=tokenizer_from)
        if quantizers:
            from compressor.quantize import write_quantizer_state

            write_quantizer_state(tmp, QuantRecipe(config.quantize, config.quantize_keep), quantizers)
        (tmp / TRAINER_DIR).mkdir()
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / TRAINER_DIR / OPTIMIZER_FILE)
        (tmp / TRAINER_DIR / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def trainer_dir(checkpoint: Path) -> Path:
    """Where a checkpoint folder keeps its resume state: `trainer/`, or the folder itself in runs written
    before it moved there."""
    nested = Path(checkpoint) / TRAINER_DIR
    return nested if nested.is_dir() or not (Path(checkpoint) / STATE_FILE).is_file() else Path(checkpoint)


def has_trainer_state(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds what --resume needs to continue its run."""
    return (trainer_dir(checkpoint) / STATE_FILE).is_file()


def _tokenizer_folder(config: TrainConfig) -> Path:
    if config.tokenizer is None:
        return Path(config.student)
    path = Path(config.tokenizer)
    return path if path.is_dir() else path.parent


def _read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    folder = trainer_dir(checkpoint)
    path = folder / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"nothing to resume: no {STATE_FILE} in {folder} (start a new run without --resume)")
    try:
        state = read_json(path, "a run's trainer state")
        check_record(TrainerState, state, str(path))
        check_record(TrainConfig, state["config"], f"{path}: config")
        if state["step"] < 0 or state["tokens"] < 0:
            raise CompressorError(f"{path}: step and tokens must be at least 0")
    except CompressorError as exc:
        raise TrainingError(f"{first_line(exc)}: start the run again with --overwrite") from None
    if not (folder / OPTIMIZER_FILE).is_file():
        raise TrainingError(
            f"{folder} lacks {OPTIMIZER_FILE}: the checkpoint is incomplete; start again with --overwrite"
        )
    return state


@dataclass
class TrainerState:
    """`trainer_state.json` as `_save` writes it, what `_read_trainer_state` checks it against."""

    step: int
    tokens: int
    param_groups: list[dict[str, Any]]
    config: dict[str, Any]
    format: int = 1
    teacher_val_loss: float | None = None
    data_fingerprint: str = ""  # none in runs written before it was recorded


# options compared by the value they resolve to: a default written out, or left out, is the same run
RESOLVED = {"min_lr": "final_lr", "cache_targets": "teacher_targets"}


def _check_resume(new: TrainConfig, saved: TrainConfig) -> None:
    value = lambda config, name: getattr(config, RESOLVED.get(name, name))  # noqa: E731
    changed = [name for name in RUN_DEFINING if value(new, name) != value(saved, name)]
    if changed:
        detail = ", ".join(f"{n} ({value(saved, n)!r} in the run, {value(new, n)!r} now)" for n in changed)
        raise TrainingError(f"--resume with different options: {detail}; resume with the run's options")


def _load_optimizer(checkpoint: Path, student, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    folder = trainer_dir(checkpoint)
    state = _read_trainer_state(checkpoint)
    try:
        with open_tensors(folder / OPTIMIZER_FILE, "an optimizer state") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
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
    except (OSError, SafetensorError, CompressorError, KeyError, RuntimeError, ValueError) as exc:
        raise TrainingError(
            f"{folder / OPTIMIZER_FILE} cannot be restored ({first_line(exc)}): start the run again with --overwrite"
        ) from None
