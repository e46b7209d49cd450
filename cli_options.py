"""The option groups of `compress` and how they reach a command: the shared flags (`--json`, `--device`,
...), groups that arrive as one argument (`with_group`: the retrieval probe, the dry-run plan, training),
the strategies' own options (`with_strategy_options`) and the error boundary (`friendly`)."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from cli_render import console, print_error
from compressor.errors import CompressorError, OptionClash, OptionError


def friendly(command):
    """Turn compressor's user-facing errors into one red line and exit status 1; an option named by the
    library (`temperature`) is shown as the command's flag (`--temperature`)."""
    flags = set(inspect.signature(command).parameters)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CompressorError as exc:
            if os.environ.get("COMPRESSOR_DEBUG") == "1":
                raise
            message = str(exc)
            if isinstance(exc, OptionError) and exc.parameter in flags:
                message = f"{option_flag(command, exc.parameter)} {exc.problem}"
            print_error(message)
            raise typer.Exit(1) from None
        except OSError as exc:  # a full disk, a read-only or vanished folder: the environment, not a bug
            if os.environ.get("COMPRESSOR_DEBUG") == "1":
                raise
            print_error(os_error_line(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print_error("", style="yellow", label="interrupted")
            raise typer.Exit(130) from None

    return wrapper


def os_error_line(exc: OSError) -> str:
    """What the environment refused, and where; for the Hugging Face cache (where `datasets` keeps text data
    it reads), how to move it."""
    line = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else f"{exc.strerror or exc}"
    if exc.filename:
        cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).absolute()
        file = Path(os.fsdecode(exc.filename)).absolute()
        if file == cache or file in cache.parents or cache in file.parents:
            line += f" (the Hugging Face cache, {cache}): set HF_HOME to a folder you can write"
    return line


# The exceptions of the Click that Typer parses with (its own copy in Typer 0.29, the click package before).
_click_errors = sys.modules[typer.BadParameter.__module__]


class CompressGroup(TyperGroup):
    """`compress`'s command group: a command line the parser cannot read (an unknown option, a value of the
    wrong type, a missing argument, an option given twice with different values) is one line on stderr and
    exit status 2, Click's usage status, instead of a usage box."""

    def resolve_command(self, ctx, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            refuse_repeats(command, rest, f"{ctx.command_path} {name}")
        return name, command, rest

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_errors.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `compress` alone: the help (Rich's is printed)
                if exc.format_message().strip():
                    typer.echo(exc.format_message())
                sys.exit(exc.exit_code)
            print_error(usage_line(exc))
            sys.exit(exc.exit_code)
        except typer.Abort:
            print_error("", style="yellow", label="aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_line(exc) -> str:
    """A parser error (a ClickException) as one line, with where the command's options are listed."""
    message = " ".join(exc.format_message().split())
    context = getattr(exc, "ctx", None)
    return message if context is None else f"{message.rstrip('.')} (see '{context.command_path} --help')"


def refuse_repeats(command, args: list[str], path: str) -> None:
    """Raise a UsageError for an option that takes one value and is given twice with different values (the
    parser would keep the last one without a word). Options that collect values (`--prompt`, `--set`) and a
    flag given twice alike pass."""
    if "--help" in args:  # the help, whatever else is written
        return
    options = {
        name: param
        for param in command.params
        if param.param_type_name == "option"
        for name in (*param.opts, *param.secondary_opts)
    }
    seen: dict[str, tuple[str, str]] = {}  # parameter -> (flag, value) as first written
    position = 0
    while position < len(args) and args[position] != "--":
        flag, has_value, value = args[position].partition("=")
        param = options.get(flag) if flag.startswith("--") else None
        position += 1
        if param is None:
            continue
        if param.is_flag:
            value = flag
        elif not has_value:
            value = args[position] if position < len(args) else ""
            position += 1
        if param.multiple or param.count:
            continue
        if param.name in seen and seen[param.name][1] != value:
            first, before = seen[param.name]
            if param.is_flag:  # --dry-run and --no-dry-run
                problem = f"{first} and {flag} are both given: give one of them"
            else:
                problem = f"{first} {before} and {flag} {value} are both given: give {flag} once"
            raise _click_errors.UsageError(f"{problem} (see '{path} --help')")
        seen[param.name] = (flag, value)


def print_version(value: bool) -> None:
    """`--version`: the installed package's version, then exit."""
    if value:
        try:
            version = importlib.metadata.version("compressor")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed: pip install -e .)"
        console.print(f"compressor {version}", highlight=False)
        raise typer.Exit()


def with_group(name: str, params: list[inspect.Parameter], build=None):
    """Add a group of options to a command; their values reach it as one argument `name`: build(values)
    (default: the dict of the values given, None left out). An option the command already has is a bug
    here (TypeError at import); strategies' options go through `with_strategy_options`."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != name]
        twice = [p.name for p in params if p.name in signature.parameters]
        if twice:
            raise TypeError(f"{command.__name__} already has the option {twice[0]} of the group {name}")
        names = [p.name for p in params]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            given = build(values) if build else {n: v for n, v in values.items() if v is not None}
            return command(*args, **{name: given}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + params)
        return wrapper

    return decorate


def dry_run_plan(plan: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """The plan group's values (PLAN_OPTIONS, NPROC_OPTION): they size a --dry-run, and without one they would
    do nothing, so they are refused."""
    if plan and not dry_run:
        raise OptionError(
            next(iter(plan)),
            "sizes the plan of a --dry-run only: add --dry-run, or leave it out (a run uses the processes torchrun "
            "starts, on its own device)",
        )
    return plan


def option(name: str, kind, help: str | None = None, default=None, metavar: str | None = None) -> inspect.Parameter:
    """A keyword option of an option group: `kind` is a type (with `help`, shown as written: a bracketed
    `[default: ...]` is escaped, not Rich markup) or an Annotated option type."""
    annotation = Annotated[kind, typer.Option(help=escape(help), metavar=metavar)] if help is not None else kind
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _click_params(parameters: list[inspect.Parameter]) -> list:
    """The parser's parameters Typer makes of these command parameters."""

    def probe() -> None: ...

    probe.__signature__ = inspect.Signature(parameters)
    probe_app = typer.Typer()
    probe_app.command()(probe)
    return typer.main.get_command(probe_app).params


def command_flags(parameters: list[inspect.Parameter]) -> set[str]:
    """The flags Typer makes of these command parameters: the declared ones (`--json`), else the name's
    (`--seq-len`), `--no-...` of a bool, and `--help`."""
    params = _click_params(parameters)
    return {"--help"} | {flag for p in params for flag in (*p.opts, *p.secondary_opts) if flag.startswith("-")}


def option_flag(command, parameter: str) -> str:
    """The flag of `command`'s parameter `parameter` (a name the library's OptionError gives): its declared one
    (`--importance` of importance_dir, `--json` of json_output), else the name's (`--seq-len`)."""
    params = _click_params([inspect.signature(command, eval_str=True).parameters[parameter]])
    opts = next(p.opts for p in params if p.name == parameter)
    return next((flag for flag in opts if flag.startswith("--")), f"--{parameter.replace('_', '-')}")


def strategy_options(taken: set[str] = frozenset()) -> list[inspect.Parameter]:
    """One `--flag` per field of every registered strategy's Options (strategies.base): text the library
    checks against the chosen strategy's fields. The help ends with each strategy's default (a field
    several strategies share: one per strategy; none when all are None), the metavar says how a value is
    written (`<true|false>`, `<float,...>`). A field whose name or flag is in `taken` (the command's
    parameter names and flags) raises OptionClash naming the strategy."""
    import strategies
    from strategies.base import value_syntax

    helps: dict[str, str] = {}
    users: dict[str, list[tuple[str, Any, Any]]] = {}  # option -> [(strategy, field type, default)]
    for name, strategy in strategies.available().items():
        defaults = strategy.Options()
        for field_name, (kind, field) in strategies.option_fields(strategy.Options).items():
            flag = f"--{field_name.replace('_', '-')}"
            if field_name in taken or flag in taken:
                raise OptionClash(
                    f"the strategy {name!r} declares the option {field_name}, whose flag {flag} this command "
                    "already has: rename it in the strategy's Options"
                )
            helps.setdefault(field_name, field.metadata.get("help", ""))
            users.setdefault(field_name, []).append((name, kind, getattr(defaults, field_name)))
    params = []
    for field_name, fields in users.items():
        text = helps[field_name]
        if any(default is not None for _, _, default in fields):
            text += f" [default: {'; '.join(f'{name} {_option_text(default)}' for name, _, default in fields)}]"
        syntaxes = {value_syntax(kind) for _, kind, _ in fields}  # strategies that disagree: plain text
        metavar = f"<{syntaxes.pop()}>" if len(syntaxes) == 1 else "<str>"
        params.append(option(field_name, str | None, text, metavar=metavar))
    return params


def _option_text(value: Any) -> str:
    """A strategy option's value as its flag takes it: 1.0,0.75,0.5; true; none."""
    if isinstance(value, tuple):
        return ",".join(map(_option_text, value))
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def with_strategy_options(command):
    """`with_group("strategy_options", strategy_options(...))` for prune and search; put it above the other
    groups so it sees every flag. A strategy option the command already has (a plug-in's `seq_len`) would
    lose one of the two: the command then refuses to run (OptionClash, one line). Refused when it runs, not
    at import, so that --help and the other commands still work."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "strategy_options"]
    try:
        return with_group("strategy_options", strategy_options({p.name for p in own} | command_flags(own)))(command)
    except OptionClash as exc:
        clash = exc

    @functools.wraps(command)
    def refuse(*args, **kwargs):
        raise clash

    return with_group("strategy_options", [])(refuse)


JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's).")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace OUT if it exists (only once the new one is complete).")]
HfExactOption = Annotated[bool, typer.Option(hidden=True, help="Retired (HF_EXACT_RETIRED).")]
HF_EXACT_RETIRED = (
    "is retired: transformers 5.25 and newer apply config.json's time_step_limit, so outputs agree with it as "
    "written; only transformers 5.6-5.24 floored dt at time_step_min, and a checkpoint whose time_step_limit is "
    "raised to that floor is another model to vLLM and llama.cpp, which ignore the key. Leave the flag out "
    "(compare logits with transformers >= 5.25)"
)
TokenizerOption = Annotated[Path | None, typer.Option(help="Tokenizer (default: the model's tokenizer.json).")]
TextFieldOption = Annotated[str, typer.Option(help="Text field of jsonl/parquet/datasets data.")]
SamplesOption = Annotated[int, typer.Option(help="Calibration sequences for importance.")]
ScoreOption = Annotated[
    str,
    typer.Option(
        help="Candidate score (zero-shot, lower is better): kl (to the original), loss, retrieval (answer "
        "log-likelihood lost on --retrieval-task), or kl+retrieval / loss+retrieval (the sum, retrieval x "
        "--retrieval-weight)."
    ),
]
RetrievalWeightOption = Annotated[float, typer.Option(help="Weight of retrieval in kl+retrieval / loss+retrieval.")]
ScoreSamplesOption = Annotated[int, typer.Option(help="Held-out sequences to score candidates on.")]
AttentionLossOption = Annotated[
    float,
    typer.Option(
        help="Weight of attention transfer: KL from each teacher attention block's weights to its student "
        "block's, added to the distillation loss (0: off). Restores retrieval that pruning broke."
    ),
]
TeacherCacheOption = Annotated[
    Path | None,
    typer.Option(
        "--teacher-cache",
        help="--cache-teacher: the cache's folder (default RUN/teacher_cache). Runs that give the same folder "
        "share it: the first writes it, the others read it if it holds their teacher's targets for their data "
        "(and add the sequences it lacks).",
    ),
]
AttentionQueriesOption = Annotated[
    int, typer.Option(help="--attention-loss: query positions per micro-batch whose attention rows it matches.")
]
ImportanceDirOption = Annotated[
    Path | None, typer.Option("--importance", help="Importance folder to reuse (`compress importance`).")
]
GpuOption = Annotated[
    str | None,
    typer.Option(help="GPU for throughput: a10g, l4, l40s, a100-40gb, a100-80gb, h100-sxm, h200, b200, rtx-5090."),
]
GpuBandwidthOption = Annotated[str | None, typer.Option(help="Your GPU's memory bandwidth, e.g. 600GB/s.")]
GpuTflopsOption = Annotated[float | None, typer.Option(help="Your GPU's dense bf16 TFLOP/s.")]
WeightDtypeOption = Annotated[str, typer.Option(help="Deployment weights: bf16, fp16, fp32, fp8 or fp4 (NVFP4).")]
KvDtypeOption = Annotated[str | None, typer.Option(help="KV cache: bf16, fp16, fp32 or fp8 (default: compute).")]
SsmDtypeOption = Annotated[str | None, typer.Option(help="SSM state: fp32, bf16 or fp16 (default: the config's).")]

CacheTargetsOption = Annotated[
    str | None,
    typer.Option(
        help="--cache-teacher: sampled (--top-k draws from the teacher's distribution, an unbiased forward KL; "
        "the default with it) or top-k (its most likely tokens, the rest as one bucket; any --divergence)."
    ),
]

RETRIEVAL_OPTIONS = [
    option("retrieval_task", str, "Retrieval probe of --drop-one retrieval and --score ...retrieval: phonebook, "
           "mqar or needle (needle hides its sentence in --data).", "phonebook"),
    option("retrieval_ctx", str | None, "Tokens per probe sequence, e.g. 4k [default: the budget's --ctx; "
           "importance: 1k]."),
    option("retrieval_sequences", int, "Probe sequences (16 queries each).", 8),
]  # fmt: skip


NPROC_OPTION = option("nproc", int | None, "Dry run: processes (GPUs) to plan for (default: the fewest that fit).")
# importance, distill, train: the GPU to plan for (prune and search plan for their budget's --gpu)
PLAN_OPTIONS = [
    NPROC_OPTION,
    option("gpu", str | None, "Dry run: plan for this GPU's memory (a10g, l4, l40s, a100-80gb, h100-sxm, h200, b200)."),
]


def training_options(lr: float) -> list[inspect.Parameter]:
    """The options `compress distill` and `compress train` share (compressor.train.TrainConfig)."""
    return [
        option("data", str | None, "Training text or tokens (as for `compress eval`)."),
        option("out", Path | None, "Run folder: model/ (latest checkpoint), metrics.jsonl."),
        option("tokens", str | None, "Token budget, e.g. 50M or 2B (sets the steps)."),
        option("steps", int | None, "Optimizer steps (default: one epoch)."),
        option("seq_len", int, "Tokens per sequence.", 512),
        option("batch_size", int, "Sequences per optimizer step, all processes together.", 16),
        option("micro_batch_size", int, "Sequences per forward pass of one process.", 4),
        option("lr", float, "Peak learning rate.", lr),
        option("min_lr", float | None, "Final learning rate (default: --lr / 10)."),
        option("warmup_steps", int | None, "Linear warmup steps (default 5%)."),
        option("schedule", str, "cosine, wsd (warmup-stable-decay) or constant.", "cosine"),
        option("decay_fraction", float, "WSD: share of steps spent decaying.", 0.2),
        option("weight_decay", float, "AdamW weight decay (matrices only).", 0.1),
        option("grad_clip", float, "Gradient-norm clipping (0: off).", 1.0),
        option("chunk_tokens", int | None, "Tokens per logits chunk in the loss (default: 128 MiB of logits)."),
        option("eval_every", int, "Validate every N steps.", 50),
        option("eval_sequences", int, "Validation sequences.", 64),
        option("eval_task", str | None, "Also measure a retrieval task at each validation: phonebook, mqar or needle."),
        option("eval_ctx", str, "--eval-task: tokens per sequence, e.g. 4k.", "1k"),
        option("eval_task_sequences", int, "--eval-task: sequences (16 queries each).", 8),
        option("save_every", int, "Checkpoint every N steps.", 100),
        option("log_every", int, "Log training metrics every N steps.", 10),
        option("valid_fraction", float, "Share of the data held out for validation.", 0.05),
        option("max_sequences", int | None, "Read at most this many sequences."),
        option("seed", int, "Seed of data order, split and initialisation.", 0),
        option("dtype", str, "Master-weight dtype of the trained model.", "float32"),
        option("autocast", str, "auto (bf16 on CUDA), bf16 or off.", "auto"),
        option("activation_checkpointing", bool, "Recompute each block in backward: less memory, ~1/3 more compute.",
               False),
        option("tokenizer", Path | None, "Tokenizer (default: the trained model's)."),
        option("text_field", TextFieldOption, default="text"),
        option("device", DeviceOption, default="auto"),
        option("overwrite", bool, "Replace an existing run folder.", False),
        option("resume", bool, "Continue the run in --out from its checkpoint.", False),
        option("dry_run", bool, "Print the memory plan per process (--nproc, --gpu) and what fits; train nothing. "
               "Paths given are checked.", False),
        option("quiet", bool, "Print only the final line: no live display, no validation lines.", False),
    ]  # fmt: skip


def given_options(context: typer.Context) -> frozenset[str]:
    """The options written on the command line, not left at their defaults (what `search --resume` checks
    against the search's record)."""
    sources = {name: context.get_parameter_source(name) for name in context.params}
    return frozenset(name for name, source in sources.items() if source is not None and source.name != "DEFAULT")


# ----- the commands' options whose help takes several lines -----------------------------------------------
EstimateCtxOption = Annotated[
    str | None,
    typer.Option(
        help="Context length, e.g. 128k (k = 1024). Default: --isl + --osl when both are given, else "
        "max_position_embeddings."
    ),
]
EstimateTargetMemOption = Annotated[
    str | None, typer.Option(help="Memory budget, e.g. 22GiB, 19.66GiB, 20GB (= 10^9 bytes); G alone = GiB.")
]
EstimateIslOption = Annotated[
    str | None, typer.Option(help="Prompt tokens of the throughput workload (default: ctx - osl).")
]
EstimateWeightDtypeOption = Annotated[
    str | None,
    typer.Option(
        help="Deployment weights: bf16, fp16, fp32, fp8 or fp4 (default: a quantized checkpoint's, else bf16)."
    ),
]
EstimatePrefillChunkOption = Annotated[
    int | None, typer.Option(help="Prefill chunk of the activation allowance (default 2048); 0 leaves it out.")
]
EstimateVsOption = Annotated[
    str | None,
    typer.Option(
        help="A transformer to compare throughput with: qwen3-8b, llama-3.1-8b, or a Llama / Mistral / "
        "Qwen2 / Qwen3 config.json or folder (needs --gpu)."
    ),
]
EstimateMeasureOption = Annotated[
    bool, typer.Option(help="Also build the model, allocate its cache on --device and time decoding.")
]
InitSetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config field, KEY=VALUE (JSON value); repeatable.")
]
InitLayersOption = Annotated[
    int | None,
    typer.Option(
        help="Blocks of a layout from --attention-ratio / --mlp-ratio, placed as Megatron-LM does, with the "
        "widths of --preset or --config (not for MoE models)."
    ),
]
EvalDataOption = Annotated[
    str | None,
    typer.Option(
        help="Text (.txt/.jsonl/.parquet/folder), tokens (.npy/.safetensors) or dataset name (with --task "
        "needle: the filler text)."
    ),
]
EvalTaskOption = Annotated[
    str | None,
    typer.Option(help="A retrieval task instead of loss: phonebook, mqar or needle (accuracy by --ctx)."),
]
EvalLmEvalTasksOption = Annotated[
    str | None,
    typer.Option(
        help="Run lm-eval tasks instead of the loss: names or task YAML files, comma-separated. A task YAML "
        "runs Python code: its !function tags import functions from .py files in its folder, as lm-eval "
        "does; use task files you trust."
    ),
]
EvalLimitOption = Annotated[
    float | None, typer.Option(help="lm-eval tasks: at most this many documents per task (below 1: a share).")
]
EvalIncludePathOption = Annotated[
    Path | None,
    typer.Option(
        help="lm-eval tasks: a folder of task YAML files to find the names in (their !function tags run "
        "Python code from the folder)."
    ),
]
EvalTeacherOption = Annotated[
    Path | None, typer.Option(help="A teacher checkpoint: adds KL(teacher||model) and top-1 agreement.")
]
EvalWeightsOnlyOption = Annotated[
    bool, typer.Option(help="Quantized checkpoints: dequantized weights only, no activation quantization.")
]
ImportanceDropOneOption = Annotated[
    str,
    typer.Option(
        help="Drop-one-block effect: none, kl, loss, or retrieval (the answer log-likelihood lost on "
        "--retrieval-task without the block)."
    ),
]
ImportanceDryRunOption = Annotated[
    bool,
    typer.Option(help="Print the memory plan per process (--nproc, --gpu); score nothing. Paths given are checked."),
]
PruneExportConfigOption = Annotated[
    str | None, typer.Option(help="Prune to this ModelOpt export_config (JSON or file) instead of searching.")
]
PruneStrategyOption = Annotated[str, typer.Option(help="Search strategy: minitron, minipuzzle or a plugged-in one.")]
PruneDryRunOption = Annotated[
    bool,
    typer.Option(
        help="Only list the candidates that fit and plan the memory per process (--nproc; the budget's "
        "--gpu); works on presets and config.json too. Paths given are checked."
    ),
]
SearchActivationCheckpointingOption = Annotated[
    bool, typer.Option(help="Distillations recompute each block in backward: less memory, ~1/3 more compute.")
]
SearchRankByOption = Annotated[
    str,
    typer.Option(
        help="Rank finalists after distillation by kl (to the original), loss, or retrieval (the probe's "
        "accuracy: --retrieval-task at --retrieval-ctx)."
    ),
]
SearchBldOption = Annotated[
    str | None,
    typer.Option(
        help="Build a library of blockwise-distilled block variants on this many tokens (e.g. 64k): each "
        "variant trained to reproduce its parent block, scored by replacement, chosen by the exact solver, "
        "finalists assembled from the trained blocks (minipuzzle).",
        metavar="TOKENS",
    ),
]
SearchBldStreamOption = Annotated[
    bool,
    typer.Option(
        help="Train the library's variants together from the model's forward passes instead of stored "
        "activations: no disk for them, 1 + 2 x --bld-epochs passes per round of variants that fit in memory."
    ),
]
# search: the blockwise-distilled library
LIBRARY_OPTIONS = [
    option("bld", SearchBldOption),
    option("bld_epochs", int, "Passes of each variant's training over the library tokens.", 2),
    option("bld_lr", float, "Peak learning rate of each variant's training.", 1e-3),
    option("bld_stream", SearchBldStreamOption, default=False),
]
SearchShareTeacherOption = Annotated[
    bool,
    typer.Option(
        help="The finalists distil from one teacher cache written once (64 draws from the teacher a token), not "
        "from K teacher passes: an estimate of the full logits (docs/search.md); not with --attention-loss."
    ),
]
SearchDryRunOption = Annotated[
    bool,
    typer.Option(
        help="List the candidates that fit and plan the memory per process of importance, scoring "
        "and a finalist's distillation (--nproc; the budget's --gpu); search nothing. Paths given are checked."
    ),
]
QuantizeKeepOption = Annotated[
    list[str] | None,
    typer.Option(help="ModelOpt quantizer-name pattern kept in high precision, e.g. '*layers.0.*'; repeatable."),
]
DistillQuantizeOption = Annotated[
    str | None,
    typer.Option(help="Quantization-aware distillation: fp8 or nvfp4 (CUDA); writes OUT/quantized/ at the end."),
]
DistillQuantizeKeepOption = Annotated[
    list[str] | None, typer.Option(help="ModelOpt quantizer-name pattern kept in high precision; repeatable.")
]
