"""`compress eval`: checkpoints in, their metrics out, side by side, in the mode the config's type names.

- `LossEval`: mean next-token loss and perplexity of every model on the same sequences of `data` (with a
  teacher: KL(teacher || model) and top-1 agreement). Under `torchrun --nproc-per-node N` the models are
  sharded across the processes and each evaluates its share of the batches; the main process gets the record.
- `RetrievalEval`: exact match and answer log-likelihood of each model on the same generated retrieval
  sequences (phonebook, mqar, needle) at each context length.
- `LmEvalTasks`: lm-eval's task metrics of each model (the `eval` extra).

`evaluate_checkpoints(models, config)` checks the config, runs its mode and returns its record;
`eval_mode` reads the mode from the options written and refuses those that would do nothing in it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.data import DataSpec, check_same_tokenizer, read_sequences
from compressor.errors import CompressorError, OptionError, check_at_least
from compressor.evaluate import EvalResult
from compressor.tasks import TaskResult, TaskSpec, parse_contexts

SPLITS = ("all", "valid", "train")


# The eval modes (--task, --lm-eval-tasks, --data) each option applies in: written for another, it would do nothing.
OPTION_MODES = {
    **dict.fromkeys(("ctx", "task_sequences"), ("task",)),
    **dict.fromkeys(("num_fewshot", "limit", "include_path"), ("lm_eval_tasks",)),
    **dict.fromkeys(("teacher", "seq_len", "max_sequences", "split", "valid_fraction", "tokenizer", "text_field"),
                    ("data",)),
    "weights_only": ("lm_eval_tasks", "data"),
    "seed": ("task", "data"),
}  # fmt: skip


def eval_mode(given: Collection[str], split: str = "all") -> str:
    """The eval mode the options in `given` (the command's, as written) select: "task", "lm_eval_tasks" or
    "data". Raises an OptionError for two modes at once and for an option that would do nothing in the mode
    (one of another mode's, or the split's --valid-fraction and --seed with --split all)."""
    modes = [mode for mode in ("task", "lm_eval_tasks") if mode in given]
    if len(modes) > 1:
        raise OptionError("lm_eval_tasks", "and --task are two evaluations: run them one at a time")
    mode = modes[0] if modes else "data"
    for name in sorted(given):  # sorted: the option named does not depend on set order
        owners = OPTION_MODES.get(name, (mode,))
        if mode not in owners:
            flags = " or ".join(f"--{owner.replace('_', '-')}" for owner in owners)
            raise OptionError(name, f"applies to {flags} evaluation only")
        if mode == "data" and split == "all" and name in ("valid_fraction", "seed"):
            raise OptionError(name, "applies with --split valid or --split train only (all uses every sequence)")
    return mode


@dataclass(frozen=True)
class LossEval:
    """The loss mode: which data, how it is cut into batches, and the teacher to compare with."""

    data: str
    teacher: str | Path | None = None
    seq_len: int = 512
    batch_size: int = 8
    max_sequences: int | None = None
    split: str = "all"  # or valid / train: the deterministic split of the data
    valid_fraction: float = 0.1
    seed: int = 0  # of the split
    tokenizer: str | Path | None = None
    text_field: str = "text"
    weights_only: bool = False  # quantized checkpoints: dequantized weights, no activation quantization
    device: str = "auto"
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise OptionError("split", f"{self.split!r} is not one of {', '.join(SPLITS)}")
        check_at_least(
            seq_len=(self.seq_len, 2),
            batch_size=(self.batch_size, 1),
            max_sequences=(self.max_sequences, 1),
            seed=(self.seed, 0),
        )
        if not 0 < self.valid_fraction < 1:
            raise OptionError("valid_fraction", f"must be between 0 and 1, got {self.valid_fraction}")

    @property
    def data_spec(self) -> DataSpec:
        """The sequences every model is evaluated on: at most `max_sequences` of the split."""
        return DataSpec(self.data, self.seq_len, self.tokenizer, self.text_field, self.max_sequences, self.split,
                        self.valid_fraction, self.seed)  # fmt: skip


@dataclass(frozen=True)
class RetrievalEval:
    """The retrieval mode: the task, its context lengths (`ctx`, e.g. '1k,4k') and sequences per context."""

    task: str
    ctx: str = "1k"
    task_sequences: int = 8  # 16 queries each
    data: str | None = None  # needle: the filler text
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.data is not None and self.task != "needle":
            raise OptionError("data", f"is the needle task's filler text: {self.task} writes its own; leave it out")
        self.contexts  # noqa: B018  (a context the task cannot take is refused first)
        check_at_least(task_sequences=(self.task_sequences, 1), batch_size=(self.batch_size, 1), seed=(self.seed, 0))
        self.spec  # noqa: B018  (the task's name and its data)

    @property
    def contexts(self) -> tuple[int, ...]:
        return parse_contexts(self.ctx)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.task, sequences=self.task_sequences, data=self.data, seed=self.seed)


@dataclass(frozen=True)
class LmEvalTasks:
    """The lm-eval mode: task names or task YAML files (comma-separated; a YAML's !function tags run Python
    code from its folder), and lm-eval's own settings."""

    lm_eval_tasks: str
    num_fewshot: int | None = None
    limit: float | None = None  # documents per task; below 1: a share
    include_path: str | Path | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str | None = None
    weights_only: bool = False

    def __post_init__(self) -> None:
        check_at_least(num_fewshot=(self.num_fewshot, 0), batch_size=(self.batch_size, 1))
        limit = self.limit
        if limit is not None and not (limit > 0 and (limit < 1 or limit == int(limit))):
            raise OptionError("limit", f"must be a whole number of documents or a share below 1, got {limit:g}")

    @property
    def names(self) -> list[str]:
        return [name.strip() for name in self.lm_eval_tasks.split(",") if name.strip()]

    @property
    def documents(self) -> int | float | None:
        """`limit` as lm-eval takes it: an int counts documents, a float is a share."""
        return int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit


EvalConfig = LossEval | RetrievalEval | LmEvalTasks


@dataclass
class ModelLoss:
    """One model of the loss mode: its parameters, its stored weight format and its metrics."""

    model: Path
    params: int
    format: str  # the quantization algorithm, else the stored dtypes ("bfloat16")
    result: EvalResult


@dataclass
class LossRecord:
    """The loss mode: every model on `sequences` sequences of `seq_len` tokens of `data`."""

    data: str
    sequences: int
    seq_len: int
    teacher: Path | None
    models: list[ModelLoss]

    def to_dict(self) -> dict[str, Any] | list[dict[str, Any]]:
        """One model's metrics, or a list of them for several models."""
        teacher = str(self.teacher) if self.teacher else None
        rows = [
            {"model": str(m.model), "params": m.params, "format": m.format, "teacher": teacher, **m.result.to_dict()}
            for m in self.models
        ]
        return rows[0] if len(rows) == 1 else rows


@dataclass
class RetrievalRecord:
    """The retrieval mode: each model's results at each context, in the order of `contexts`."""

    task: str
    contexts: tuple[int, ...]
    results: dict[Path, list[TaskResult]]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "models": {str(p): [r.to_dict() for r in rs] for p, rs in self.results.items()}}


@dataclass
class LmEvalRecord:
    """The lm-eval mode: one `harness.ModelTaskResults` per model, in the order given."""

    config: LmEvalTasks
    results: list[Any]

    def to_dict(self) -> list[dict[str, Any]]:
        return [result.to_dict() for result in self.results]


EvalRecord = LossRecord | RetrievalRecord | LmEvalRecord


def evaluate_checkpoints(
    models: Sequence[str | Path],
    config: EvalConfig,
    *,
    on_tokens: Callable[[int, int], None] | None = None,
    on_model: Callable[[Path], None] | None = None,
) -> EvalRecord | None:
    """Evaluate `models` in `config`'s mode (module docstring). Progress: `on_tokens(tokens, total)` after
    each batch of the loss mode (on the main process), `on_model(path)` as each model's retrieval starts.
    Returns None on the other processes of a torchrun."""
    paths = [Path(model) for model in models]
    if not paths:
        raise OptionError("models", "needs at least one checkpoint")
    seen: dict[Path, Path] = {}
    for path in paths:
        first = seen.setdefault(path.expanduser().resolve(), path)
        if first is not path:
            twice = f"{path} is given twice" if str(first) == str(path) else f"{first} and {path} are one checkpoint"
            raise OptionError("models", f"{twice}: give each once")
    if isinstance(config, LossEval):
        return _loss(paths, config, on_tokens)
    if isinstance(config, RetrievalEval):
        return _retrieval(paths, config, on_model)
    return _lm_eval(paths, config)


def _loss(models: list[Path], config: LossEval, on_tokens: Callable[[int, int], None] | None) -> LossRecord | None:
    """Every model on the same sequences, sharded under torchrun."""
    from compressor import distributed
    from compressor.budget import num_parameters
    from compressor.checkpoint import load_model
    from compressor.evaluate import evaluate
    from compressor.quantize import stored_weight_bytes

    results = []
    tokenizer = config.tokenizer or models[0]  # the data's ids, every model's input
    _check_tokenizers(models, tokenizer)
    if config.teacher is not None:  # KL and top-1 agreement compare the same ids' next-token distributions
        check_same_tokenizer(config.teacher, tokenizer)
    with distributed.session(config.device) as world:
        _check_fits(models, config, world)
        teacher = load_model(config.teacher, dtype=config.dtype, world=world) if config.teacher is not None else None
        first = _deployed(models[0], config, world)
        arch = first.config
        sequences = read_sequences(config.data_spec, models[0], eos_id=arch.eos_id, vocab_size=arch.vocab_size)
        batches = distributed.share(list(sequences.batches(config.batch_size, shuffle=False, drop_last=False)), world)
        total = sequences.num_tokens * len(models)
        advance = (lambda n: on_tokens(n * world.size, total)) if on_tokens and world.is_main else None
        for path in models:
            student = first if path == models[0] else _deployed(path, config, world)
            result = evaluate(student, batches, teacher=teacher, on_batch=advance, world=world)
            weights = stored_weight_bytes(path)
            formats = weights.quant_algo or "/".join(weights.by_dtype)
            results.append(ModelLoss(path, num_parameters(student.config), formats, result))
            del student
    if not world.is_main:
        return None
    teacher_path = Path(config.teacher) if config.teacher is not None else None
    return LossRecord(config.data, len(sequences), config.seq_len, teacher_path, results)


def _check_tokenizers(models: list[Path], tokenizer: str | Path) -> None:
    """Refuse models whose tokenizers differ from `tokenizer`'s, the one that writes the ids they all read."""
    for path in models:
        if Path(path) != Path(tokenizer):
            check_same_tokenizer(tokenizer, path, "models compared on the same token ids must share one tokenizer")


def _check_fits(models: list[Path], config: LossEval, world) -> None:
    """Refuse, before anything is loaded, an evaluation its device cannot hold (`planning.eval_plan`)."""
    from compressor import planning
    from compressor.checkpoint import check_weights

    archs = [check_weights(path) for path in models]  # contradicted by its weights: refused before it is sized
    teacher = check_weights(config.teacher) if config.teacher is not None else None
    plan = planning.eval_plan(archs, teacher, seq_len=config.seq_len, batch_size=config.batch_size,
                              dtype=planning.plan_dtype(archs[0], config.dtype))  # fmt: skip
    planning.check_plan_fits(plan, world, levers="--seq-len or --batch-size", dry_run=False,
                             shape=f"{config.batch_size} x {config.seq_len:,} tokens a batch")  # fmt: skip


def _deployed(path: Path, config: LossEval, world):
    """The model as deployed: a quantized checkpoint dequantized, its activations quantized (sharded across
    the processes under torchrun)."""
    from compressor.checkpoint import load_model
    from compressor.quantize import is_quantized_checkpoint, quantize_activations

    model = load_model(path, dtype=config.dtype, world=world)
    if not config.weights_only and is_quantized_checkpoint(path):
        quantize_activations(model, path)
    return model


def _retrieval(models: list[Path], config: RetrievalEval, on_model: Callable[[Path], None] | None) -> RetrievalRecord:
    """Each model on the same generated sequences at each context."""
    from compressor.checkpoint import load_model
    from compressor.data import load_tokenizer
    from compressor.distributed import resolve_device
    from compressor.tasks import check_task_fits, evaluate_task

    contexts, spec = config.contexts, config.spec
    _check_tokenizers(models, models[0])
    tokenizer = load_tokenizer(models[0])
    results = {}
    for path in models:
        if on_model is not None:
            on_model(path)
        model = load_model(path, dtype=config.dtype, device=resolve_device(config.device))
        check_task_fits(model, config.task_sequences, contexts, batch_size=config.batch_size, parameter="ctx")
        results[path] = evaluate_task(model, tokenizer, spec, contexts, batch_size=config.batch_size)
        del model
    return RetrievalRecord(config.task, contexts, results)


def _lm_eval(models: list[Path], config: LmEvalTasks) -> LmEvalRecord:
    """lm-eval on each model."""
    try:
        from compressor.harness import evaluate_tasks
    except CompressorError:
        raise OptionError("lm_eval_tasks", 'needs lm-eval, which is not installed: pip install -e ".[eval]"') from None
    results = evaluate_tasks(models, config.names, num_fewshot=config.num_fewshot, limit=config.documents,
                             include_path=config.include_path, batch_size=config.batch_size, device=config.device,
                             dtype=config.dtype, weights_only=config.weights_only)  # fmt: skip
    return LmEvalRecord(config, results)
