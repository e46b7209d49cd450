"""`compress`: the command line of compressor. Thin Typer commands: parse, call the library, render with
Rich. A user mistake prints one line and exits with status 1 (COMPRESSOR_DEBUG=1 shows the traceback
instead); `--json` prints machine-readable results on stdout."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import inspect
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cli_render import (
    KIND_NAMES,
    console,
    err_console,
    fmt_memory,
    fmt_speedup,
    print_json,
    progress_bar,
    render_compression_preview,
    render_eval,
    render_memory_plans,
    retrieval_cell,
    retrieval_column,
    say,
    table,
)
from compressor.budget import TERMS
from compressor.errors import CompressorError, OptionClash, OptionError, check_at_least
from compressor.presets import load_config_or_preset

app = typer.Typer(
    name="compress",
    help="Prune, search and distill hybrid Mamba-Transformer (Nemotron-H format) language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("compressor")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed: pip install -e .)"
        console.print(f"compressor {version}", highlight=False)
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    pass  # no docstring: the app's help stays Typer(help=...)


# ----- errors, shared options, rendering helpers ------------------------------------------------------------
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
                message = f"--{exc.parameter.replace('_', '-')} {exc.problem}"
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a full disk, a read-only or vanished folder: the environment, not a bug
            if os.environ.get("COMPRESSOR_DEBUG") == "1":
                raise
            where = f": {exc.filename}" if exc.filename else ""
            message = escape(f"{exc.strerror or exc}{where}")
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


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


def option(name: str, kind, help: str | None = None, default=None, metavar: str | None = None) -> inspect.Parameter:
    """A keyword option of an option group: `kind` is a type (with `help`, shown as written: a bracketed
    `[default: ...]` is escaped, not Rich markup) or an Annotated option type."""
    annotation = Annotated[kind, typer.Option(help=escape(help), metavar=metavar)] if help is not None else kind
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def command_flags(parameters: list[inspect.Parameter]) -> set[str]:
    """The flags Typer makes of these command parameters: the declared ones (`--json`), else the name's
    (`--seq-len`), `--no-...` of a bool, and `--help`."""

    def probe() -> None: ...

    probe.__signature__ = inspect.Signature(parameters)
    probe_app = typer.Typer()
    probe_app.command()(probe)
    params = typer.main.get_command(probe_app).params
    return {"--help"} | {flag for p in params for flag in (*p.opts, *p.secondary_opts) if flag.startswith("-")}


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
# budgets (prune, search): compressor.budget.Budget.from_options
BUDGET_OPTIONS = [
    *(option(term.option, term.value_type | None, term.help) for term in TERMS.values()),  # --target-mem, ...
    option("ctx", str, "Context length of the memory budget, e.g. 128k.", "8k"),
    option("batch", int, "Sequences served at once.", 1),
    option("gpu", GpuOption),
    option("gpu_bandwidth", GpuBandwidthOption),
    option("gpu_tflops", GpuTflopsOption),
    option("isl", str | None, "Prompt tokens of the throughput workload, e.g. 8k."),
    option("osl", str | None, "Generated tokens of the throughput workload, e.g. 16k."),
    option("weight_dtype", WeightDtypeOption, default="bf16"),
    option("kv_dtype", KvDtypeOption),
    option("ssm_dtype", SsmDtypeOption),
]  # fmt: skip


RETRIEVAL_OPTIONS = [
    option("retrieval_task", str, "Retrieval probe of --drop-one retrieval and --score ...retrieval: phonebook, "
           "mqar or needle (needle hides its sentence in --data).", "phonebook"),
    option("retrieval_ctx", str | None, "Tokens per probe sequence, e.g. 4k [default: the budget's --ctx; "
           "importance: 1k]."),
    option("retrieval_sequences", int, "Probe sequences (16 queries each).", 8),
]  # fmt: skip


def retrieval_from(needed: bool, values: dict[str, Any], context: int):
    """The RetrievalConfig the retrieval flags describe, when a decision uses it (`needed`), else None."""
    from compressor.tasks import RetrievalConfig, parse_contexts

    if not needed:
        return None
    if values["retrieval_ctx"] is not None:
        contexts = parse_contexts(values["retrieval_ctx"])
        if len(contexts) != 1:
            raise OptionError("retrieval_ctx", f"takes one context length, got {values['retrieval_ctx']!r}")
        context = contexts[0]
    return RetrievalConfig(values["retrieval_task"], context, values["retrieval_sequences"])


def budget_from(values: dict[str, Any]):
    """The Budget the budget flags describe (None when no limit is given)."""
    from compressor.budget import Budget

    return Budget.from_options(**values)


# ----- info ---------------------------------------------------------------------------------------------
@app.command()
@friendly
def info(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, config.json or preset name (see `compress init`).")],
    json_output: JsonOption = False,
) -> None:
    """Describe a model: blocks by type, widths, parameters by component (and active per token), dtype."""
    from compressor.budget import active_parameters, parameter_counts
    from compressor.checkpoint import check_weights, loaders, stored_dtypes

    config, folder = load_config_or_preset(model)
    if folder is not None:
        check_weights(folder, config)  # config.json describes these weights, or the counts below mean nothing
    counts = parameter_counts(config)
    total, active = sum(counts.values()), active_parameters(config)
    dtypes = stored_dtypes(folder) if folder is not None else []
    summary = config.summary()
    if json_output:
        print_json(
            {"model": model, "pattern": config.pattern, "architecture": summary,
             "block_overrides": config.block_overrides, "ratios": config.ratios(),
             "parameters": {**counts, "total": total, "active": active}, "dtypes": dtypes,
             "loads_in": loaders(config)}
        )  # fmt: skip
        return
    pattern = config.pattern if len(config.pattern) <= 80 else config.pattern[:77] + "..."
    rows = [
        ["pattern", pattern],
        ["blocks", f"{summary['blocks']} ({_block_counts(config)})"],
        ["hidden", str(config.hidden_size)],
        ["MLP ffn", str(config.intermediate_size)],
        ["attention", f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, "
                      f"head_dim {config.head_dim}"],
        ["Mamba-2", f"{config.mamba_num_heads} heads x head_dim {config.mamba_head_dim}, {config.n_groups} groups, "
                    f"state {config.ssm_state_size}, conv {config.conv_kernel}"],
        *([["MoE", _moe_widths(config)]] if config.has_moe else []),
        ["vocab", str(config.vocab_size)],
        ["ratios", " / ".join(f"{100 * share:.0f}% {KIND_NAMES[kind]}" for kind, share in config.ratios().items())],
        ["widths", "uniform" if config.is_uniform else f"per block ({len(config.block_overrides)} differ)"],
        ["loads in", ", ".join(loaders(config))],
    ] + ([["dtype", ", ".join(dtypes)]] if dtypes else [])  # fmt: skip
    console.print(table(model, ["", ""], rows, left=2, show_header=False))
    rows = [
        [name, f"{count:,}", f"{100 * count / total:.1f}%"] for name, count in counts.items() if count or name != "moe"
    ]
    rows.append(["[bold]total", f"[bold]{total:,}", "100%"])
    if config.has_moe:
        rows.append(["active per token", f"{active:,}", f"{100 * active / total:.1f}%"])
    console.print(table("parameters", ["component", "parameters", "share"], rows))


def _block_counts(config) -> str:
    """'23 Mamba-2, 6 attention, 0 MLP, 23 MoE' (MoE only for models that have MoE blocks)."""
    from compressor.config import ATTENTION, MAMBA, MLP, MOE

    counts = f"{config.count(MAMBA)} Mamba-2, {config.count(ATTENTION)} attention, {config.count(MLP)} MLP"
    return counts + (f", {config.count(MOE)} MoE" if config.has_moe else "")


def _moe_widths(config) -> str:
    """The MoE row of `compress info`: experts, top-k, expert and shared-expert FFN, groups, scaling."""
    groups = f"{config.n_group} group{'s' if config.n_group > 1 else ''} (top {config.topk_group})"
    latent = f", latent {config.moe_latent_size}" if config.moe_latent_size else ""
    return (
        f"{config.n_routed_experts} experts, top-{config.num_experts_per_tok}, expert FFN "
        f"{config.moe_intermediate_size}, shared FFN {config.moe_shared_expert_intermediate_size}, {groups}, "
        f"scaling {config.routed_scaling_factor:g}{latent}"
    )


# ----- estimate -----------------------------------------------------------------------------------------
@app.command()
@friendly
def estimate(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, config.json or preset name.")],
    ctx: Annotated[
        str | None,
        typer.Option(
            help="Context length, e.g. 128k (k = 1024). Default: --isl + --osl when both are given, else "
            "max_position_embeddings."
        ),
    ] = None,
    batch: Annotated[str, typer.Option(help="Sequences at once, or 'max': the most that fit the memory.")] = "1",
    gpu: GpuOption = None,
    gpu_bandwidth: GpuBandwidthOption = None,
    gpu_tflops: GpuTflopsOption = None,
    target_mem: Annotated[
        str | None, typer.Option(help="Memory budget, e.g. 22GiB, 19.66GiB, 20GB (= 10^9 bytes); G alone = GiB.")
    ] = None,
    isl: Annotated[
        str | None, typer.Option(help="Prompt tokens of the throughput workload (default: ctx - osl).")
    ] = None,
    osl: Annotated[str | None, typer.Option(help="Generated tokens (default: 1024, at most half the ctx).")] = None,
    weight_dtype: Annotated[
        str | None,
        typer.Option(
            help="Deployment weights: bf16, fp16, fp32, fp8 or fp4 (default: a quantized checkpoint's, else bf16)."
        ),
    ] = None,
    kv_dtype: KvDtypeOption = None,
    ssm_dtype: SsmDtypeOption = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="Prefill chunk of the activation allowance (default 2048); 0 leaves it out.")
    ] = None,
    vs: Annotated[
        str | None,
        typer.Option(
            help="A transformer to compare throughput with: qwen3-8b, llama-3.1-8b, or a Llama / Mistral / "
            "Qwen2 / Qwen3 config.json or folder (needs --gpu)."
        ),
    ] = None,
    measure: Annotated[
        bool, typer.Option(help="Also build the model, allocate its cache on --device and time decoding.")
    ] = False,
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
) -> None:
    """Parameters, inference memory at a context length (with a verdict for --target-mem), and throughput."""
    from compressor import budget
    from compressor.checkpoint import check_weights
    from compressor.distributed import resolve_device
    from compressor.estimate import report as estimate_report
    from compressor.quantize import is_quantized_checkpoint, stored_weight_bytes

    config, folder = load_config_or_preset(model)
    if folder is not None:
        check_weights(folder, config)  # the estimate is of these weights' architecture
    stored = None
    if folder is not None and is_quantized_checkpoint(folder):
        stored = stored_weight_bytes(folder)
    weight_dtype = weight_dtype or (stored.budget_dtype if stored else None) or "bf16"
    report = estimate_report(
        config, ctx=ctx, batch=batch, target_mem=target_mem, gpu=gpu, gpu_bandwidth=gpu_bandwidth,
        gpu_tflops=gpu_tflops, isl=isl, osl=osl, weight_dtype=weight_dtype, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype,
        prefill_chunk=prefill_chunk, vs=vs,
    )  # fmt: skip
    measured = None
    if measure:
        memory = report.memory
        measured = budget.measure(config, memory.context, memory.batch, device=resolve_device(device),
                                  weight_dtype=weight_dtype, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype)  # fmt: skip
    if json_output:
        print_json({"model": model, **report.to_dict(), "measured": measured.to_dict() if measured else None})
        return
    _print_report(model, config, report)
    if stored is not None:
        dtypes = ", ".join(f"{name} {fmt_memory(n)}" for name, n in sorted(stored.by_dtype.items()))
        console.print(f"stored weights ({stored.quant_algo}): {fmt_memory(stored.total)} ({dtypes})", highlight=False)
    if report.versus is not None:
        _print_versus(model, vs, report.versus)
    if measured is not None:
        rows = [
            ["cache bytes", f"{measured.cache_bytes:,}", f"{measured.estimated_cache_bytes:,}"],
            ["decode latency", f"{1000 * measured.decode_latency_s:,.2f} ms/token", ""],
            ["decode tokens/s", f"{measured.decode_tokens_per_s:,.1f}", ""],
        ]
        console.print(
            table(f"measured on {measured.device} ({weight_dtype})", ["metric", "measured", "estimated"], rows)
        )


def _print_report(model: str, config, report) -> None:
    from compressor.budget import GIB
    from compressor.config import ATTENTION, MAMBA

    memory = report.memory
    active = f", {report.active_parameters:,} active per token" if config.has_moe else ""
    console.print(
        f"[bold]{model}[/]: {report.total_parameters:,} parameters{active} ({config.num_blocks} blocks: "
        f"{_block_counts(config)})",
        highlight=False,
    )
    if config.has_moe:
        console.print(f"MoE: {_moe_widths(config)}", highlight=False)
    quantized = " (matrices; the rest bf16)" if memory.weight_dtype in ("fp8", "fp4") else ""
    activations = f"prefill chunk {memory.prefill_chunk:,} tokens" if memory.prefill_chunk else "left out"
    terms = [
        ("weights", f"{memory.weight_dtype}{quantized}", memory.weights),
        ("KV cache", f"{config.count(ATTENTION)} attention blocks, {memory.kv_dtype}", memory.kv_cache),
        ("SSM state", f"{config.count(MAMBA)} Mamba blocks, {memory.ssm_dtype}", memory.ssm_state),
        ("conv state", f"K-1 = {config.conv_kernel - 1} columns, {memory.compute_dtype}", memory.conv_state),
        ("activations", f"{activations}, {memory.compute_dtype}", memory.activations),
    ]
    rows = [[term, detail, f"{nbytes / GIB:,.2f}", f"{nbytes:,}"] for term, detail, nbytes in terms]
    rows.append(["[bold]total", "", f"[bold]{memory.total / GIB:,.2f}", f"[bold]{memory.total:,}"])
    title = f"memory at {memory.context:,} tokens x batch {memory.batch}"
    console.print(table(title, ["term", "detail", "GiB", "bytes"], rows, left=2))
    if report.limit is not None:
        spare, limit = report.headroom, f"{report.limit / GIB:,.2f} GiB"
        at = f" at batch {memory.batch} (the largest that fits)" if report.largest_batch and spare >= 0 else ""
        if spare >= 0:
            console.print(f"[green]fits[/] in {limit} with {spare / GIB:,.2f} GiB to spare{at}", highlight=False)
        else:
            console.print(f"[red]does not fit[/] in {limit}: over by {-spare / GIB:,.2f} GiB", highlight=False)
    throughput, spec = report.throughput, report.gpu
    if throughput is not None:
        title = (
            f"throughput on {spec.name}: {throughput.input_tokens:,} in / {throughput.output_tokens:,} out x "
            f"batch {throughput.batch}"
        )
        caption = (
            f"roofline at {spec.memory_bandwidth / 1e9:,.0f} GB/s and {spec.bf16_flops / 1e12:,.1f} TFLOP/s bf16 "
            "(datasheet peaks)"
        )
        rows = [
            ["time to first token", f"{throughput.time_to_first_token_s:,.2f} s", f"{throughput.prefill_bound} bound"],
            ["decode latency", f"{1000 * throughput.decode_latency_s:,.2f} ms/token",
             f"{throughput.decode_bound} bound, mean over the output"],
            ["decode tokens/s", f"{throughput.decode_tokens_per_s:,.1f}", "batch together"],
            ["tokens/s overall", f"{throughput.tokens_per_s:,.1f}", "output / (prefill + decode)"],
        ]  # fmt: skip
        out = table(title, ["metric", "value", "note"], rows, caption=caption, caption_justify="left")
        out.columns[2].justify = "left"
        console.print(out)


def _print_versus(model: str, baseline: str, versus) -> None:
    ours, theirs = versus.hybrid, versus.baseline
    rows = [
        ["parameters", f"{versus.hybrid_parameters:,}", f"{versus.baseline_parameters:,}", ""],
        ["batch", str(ours.batch), str(theirs.batch), f"{ours.batch / theirs.batch:.2f}x"],
        ["memory", fmt_memory(ours.memory.total), fmt_memory(theirs.memory.total), ""],
        ["time to first token", f"{ours.time_to_first_token_s:,.2f} s", f"{theirs.time_to_first_token_s:,.2f} s",
         f"{theirs.time_to_first_token_s / ours.time_to_first_token_s:.2f}x"],
        ["decode tokens/s", f"{ours.decode_tokens_per_s:,.1f}", f"{theirs.decode_tokens_per_s:,.1f}",
         f"{versus.decode_speedup:.2f}x"],
        ["tokens/s overall", f"{ours.tokens_per_s:,.1f}", f"{theirs.tokens_per_s:,.1f}", f"{versus.speedup:.2f}x"],
    ]  # fmt: skip
    title = f"{model} vs {baseline}: {ours.input_tokens:,} in / {ours.output_tokens:,} out on {ours.gpu}"
    caption = "ratio: the hybrid's advantage (rates: hybrid / baseline; times: baseline / hybrid)"
    console.print(table(title, ["", model, baseline, "ratio"], rows, caption=caption, caption_justify="left"))
    console.print(f"speedup: {versus.speedup:.2f}x tokens/s (decode {versus.decode_speedup:.2f}x)", highlight=False)


# ----- memory plans (dry runs) --------------------------------------------------------------------------
NPROC_OPTION = option("nproc", int | None, "Dry run: processes (GPUs) to plan for (default: the fewest that fit).")
# importance, distill, train: the GPU to plan for (prune and search plan for their budget's --gpu)
PLAN_OPTIONS = [
    NPROC_OPTION,
    option("gpu", str | None, "Dry run: plan for this GPU's memory (a10g, l4, l40s, a100-80gb, h100-sxm, h200, b200)."),
]


# ----- init ---------------------------------------------------------------------------------------------
@app.command()
@friendly
def init(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint to.")],
    preset: Annotated[str | None, typer.Option(help="A preset name, e.g. tiny, small, 8b, 12b-v2.")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.json to build instead of a preset.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config field, KEY=VALUE (JSON value); repeatable.")
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option(
            help="Blocks of a layout from --attention-ratio / --mlp-ratio, placed as Megatron-LM does, with the "
            "widths of --preset or --config (not for MoE models)."
        ),
    ] = None,
    attention_ratio: Annotated[float, typer.Option(help="Share of attention blocks (with --layers).")] = 0.0,
    mlp_ratio: Annotated[float, typer.Option(help="Share of MLP blocks (with --layers); the rest are Mamba-2.")] = 0.0,
    tokenizer: Annotated[Path | None, typer.Option(help="Folder or tokenizer.json to ship with the model.")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Random seed of the initialisation.")] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Write a randomly initialised model (a preset or a config.json) as a checkpoint."""
    from compressor.checkpoint import init_checkpoint
    from compressor.config import HybridConfig, pattern_from_ratios
    from compressor.presets import get_preset

    if preset is not None and config is not None or (preset is None and config is None and layers is None):
        raise CompressorError(
            "give exactly one of --preset NAME or --config JSON (whose blocks --layers lays out anew)"
        )
    if preset is None and config is None:
        pattern_from_ratios(layers, attention_ratio, mlp_ratio)  # the layout's own mistakes first
        raise OptionError(
            "layers", "lays out the blocks of a --preset or --config, which give their widths: add one of them"
        )
    arch = get_preset(preset) if preset is not None else HybridConfig.from_file(config)
    if layers is not None:
        arch = arch.with_layout(layers, attention_ratio, mlp_ratio)
    elif attention_ratio or mlp_ratio:
        raise OptionError("attention_ratio", "and --mlp-ratio lay out --layers blocks: give --layers too")
    arch = arch.with_settings(set_ or [])
    check_at_least(seed=(seed, 0))
    params = init_checkpoint(out, arch, tokenizer=tokenizer, dtype=dtype, seed=seed, overwrite=overwrite)
    blocks = ", ".join(f"{arch.count(kind)} {KIND_NAMES[kind]}" for kind in arch.ratios())
    console.print(f"wrote a random {params:,}-parameter model ({dtype}; {arch.pattern}: {blocks}) to [bold]{out}[/]")


# ----- eval ---------------------------------------------------------------------------------------------
@app.command("eval")
@friendly
def eval_(
    models: Annotated[list[Path], typer.Argument(help="Checkpoint folder(s) to evaluate (several: a comparison).")],
    data: Annotated[
        str | None,
        typer.Option(
            help="Text (.txt/.jsonl/.parquet/folder), tokens (.npy/.safetensors) or dataset name (with --task "
            "needle: the filler text)."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="A retrieval task instead of loss: phonebook, mqar or needle (accuracy by --ctx)."),
    ] = None,
    ctx: Annotated[str, typer.Option(help="--task: context lengths, e.g. 1k,4k,16k.")] = "1k",
    task_sequences: Annotated[int, typer.Option(help="--task: sequences per context (16 queries each).")] = 8,
    lm_eval_tasks: Annotated[
        str | None,
        typer.Option(
            help="Run lm-eval tasks instead of the loss: names or task YAML files, comma-separated. A task YAML "
            "runs Python code: its !function tags import functions from .py files in its folder, as lm-eval "
            "does; use task files you trust."
        ),
    ] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval tasks: few-shot examples per prompt.")] = None,
    limit: Annotated[
        float | None, typer.Option(help="lm-eval tasks: at most this many documents per task (below 1: a share).")
    ] = None,
    include_path: Annotated[
        Path | None,
        typer.Option(
            help="lm-eval tasks: a folder of task YAML files to find the names in (their !function tags run "
            "Python code from the folder)."
        ),
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="A teacher checkpoint: adds KL(teacher||model) and top-1 agreement.")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 8,
    max_sequences: Annotated[int | None, typer.Option(help="Evaluate at most this many sequences.")] = None,
    split: Annotated[str, typer.Option(help="all, or valid / train: the deterministic split of the data.")] = "all",
    valid_fraction: Annotated[float, typer.Option(help="Validation share when --split is valid/train.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/valid split.")] = 0,
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    weights_only: Annotated[
        bool, typer.Option(help="Quantized checkpoints: dequantized weights only, no activation quantization.")
    ] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Mean next-token loss and perplexity on a dataset; with --teacher, KL and top-1 agreement too. Several
    models are evaluated on the same sequences and compared in one table. Under `torchrun --nproc-per-node N`
    the models are sharded across the processes, each evaluates its share of the batches. With
    --lm-eval-tasks, lm-eval's task metrics instead (the `eval` extra), side by side per model."""
    from compressor.pipelines.evaluating import LmEvalTasks, LossEval, RetrievalEval, evaluate_checkpoints

    if task is not None:
        config = RetrievalEval(task, ctx, task_sequences, data, batch_size, seed, device, dtype)
    elif lm_eval_tasks is not None:
        config = LmEvalTasks(lm_eval_tasks, num_fewshot, limit, include_path, batch_size, device, dtype, weights_only)
    elif data is None:
        raise OptionError(
            "data",
            "is needed: the text to measure loss on (or --task for a retrieval task, --lm-eval-tasks for lm-eval)",
        )
    else:
        config = LossEval(data, teacher, seq_len, batch_size, max_sequences, split, valid_fraction, seed, tokenizer,
                          text_field, weights_only, device, dtype)  # fmt: skip
    with _eval_display(config) as display:
        record = evaluate_checkpoints(models, config, **display)
    if record is None:  # another process of a torchrun
        return
    if json_output:
        print_json(record.to_dict())
        return
    render_eval(record)


@contextlib.contextmanager
def _eval_display(config):
    """The live display of an eval mode, as the pipeline's progress callbacks: a bar over the tokens (loss),
    the model being scored (retrieval), none (lm-eval, which reports its own)."""
    from compressor.pipelines.evaluating import LossEval, RetrievalEval

    if isinstance(config, LossEval):
        with progress_bar() as progress:
            bar = progress.add_task("evaluating", total=0, visible=False)
            yield {"on_tokens": lambda n, total: progress.update(bar, advance=n, total=total, visible=True)}
    elif isinstance(config, RetrievalEval):
        with err_console.status(config.task) as status:
            yield {"on_model": lambda path: status.update(f"{config.task}: {path}")}
    else:
        yield {}


# ----- generate -----------------------------------------------------------------------------------------
@app.command()
@friendly
def generate(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (with tokenizer.json).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sample from the smallest set holding p of the mass.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
) -> None:
    """Continue a prompt with the model (cached decoding)."""
    from compressor.generate import generate_text

    text = generate_text(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, device=device, dtype=dtype)  # fmt: skip
    console.print(prompt, style="bold", end="", highlight=False)
    console.print(text, highlight=False)


# ----- importance ---------------------------------------------------------------------------------------
@app.command()
@friendly
@with_group("plan", PLAN_OPTIONS)
@with_group("retrieval", RETRIEVAL_OPTIONS, dict)
def importance(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to score (--dry-run: also a preset or config).")],
    data: Annotated[str | None, typer.Option(help="Calibration text or tokens (as for `compress eval`).")] = None,
    out: Annotated[Path | None, typer.Option(help="Importance folder to write.")] = None,
    samples: SamplesOption = 1024,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 1,
    seq_reduce: Annotated[str, typer.Option(help="Over the sequence: mean, l2 or max (of |a|).")] = "mean",
    batch_reduce: Annotated[str, typer.Option(help="Over samples: l2, mean or max.")] = "l2",
    mamba_signal: Annotated[str, typer.Option(help="x (in_proj's x) or ssm_out (out_proj's input).")] = "x",
    drop_one: Annotated[
        str,
        typer.Option(
            help="Drop-one-block effect: none, kl, loss, or retrieval (the answer log-likelihood lost on "
            "--retrieval-task without the block)."
        ),
    ] = "none",
    iterative_rounds: Annotated[int, typer.Option(help="Remove the least important block and re-score, N times.")] = 0,
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    dry_run: Annotated[
        bool, typer.Option(help="Print the memory plan per process (--nproc, --gpu); score nothing.")
    ] = False,
    json_output: JsonOption = False,
    plan: dict[str, Any] | None = None,
    retrieval: dict[str, Any] | None = None,
) -> None:
    """Score every prunable axis (hidden channels, FFN neurons, Mamba heads and head_dim, attention heads,
    blocks) from activations on calibration data; pruning and strategies reuse the folder. Under
    `torchrun --nproc-per-node N` the model is sharded across the processes, each scores its share."""
    from compressor.importance import ImportanceOptions
    from compressor.pipelines.importance import write_importance
    from compressor.pipelines.source import CalibrationConfig

    options = ImportanceOptions(seq_reduce, batch_reduce, mamba_signal, drop_one, iterative_rounds)
    if dry_run:
        from compressor.pipelines.preview import preview_importance

        preview = preview_importance(model, seq_len=seq_len, batch_size=batch_size, drop_one=drop_one != "none",
                                     dtype=dtype, nproc=plan.get("nproc"), gpu=plan.get("gpu"),
                                     device=device)  # fmt: skip
        print_json(preview.to_dict()[0]) if json_output else render_memory_plans(preview)
        return
    if data is None or out is None:
        raise OptionError("data" if data is None else "out", "is needed (or --dry-run to only plan the memory)")
    probe = retrieval_from(drop_one == "retrieval", retrieval, 1024)
    config = CalibrationConfig(str(model), data, importance=options, samples=samples, seq_len=seq_len,
                               batch_size=batch_size, tokenizer=str(tokenizer) if tokenizer else None,
                               text_field=text_field, device=device, dtype=dtype, retrieval=probe)  # fmt: skip
    with progress_bar() as progress:
        bar = progress.add_task("scoring", total=0, visible=False)
        on_tokens = lambda n, total: progress.update(bar, advance=n, total=total, visible=True)  # noqa: E731
        record = write_importance(config, out, overwrite=overwrite, on_tokens=on_tokens)
    if record is None:  # another process of a torchrun
        return
    if json_output:
        print_json(record.to_dict())
        return
    _print_importance(record.scores, out)


def _print_importance(scores, out: Path) -> None:
    import torch

    from compressor.config import PATTERN_CHARS

    pattern, has_drop = scores.meta["pattern"], scores.block_drop is not None
    order = scores.block_scores().argsort().tolist()
    shown = order if len(order) <= 12 else order[:6] + [None] + order[-6:]
    rows = []
    for i in shown:
        if i is None:
            rows.append(["...", "", "", *([""] if has_drop else [])])
            continue
        row = [str(i), PATTERN_CHARS[pattern[i]], f"{scores.block_influence[i]:.4f}"]
        rows.append(row + ([f"{scores.block_drop[i]:.4f}"] if has_drop else []))
    columns = ["block", "kind", "influence"] + (["drop-one"] if has_drop else [])
    blocks = table(f"blocks, least important first ({out})", columns, rows, left=0)
    blocks.columns[1].justify = "left"
    console.print(blocks)
    axes = [("hidden channels", scores.hidden)]
    if scores.ffn:
        axes.append(("FFN neurons (all blocks)", torch.cat(list(scores.ffn.values()))))
    if scores.mamba:
        axes.append(("Mamba heads (all blocks)", torch.cat([s.norm(dim=1) for s in scores.mamba.values()])))
        axes.append(("Mamba head_dim (all blocks)", torch.cat([s.norm(dim=0) for s in scores.mamba.values()])))
    if scores.attention:
        axes.append(("attention heads (all blocks)", torch.cat([s.norm(dim=1) for s in scores.attention.values()])))
    rows = [[name, str(v.numel()), f"{v.min():.3g}", f"{v.median():.3g}", f"{v.max():.3g}"]
            for name, v in ((n, values.flatten()) for n, values in axes)]  # fmt: skip
    console.print(table("score distributions (min / median / max)", ["axis", "count", "min", "median", "max"], rows))


# ----- prune --------------------------------------------------------------------------------------------
@app.command("prune")
@friendly
@with_strategy_options
@with_group("budget", BUDGET_OPTIONS, budget_from)
@with_group("plan", [NPROC_OPTION])
@with_group("retrieval", RETRIEVAL_OPTIONS, dict)
def prune_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to prune (--dry-run: also a preset or config).")],
    out: Annotated[Path | None, typer.Option(help="Folder for the pruned checkpoint (+ compression.json).")] = None,
    export_config: Annotated[
        str | None, typer.Option(help="Prune to this ModelOpt export_config (JSON or file) instead of searching.")
    ] = None,
    importance_dir: ImportanceDirOption = None,
    data: Annotated[str | None, typer.Option(help="Calibration data (importance, then held-out scoring).")] = None,
    samples: SamplesOption = 1024,
    score_samples: ScoreSamplesOption = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 1,
    score: ScoreOption = "kl",
    retrieval_weight: RetrievalWeightOption = 1.0,
    strategy: Annotated[
        str, typer.Option(help="Search strategy: minitron, minipuzzle or a plugged-in one.")
    ] = "minitron",
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    hf_exact: HfExactOption = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Only list the candidates that fit and plan the memory per process (--nproc; the budget's "
            "--gpu); works on presets and config.json too."
        ),
    ] = False,
    json_output: JsonOption = False,
    budget=None,
    strategy_options: dict[str, str] | None = None,
    plan: dict[str, Any] | None = None,
    retrieval: dict[str, Any] | None = None,
) -> None:
    """Pick the best architecture that meets a budget and write the pruned checkpoint (Minitron by default).
    Under `torchrun --nproc-per-node N` the source and every candidate are sharded across the processes."""
    from compressor.pipelines.preview import CompressionStages
    from compressor.pipelines.pruning import PruneConfig, prune_checkpoint, read_export_config
    from compressor.pipelines.source import CalibrationConfig

    if hf_exact:
        raise OptionError("hf_exact", HF_EXACT_RETIRED)
    export = read_export_config(export_config) if export_config is not None else None
    config = PruneConfig(budget, strategy, strategy_options or {}, export, score, retrieval_weight)
    if dry_run:
        stages = CompressionStages(seq_len, batch_size, score_samples, importance_dir is None, dtype)
        _dry_run_compression(model, config, stages, plan, device, json_output)
        return
    if out is None:
        raise OptionError("out", "is needed for the pruned checkpoint (or --dry-run to only list candidates)")
    calibration = CalibrationConfig(
        str(model), data, str(importance_dir) if importance_dir else None, samples=samples,
        score_samples=score_samples if data is not None else 0, seq_len=seq_len, batch_size=batch_size,
        tokenizer=str(tokenizer) if tokenizer else None, text_field=text_field, device=device, dtype=dtype,
        retrieval=retrieval_from("retrieval" in score, retrieval, budget.context if budget else 1024),
    )  # fmt: skip
    with err_console.status("pruning") as status:
        progress = lambda text: (status.update(text), say(text))  # noqa: E731
        record = prune_checkpoint(calibration, config, out, overwrite=overwrite, say=progress)
    if record is None:  # another process of a torchrun
        return
    if json_output:
        print_json(record.to_dict())
        return
    _print_candidates(record)
    console.print(f"wrote the pruned model ({record.chosen.params:,} parameters) to [bold]{out}[/] ({_loads_in(out)})")


def _print_candidates(record) -> None:
    """The scored candidates of a prune, best first (active parameters for MoE, retrieval with a probe)."""
    moe = any(c.active_params not in (None, c.params) for c in record.candidates)  # MoE: show active parameters
    probe = record.retrieval
    columns = ["#", "candidate", "blocks", "parameters", *(["active"] if moe else []), "memory", "speedup",
               f"score ({record.score_metric})", *([retrieval_column(probe)] if probe else [])]  # fmt: skip
    rows = [[str(i), c.label, str(len(c.pattern)), f"{c.params:,}", *([f"{c.active_params:,}"] if moe else []),
             fmt_memory(c.memory_bytes), fmt_speedup(c.speedup), f"{c.score:.4f}" if c.score is not None else "-",
             *([retrieval_cell(c.retrieval)] if probe else [])]
            for i, c in enumerate(record.candidates, start=1)]  # fmt: skip
    out_table = table(f"candidates ({record.strategy}), best first", columns, rows)
    out_table.columns[0].justify, out_table.columns[1].justify = "right", "left"
    console.print(out_table)
    if probe:
        say(f"the original on {retrieval_column(probe)}: {retrieval_cell(probe['source'])}")


def _dry_run_compression(model, config, stages, plan: dict[str, Any], device: str, json_output: bool) -> None:
    """`--dry-run` of prune and search: the candidates that fit (`config`) and the memory of the stages."""
    from compressor.pipelines.preview import preview_compression

    preview = preview_compression(model, config, stages, nproc=plan.get("nproc"), device=device)
    print_json(preview.to_dict()) if json_output else render_compression_preview(preview, config)


# ----- search -------------------------------------------------------------------------------------------
@app.command()
@friendly
@with_strategy_options
@with_group("budget", BUDGET_OPTIONS, budget_from)
@with_group("plan", [NPROC_OPTION])
@with_group("retrieval", RETRIEVAL_OPTIONS, dict)
def search(
    context: typer.Context,
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to compress (--dry-run: also a preset or config).")],
    out: Annotated[Path | None, typer.Option(help="Search folder: search.json, pareto.json/.png, candidates/.")] = None,
    data: Annotated[str | None, typer.Option(help="Calibration and distillation data (text or tokens).")] = None,
    strategy: Annotated[str, typer.Option(help="minipuzzle, minitron, or a plugged-in one.")] = "minipuzzle",
    candidates: Annotated[int, typer.Option(help="Finalists put through the short distillation.")] = 8,
    distill_tokens: Annotated[str, typer.Option(help="Distillation tokens per finalist, e.g. 50M.")] = "50M",
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (importance, scoring, distillation).")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Distillation sequences per step.")] = 16,
    micro_batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 4,
    activation_checkpointing: Annotated[
        bool, typer.Option(help="Distillations recompute each block in backward: less memory, ~1/3 more compute.")
    ] = False,
    lr: Annotated[float, typer.Option(help="Distillation peak learning rate.")] = 1e-4,
    min_lr: Annotated[float, typer.Option(help="Distillation final learning rate.")] = 1e-5,
    samples: SamplesOption = 1024,
    score_samples: ScoreSamplesOption = 64,
    importance_dir: ImportanceDirOption = None,
    rank_by: Annotated[
        str,
        typer.Option(
            help="Rank finalists after distillation by kl (to the original), loss, or retrieval (the probe's "
            "accuracy: --retrieval-task at --retrieval-ctx)."
        ),
    ] = "kl",
    score: ScoreOption = "kl",
    retrieval_weight: RetrievalWeightOption = 1.0,
    attention_loss: AttentionLossOption = 0.0,
    attention_queries: AttentionQueriesOption = 256,
    seed: Annotated[int, typer.Option(help="Seed of the distillation data order and split.")] = 0,
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    resume: Annotated[bool, typer.Option(help="Continue the search in OUT, skipping finished candidates.")] = False,
    bld: Annotated[
        str | None,
        typer.Option(
            help="Build a library of blockwise-distilled block variants on this many tokens (e.g. 64k): each "
            "variant trained to reproduce its parent block, scored by replacement, chosen by the exact solver, "
            "finalists assembled from the trained blocks (minipuzzle).",
            metavar="TOKENS",
        ),
    ] = None,
    bld_epochs: Annotated[int, typer.Option(help="Passes of each variant's training over the library tokens.")] = 2,
    bld_lr: Annotated[float, typer.Option(help="Peak learning rate of each variant's training.")] = 1e-3,
    share_teacher: Annotated[
        bool,
        typer.Option(
            help="The finalists distil from one teacher cache written once (top-k log-probs, --top-k 64), not "
            "from K teacher passes; off with --attention-loss."
        ),
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="List the candidates that fit and plan the memory per process of importance, scoring "
            "and a finalist's distillation (--nproc; the budget's --gpu); search nothing."
        ),
    ] = False,
    json_output: JsonOption = False,
    budget=None,
    strategy_options: dict[str, str] | None = None,
    plan: dict[str, Any] | None = None,
    retrieval: dict[str, Any] | None = None,
) -> None:
    """Search architectures under a budget: candidates scored zero-shot, the best few distilled briefly and
    ranked again; writes the table, the Pareto front (JSON, PNG) and lets you materialize any candidate."""
    from compressor.bld import BLDConfig
    from compressor.budget import parse_tokens
    from compressor.pipelines.plots import plot_pareto
    from compressor.pipelines.preview import CompressionStages
    from compressor.pipelines.pruning import PruneConfig
    from compressor.pipelines.search import (
        PLOT_FILE,
        SearchConfig,
        finalist_training,
        load_search,
        resume_calibration,
        search_architectures,
    )
    from compressor.pipelines.source import CalibrationConfig

    if dry_run:
        if budget is None:
            raise CompressorError("give a budget: --target-mem, --target-params or --gpu with --min-speedup")
        distill = finalist_training(model, seq_len=seq_len, batch_size=batch_size, micro_batch_size=micro_batch_size,
                                    activation_checkpointing=activation_checkpointing, attention_loss=attention_loss,
                                    attention_queries=attention_queries)  # fmt: skip
        library = BLDConfig(parse_tokens(bld), bld_epochs, bld_lr, micro_batch_size, seed) if bld else None
        stages = CompressionStages(seq_len, 1, score_samples, importance_dir is None, dtype, distill, library)
        _dry_run_compression(model, PruneConfig(budget, strategy, strategy_options or {}), stages, plan, device,
                             json_output)  # fmt: skip
        return
    if out is None:
        raise OptionError("out", "is needed for the search folder (or --dry-run to only plan)")
    if resume:  # the record says how; what is read is what this command line names (checked against it)
        config = SearchConfig.from_record(load_search(out, incoming=True))
        if data is None:
            raise OptionError("data", "is needed to resume too: give the data the search started on")
        calibration = resume_calibration(out, model=model, data=data, tokenizer=tokenizer)
        probe = calibration.retrieval
        _refuse_resume_changes(context, {
            "strategy": (strategy, config.strategy), "candidates": (candidates, config.finalists),
            "rank_by": (rank_by, config.rank_by), "score": (score, config.score),
            "retrieval_weight": (retrieval_weight, config.retrieval_weight),
            "distill_tokens": (distill_tokens, config.distill.tokens, parse_tokens),
            "seq_len": (seq_len, calibration.seq_len), "batch_size": (batch_size, config.distill.batch_size),
            "micro_batch_size": (micro_batch_size, config.distill.micro_batch_size),
            "activation_checkpointing": (activation_checkpointing, config.distill.activation_checkpointing),
            "lr": (lr, config.distill.lr), "min_lr": (min_lr, config.distill.min_lr),
            "seed": (seed, config.distill.seed),
            "attention_loss": (attention_loss, config.distill.attention_loss),
            "attention_queries": (attention_queries, config.distill.attention_queries),
            "samples": (samples, calibration.samples), "score_samples": (score_samples, calibration.score_samples),
            "importance_dir": (importance_dir, None), "text_field": (text_field, calibration.text_field),
            "dtype": (dtype, calibration.dtype),
            "retrieval_task": (retrieval["retrieval_task"], probe.task if probe else None),
            "retrieval_ctx": (retrieval["retrieval_ctx"], probe.context if probe else None, _one_context),
            "retrieval_sequences": (retrieval["retrieval_sequences"], probe.sequences if probe else None),
            "bld": (bld, config.bld.tokens if config.bld else None, parse_tokens),
            "bld_epochs": (bld_epochs, config.bld.epochs if config.bld else 2),
            "bld_lr": (bld_lr, config.bld.lr if config.bld else 1e-3),
            "share_teacher": (share_teacher, config.share_teacher),
        })  # fmt: skip
        if budget is not None and budget != config.budget:
            raise CompressorError(
                "the budget options differ from the budget the search in --out started with: --resume continues "
                "it as it started (leave them out, or start a new search)"
            )
        if strategy_options:
            from strategies import build_options, get_strategy

            kind = get_strategy(config.strategy)
            given, recorded = build_options(kind, strategy_options), build_options(kind, config.options)
            changed = {name: (getattr(given, name), getattr(recorded, name)) for name in strategy_options}
            _refuse_resume_changes(context, changed)
    else:
        if budget is None:
            raise CompressorError(
                "give a budget: --target-mem, --target-params, --target-active-params or --gpu with --min-speedup"
            )
        template = finalist_training(
            model, tokens=parse_tokens(distill_tokens), seq_len=seq_len, batch_size=batch_size,
            micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, seed=seed, device=device,
            activation_checkpointing=activation_checkpointing, attention_loss=attention_loss,
            attention_queries=attention_queries,
        )  # fmt: skip
        library = BLDConfig(parse_tokens(bld), bld_epochs, bld_lr, micro_batch_size, seed) if bld else None
        config = SearchConfig(budget, template, strategy, strategy_options or {}, candidates, rank_by, score,
                              retrieval_weight, bld=library, share_teacher=share_teacher)  # fmt: skip
        if data is None:
            raise OptionError("data", "is needed: the calibration and distillation data")
        calibration = CalibrationConfig(
            str(model), data, str(importance_dir) if importance_dir else None, samples=samples,
            score_samples=score_samples, seq_len=seq_len, batch_size=1, tokenizer=str(tokenizer) if tokenizer else None,
            text_field=text_field, all_sequences=True, device=device, dtype=dtype,
            retrieval=retrieval_from("retrieval" in score or rank_by == "retrieval", retrieval, budget.context),
        )  # fmt: skip
    record = search_architectures(calibration, config, out, resume=resume, overwrite=overwrite, say=say)
    plot_pareto(record, out / PLOT_FILE)
    if json_output:
        print_json(record.to_dict())
        return
    _print_search(record, out)


def _refuse_resume_changes(context: typer.Context, values: dict[str, tuple]) -> None:
    """`search --resume` continues a search as its record says: an option given on the command line with
    another value than the search started with is refused, not ignored. `values`: option -> (value given,
    value recorded[, a parse of the given text into the recorded form]); options not on the command line
    (at their defaults) are not checked."""
    for name, (value, recorded, *parse) in values.items():
        source = context.get_parameter_source(name)
        if value is None or source is None or source.name == "DEFAULT":
            continue
        if (parse[0](value) if parse else value) != recorded:
            used = "is not used by" if recorded is None else f"differs from the {recorded} of"
            raise OptionError(
                name,
                f"{value} {used} the search in --out: --resume continues it as it started (leave it out, or "
                "start a new search)",
            )


def _one_context(text: str) -> int:
    from compressor.tasks import parse_contexts

    return parse_contexts(text)[0]


def _print_search(record, out: Path) -> None:
    """A search's candidates, ranked after distillation, and where its Pareto front and plot are."""
    shown = "loss" if record.rank_by == "loss" else "kl"  # ranked by retrieval: its column is beside the KL
    rank = {index: position for position, index in enumerate(record.ranking, start=1)}
    probe = record.retrieval
    rows = []
    for c in sorted(record.candidates, key=lambda c: (rank.get(c.index, 10**6), c.score)):
        retrieval_cells = [retrieval_cell(c.retrieval), retrieval_cell(c.distilled and c.distilled.retrieval)]
        rows.append([str(rank.get(c.index, "-")), str(c.index), c.label, str(len(c.pattern)), f"{c.params:,}",
                     fmt_memory(c.memory_bytes), fmt_speedup(c.speedup), f"{c.score:.4f}",
                     f"{c.distilled.metric(shown):.4f}" if c.distilled else "-",
                     *(retrieval_cells if probe else [])])  # fmt: skip
    picked_by = f"library {record.score_metric}" if record.bld else f"zero-shot {record.score_metric}"
    columns = ["rank", "#", "candidate", "blocks", "parameters", "memory", "speedup", picked_by,
               f"val_{shown}"]  # fmt: skip
    if probe:
        columns += [retrieval_column(probe), "after distillation"]
    out_table = table(f"{record.strategy} search ({out}), ranked by {record.rank_by} after distillation", columns,
                      rows, left=0)  # fmt: skip
    out_table.columns[2].justify = "left"
    console.print(out_table)
    console.print(
        f"Pareto front (memory): {record.pareto['memory']}; plot in {out / 'pareto.png'}; "
        f"`compress materialize {out} K --out DIR` writes candidate K"
    )
    served: dict[str, list[str]] = {}  # search folders written before it was recorded have no loads_in
    for c in record.candidates:
        served.setdefault(", ".join(c.architecture.get("loads_in", ["compressor"])), []).append(f"#{c.index}")
    say("loads in: " + "; ".join(f"{' '.join(ids)}: {engines}" for engines, ids in served.items()))
    if probe:
        say(f"the original on {retrieval_column(probe)}: {retrieval_cell(probe['source'])}")
    if record.library:
        lib = record.library
        say(f"library: {lib['variants']} variants on {lib['tokens']:,} tokens, mean blockwise error "
            f"{lib['mean_initial_error']:.3f} pruned -> {lib['mean_error']:.3f} trained")  # fmt: skip
    if record.correlation:
        r = record.correlation
        say(f"{picked_by} against val_{r['after']} over {r['finalists']} finalists: Spearman {r['spearman']:.2f}, "
            f"Kendall {r['kendall']:.2f}")  # fmt: skip
    if record.seconds:
        say("time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in record.seconds.items()))


@app.command()
@friendly
def materialize(
    search_dir: Annotated[Path, typer.Argument(help="A folder written by `compress search`.")],
    index: Annotated[int, typer.Argument(help="The candidate's number (# in the search table).")],
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint.")],
    distilled: Annotated[bool, typer.Option(help="Its short-distilled weights instead of the pruned ones.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    hf_exact: HfExactOption = False,
) -> None:
    """Write a searched candidate as a checkpoint (pruned from the original, or as distilled in the search)."""
    from compressor.distributed import resolve_device
    from compressor.pipelines.search import materialize as write

    if hf_exact:
        raise OptionError("hf_exact", HF_EXACT_RETIRED)
    write(search_dir, index, out, distilled=distilled, overwrite=overwrite, device=resolve_device(device), dtype=dtype)
    console.print(f"wrote candidate {index} to [bold]{out}[/] ({_loads_in(out)})")


def _loads_in(path: Path) -> str:
    """'loads in: compressor, transformers, vLLM' for a written checkpoint (per-block ones: compressor only)."""
    from compressor.checkpoint import loaders
    from compressor.config import HybridConfig

    return f"loads in: {', '.join(loaders(HybridConfig.from_file(path)))}"


# ----- quantize -----------------------------------------------------------------------------------------
@app.command("quantize")
@friendly
def quantize_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to quantize.")],
    quant_format: Annotated[str, typer.Option("--format", help="fp8, nvfp4, int8_sq or int4_awq.")],
    data: Annotated[str, typer.Option(help="Calibration text or tokens (as for `compress eval`).")],
    out: Annotated[Path, typer.Option(help="Folder for the quantized (ModelOpt Hugging Face) checkpoint.")],
    samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 512,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Sequences per calibration forward pass.")] = 1,
    keep: Annotated[
        list[str] | None,
        typer.Option(help="ModelOpt quantizer-name pattern kept in high precision, e.g. '*layers.0.*'; repeatable."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="dtype of the tensors left unquantized.")] = "bfloat16",
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
) -> None:
    """Quantize with NVIDIA ModelOpt (its hybrid recipe: Mamba and MLP matrices quantized, attention, conv1d,
    embeddings and lm_head kept) and write the export vLLM and TensorRT-LLM load."""
    from compressor.pipelines.quantizing import QuantizeConfig, quantize_checkpoint
    from compressor.quantize import QuantRecipe

    config = QuantizeConfig(QuantRecipe(quant_format, tuple(keep or ())), data, samples, seq_len, batch_size, dtype,
                            str(tokenizer) if tokenizer else None, text_field, device)  # fmt: skip
    with progress_bar() as progress:
        task = progress.add_task("calibrating", total=samples * seq_len)
        record = quantize_checkpoint(
            model, config, out, overwrite=overwrite, on_batch=lambda n: progress.advance(task, n)
        )
    if json_output:
        print_json(record.to_dict())
        return
    budget = f" (the budget model: {fmt_memory(record.budget_bytes)})" if record.budget_bytes is not None else ""
    console.print(f"wrote {record.quant_algo} weights, {fmt_memory(record.stored_bytes)}{budget}, to [bold]{out}[/]")
    console.print(f"kept in high precision: {', '.join(record.excluded) or 'nothing'}", highlight=False)


# ----- train / distill ----------------------------------------------------------------------------------
class RichReporter:
    """Live progress of a training run: a bar over steps with loss, KL, tokens/s and ETA; eval lines above."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[line]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console, disable=quiet,
        )  # fmt: skip
        self.task = None

    def start(self, total_steps: int, first_step: int, tokens_per_step: int) -> None:
        if first_step:
            self.note(f"resuming at step {first_step}")
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=first_step, line="")

    def step(self, record: dict) -> None:
        line = f"loss {record['loss']:.4f}"
        if "kl" in record:
            line += f"  KL {record['kl']:.4f}  top-1 {100 * record['top1_agreement']:.1f}%"
        if "attention_kl" in record:
            line += f"  attention KL {record['attention_kl']:.4f}"
        line += f"  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=record["step"], line=line)

    def evaluated(self, record: dict) -> None:
        line = f"step {record['step']:>6}  val loss {record['val_loss']:.4f}  ppl {record['val_ppl']:.2f}"
        if record.get("val_kl") is not None:
            line += f"  KL {record['val_kl']:.4f}  top-1 {100 * record['val_top1_agreement']:.1f}%"
        if record.get("teacher_val_loss") is not None:
            line += f"  (teacher loss {record['teacher_val_loss']:.4f})"
        if record.get("val_retrieval_accuracy") is not None:
            line += f"  retrieval {100 * record['val_retrieval_accuracy']:.0f}% ({record['val_retrieval_ll']:.2f})"
        self.note(line)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(text, highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def _run_training(options: dict[str, Any]) -> None:
    """Build the TrainConfig from a command's options, then plan (--dry-run) or train."""
    from compressor.budget import parse_context, parse_tokens
    from compressor.losses import LossSpec
    from compressor.train import TrainConfig, train

    dry_run, quiet, plan = options.pop("dry_run"), options.pop("quiet"), options.pop("plan")
    loss_fields = [f.name for f in dataclasses.fields(LossSpec)]
    loss = LossSpec(**{name: options.pop(name) for name in loss_fields})
    tokens = options.pop("tokens")
    options["eval_ctx"] = parse_context(options["eval_ctx"])
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    config = TrainConfig(tokens=parse_tokens(tokens) if tokens is not None else None, loss=loss, **options)
    config.validate()
    if dry_run:
        from compressor.pipelines.preview import preview_training

        render_memory_plans(preview_training(config, nproc=plan.get("nproc"), gpu=plan.get("gpu")))
        return
    for name in ("data", "out"):
        if options[name] is None:
            raise OptionError(name, "is needed (or --dry-run to only plan the memory)")
    reporter = RichReporter(quiet)
    try:
        result = train(config, reporter)
    finally:
        reporter.stop()
    final = result.final_eval
    summary = f"done: {result.steps} steps, {result.tokens:,} tokens; checkpoint in {result.out / 'model'}"
    if final:
        summary += f"; val loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.2f})"
    if not quiet:
        console.print(summary)


def training_options(lr: float, min_lr: float) -> list[inspect.Parameter]:
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
        option("min_lr", float, "Final learning rate.", min_lr),
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
        option("dry_run", bool, "Print the memory plan per process (--nproc, --gpu) and what fits; train nothing.",
               False),
        option("quiet", bool, "No live display.", False),
    ]  # fmt: skip


@app.command()
@friendly
@with_group("run", training_options(lr=1e-4, min_lr=1e-5), dict)
@with_group("plan", PLAN_OPTIONS)
def distill(
    teacher: Annotated[Path, typer.Argument(help="Teacher checkpoint folder.")],
    student: Annotated[Path, typer.Argument(help="Student checkpoint folder (e.g. the pruned model).")],
    divergence: Annotated[str, typer.Option(help="forward_kl, reverse_kl or jsd.")] = "forward_kl",
    temperature: Annotated[float, typer.Option(help="Distillation temperature (loss scaled by T^2).")] = 1.0,
    jsd_beta: Annotated[float, typer.Option(help="Mixture weight of the generalized JSD.")] = 0.5,
    lm_weight: Annotated[float, typer.Option(help="Weight of the student's LM loss in the mix (0-1).")] = 0.0,
    cache_teacher: Annotated[bool, typer.Option(help="Precompute the teacher's top-k once; train without it.")] = False,
    top_k: Annotated[int, typer.Option(help="Tokens kept per position by --cache-teacher.")] = 64,
    attention_loss: AttentionLossOption = 0.0,
    attention_queries: AttentionQueriesOption = 256,
    teacher_dtype: Annotated[str | None, typer.Option(help="Teacher dtype (default bf16 on CUDA).")] = None,
    quantize: Annotated[
        str | None,
        typer.Option(help="Quantization-aware distillation: fp8 or nvfp4 (CUDA); writes OUT/quantized/ at the end."),
    ] = None,
    quantize_keep: Annotated[
        list[str] | None, typer.Option(help="ModelOpt quantizer-name pattern kept in high precision; repeatable.")
    ] = None,
    calib_sequences: Annotated[int, typer.Option(help="Training sequences that calibrate --quantize.")] = 128,
    run: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
) -> None:
    """Distill TEACHER's next-token distribution into STUDENT (logit distillation). Under
    `torchrun --nproc-per-node N` it trains data-parallel with both models sharded (FSDP2)."""
    options = {k: v for k, v in locals().items() if k not in ("run", "plan")}
    options["quantize_keep"] = tuple(quantize_keep or ())
    _run_training({**options, **run, "plan": plan})


@app.command("train")
@friendly
@with_group("run", training_options(lr=1e-3, min_lr=1e-4), dict)
@with_group("plan", PLAN_OPTIONS)
def train_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to train (e.g. from `compress init`).")],
    run: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
) -> None:
    """Plain language-model training of MODEL (the distillation loop without a teacher)."""
    options = dict(student=model, divergence="forward_kl", temperature=1.0, jsd_beta=0.5, lm_weight=1.0)
    _run_training({**options, **run, "plan": plan})


def main() -> None:  # pragma: no cover - console entry point
    app()


def lm_eval_main() -> None:
    """`lm-eval-compressor`: lm-eval's own command line with the "compressor" model registered.

    lm-eval (0.4.x) finds only the models its package registers, never a plug-in's, so `lm_eval --model
    compressor` cannot work by installation alone; this is the same command with that one addition."""
    try:
        import compressor.harness  # noqa: F401  (registers the model)
    except CompressorError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
