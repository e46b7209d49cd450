"""The source of every compression: a checkpoint loaded once, with its fingerprint, its importance scores
and held-out calibration batches, built by `calibrate` (the one calibration step of `compress importance`,
`prune` and `search`) and then passed along, never re-read.

Calibration data is read once: the first `samples` sequences estimate importance (unless an importance
folder is given), the next `score_samples` are held out to score candidates on. A search keeps every
sequence (`all_sequences`): its finalists' distillations train on them without tokenizing again.
With `retrieval` set, a retrieval probe (`compressor.tasks.RetrievalConfig`) is generated once from the
checkpoint's tokenizer: importance's `--drop-one retrieval` and the candidates' retrieval scores use it.
Under `torchrun` the model is sharded across the processes as it loads (each holds about 1/N of the
weights, `compressor.distributed`); each estimates importance on its share of the batches and the
statistics are summed over all processes, as later the candidates' scores are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor import distributed, planning
from compressor.budget import num_parameters
from compressor.checkpoint import check_weights, fingerprint, load_model, parse_dtype
from compressor.data import DataSpec, Need, TokenSequences, local_path, read_sequences
from compressor.errors import CompressorError, OptionError, check_applies
from compressor.importance import EstimateProgress, Importance, ImportanceOptions, estimate
from compressor.model import HybridLM
from compressor.outputs import check_output
from compressor.pipelines.records import SourceInfo
from compressor.presets import load_config_or_preset
from compressor.tasks import RetrievalConfig, TaskScorer, parse_contexts


@dataclass(frozen=True)
class CalibrationConfig:
    """How to read a checkpoint and its calibration data."""

    model: str
    data: str | None = None
    importance_dir: str | None = None  # reuse these scores instead of estimating them
    importance: ImportanceOptions = field(default_factory=ImportanceOptions)
    samples: int = 1024  # sequences for importance
    score_samples: int = 0  # held-out sequences after them, to score candidates on
    seq_len: int = 4096
    batch_size: int = 1
    tokenizer: str | None = None  # default: the checkpoint's tokenizer.json
    text_field: str = "text"
    all_sequences: bool = False  # keep every sequence of the data (a search distills from them)
    device: str = "auto"
    dtype: str | None = None
    retrieval: RetrievalConfig | None = None  # a retrieval probe for drop-one and candidate scores

    def __post_init__(self) -> None:
        for name, low in (("samples", 1), ("score_samples", 0), ("seq_len", 2), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise OptionError(name, f"must be at least {low}, got {getattr(self, name)}")
        if self.importance_dir is None and self.data is None:
            raise OptionError("data", "is needed to estimate importance: give data or an importance folder")

    @classmethod
    def from_options(
        cls,
        model: str | Path,
        data: str | None = None,
        *,
        importance_dir: str | Path | None = None,
        tokenizer: str | Path | None = None,
        **fields: Any,
    ) -> CalibrationConfig:
        """A calibration from a command's option values: paths as str or Path (kept as text, as records hold
        them), the other fields by name (samples, seq_len, dtype, retrieval, ...); checked, the dtype's name
        too, before anything is loaded."""
        text = lambda path: None if path is None else str(path)  # noqa: E731
        config = cls(str(model), data, text(importance_dir), tokenizer=text(tokenizer), **fields)
        parse_dtype(config.dtype)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CalibrationConfig:
        raw = dict(raw)
        raw["importance"] = ImportanceOptions(**raw["importance"])
        if raw.get("retrieval") is not None:
            raw["retrieval"] = RetrievalConfig(**raw["retrieval"])
        return cls(**raw)


def check_probe_applies(options: Any, needed: str) -> None:
    """Refuse the `--retrieval-*` options (`retrieval_probe`'s, attributes of `options`) of a run whose
    `options.uses_probe` is false: changed from their defaults, they would do nothing. `needed` names what
    would use the probe."""
    if not options.uses_probe:
        probe = ("retrieval_task", "retrieval_ctx", "retrieval_sequences")
        check_applies(options, dict.fromkeys(probe, (needed, False)))


def check_paths(
    model: str | Path,
    out: str | Path | None,
    *,
    data: str | Path | None = None,
    importance_dir: str | Path | None = None,
    overwrite: bool = False,
) -> None:
    """What a dry run checks of the paths its run would read and write, as the run does before its long
    work, so that a plan is not followed by a launch that stops on them: the data found and of a format read,
    an importance folder holding scores of `model`'s shapes, and the output folder new (or `overwrite`) and
    apart from the inputs (`outputs.check_output`). Each is checked where it is given; `model` may be a
    preset. Nothing is loaded but the scores."""
    if data is not None:
        local_path(data)
    if importance_dir is not None:
        Importance.load(importance_dir, config=load_config_or_preset(model)[0])
    if out is not None:
        check_output(out, overwrite=overwrite, inputs=(model, data, importance_dir))


def retrieval_probe(
    *, retrieval_task: str = "phonebook", retrieval_ctx: str | None = None, retrieval_sequences: int = 8, context: int
) -> RetrievalConfig:
    """The retrieval probe the `--retrieval-*` options describe: `retrieval_sequences` sequences of
    `retrieval_task` at `retrieval_ctx` tokens (one length, e.g. '4k'), else at `context`."""
    if retrieval_ctx is not None:
        contexts = parse_contexts(retrieval_ctx)
        if len(contexts) != 1:
            raise OptionError("retrieval_ctx", f"takes one context length, got {retrieval_ctx!r}")
        context = contexts[0]
    return RetrievalConfig(retrieval_task, context, retrieval_sequences)


@dataclass
class Source:
    """A loaded checkpoint and what compression decisions need of it."""

    path: Path
    model: HybridLM
    fingerprint: str
    importance: Importance
    held_out: list[torch.Tensor]  # batches of held-out token ids on the model's device (may be empty)
    sequences: TokenSequences | None  # the data as read (all of it with `all_sequences`)
    world: distributed.World
    config: CalibrationConfig
    retrieval: TaskScorer | None = None  # the probe of `config.retrieval`

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(str(self.path), self.fingerprint, num_parameters(self.model.config))


def _check_fits(config: CalibrationConfig, world: distributed.World) -> None:
    """Refuse, before the model is loaded, a calibration its device cannot hold: importance's passes (unless
    reused) and the held-out scoring, at `batch_size` x `seq_len` tokens a batch."""
    arch = check_weights(config.model)  # a config.json its weights contradict is refused before it is sized
    dtype, tokens = planning.plan_dtype(arch, config.dtype), (config.seq_len, config.batch_size)
    plans = []
    if config.importance_dir is None:
        drop_one = config.importance.drop_one != "none"
        plans.append(planning.importance_plan(arch, seq_len=tokens[0], batch_size=tokens[1], dtype=dtype,
                                              drop_one=drop_one))  # fmt: skip
    if config.score_samples:
        batches = -(-config.score_samples // config.batch_size)
        plans.append(planning.scoring_plan(arch, arch, seq_len=tokens[0], batch_size=tokens[1], batches=batches,
                                           dtype=dtype))  # fmt: skip
    for plan in plans:
        planning.check_plan_fits(plan, world, shape=f"{tokens[1]} x {tokens[0]:,} tokens a batch",
                                 levers="--seq-len or --batch-size")  # fmt: skip


def calibrate(
    config: CalibrationConfig,
    *,
    world: distributed.World | None = None,
    say: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    progress: Path | None = None,
) -> Source:
    """Load the checkpoint and the data once; read or estimate importance; hold out scoring batches. With
    `progress`, a file, the estimate is saved there as it goes and continued from it (`EstimateProgress`:
    the same model, data and options)."""
    say = say or (lambda text: None)
    world = world or distributed.World(device=distributed.resolve_device(config.device))
    _check_fits(config, world)
    model = load_model(config.model, dtype=config.dtype, world=world)
    source_fingerprint = fingerprint(config.model)
    importance = None
    if config.importance_dir:
        importance = Importance.load(config.importance_dir, source_fingerprint, config=model.config)
    first_held_out = 0 if importance is not None else config.samples
    sequences = None
    if config.data is not None:
        needed = first_held_out + config.score_samples
        if config.score_samples:
            words = (f"the {first_held_out} for importance (--samples) plus the {config.score_samples} held out for "
                     "scoring (--score-samples)")  # fmt: skip
            need = Need(needed, words, "samples")
        else:
            need = Need(needed, f"--samples {config.samples}", "--samples")
        spec = DataSpec(config.data, config.seq_len, config.tokenizer, config.text_field,
                        None if config.all_sequences else needed, need=need)  # fmt: skip
        sequences = read_sequences(spec, config.model, eos_id=model.config.eos_id, vocab_size=model.config.vocab_size)
    retrieval = None
    if config.retrieval is not None:
        if world.size > 1:
            raise OptionError("retrieval_task", "is measured in one process: run without torchrun")
        retrieval = config.retrieval.scorer(config.tokenizer or config.model, config.data, model=model)
    if importance is not None:
        say(f"importance from {config.importance_dir}")
    else:
        say(f"estimating importance on {config.samples} sequences of {config.seq_len} tokens")
        batches = list(sequences.head(config.samples).batches(config.batch_size, shuffle=False, drop_last=False))
        meta = {
            "fingerprint": source_fingerprint,
            "model": str(config.model),
            "data": str(config.data),
            "samples": config.samples,
            "seq_len": config.seq_len,
            "pattern": model.config.pattern,
        }
        mine = distributed.share(batches, world)
        if retrieval is not None:
            meta["retrieval"] = dataclasses.asdict(config.retrieval)
        saving = None
        if progress is not None:
            settings = {**meta, "model": source_fingerprint, "data": sequences.head(config.samples).fingerprint(),
                        "batch_size": config.batch_size, "dtype": config.dtype,
                        "options": dataclasses.asdict(config.importance), "processes": world.size}  # fmt: skip
            saving = EstimateProgress(progress, world, settings)
        importance = estimate(model, mine, config.importance, world=world, meta=meta, on_batch=on_batch,
                              retrieval=retrieval, progress=saving)  # fmt: skip
        broken = importance.nonfinite()
        if broken:
            raise CompressorError(
                f"importance of {config.model} came out NaN or infinite ({', '.join(broken)}): its activations "
                "overflow; estimate in float32 (--dtype float32)"
            )
    held_out = []
    if sequences is not None and config.score_samples:
        rows = sequences.head(first_held_out + config.score_samples).to_numpy()[first_held_out:]
        held_out = [
            torch.from_numpy(rows[i : i + config.batch_size].astype("int64")).to(world.device)
            for i in range(0, len(rows), config.batch_size)
        ]
    return Source(
        Path(config.model), model, source_fingerprint, importance, held_out, sequences, world, config, retrieval
    )
