"""`compress`: the command line of compressor. Thin Typer commands: parse, call the library, render with
Rich. A user mistake prints one line and exits with status 1 (COMPRESSOR_DEBUG=1 shows the traceback
instead); `--json` prints machine-readable results on stdout."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from cli_options import (
    HF_EXACT_RETIRED,
    LIBRARY_OPTIONS,
    NPROC_OPTION,
    PLAN_OPTIONS,
    RETRIEVAL_OPTIONS,
    AttentionLossOption,
    AttentionQueriesOption,
    CacheTargetsOption,
    CompressGroup,
    DeviceOption,
    DistillQuantizeKeepOption,
    DistillQuantizeOption,
    DtypeOption,
    EstimateCtxOption,
    EstimateIslOption,
    EstimateMeasureOption,
    EstimatePrefillChunkOption,
    EstimateTargetMemOption,
    EstimateVsOption,
    EstimateWeightDtypeOption,
    EvalDataOption,
    EvalIncludePathOption,
    EvalLimitOption,
    EvalLmEvalTasksOption,
    EvalTaskOption,
    EvalTeacherOption,
    EvalWeightsOnlyOption,
    GpuBandwidthOption,
    GpuOption,
    GpuTflopsOption,
    HfExactOption,
    ImportanceDirOption,
    ImportanceDropOneOption,
    ImportanceDryRunOption,
    InitLayersOption,
    InitSetOption,
    JsonOption,
    KvDtypeOption,
    OverwriteOption,
    PruneDryRunOption,
    PruneExportConfigOption,
    PruneStrategyOption,
    QuantizeKeepOption,
    RetrievalWeightOption,
    SamplesOption,
    ScoreOption,
    ScoreSamplesOption,
    SearchActivationCheckpointingOption,
    SearchDryRunOption,
    SearchRankByOption,
    SearchShareTeacherOption,
    SsmDtypeOption,
    TeacherCacheOption,
    TextFieldOption,
    TokenizerOption,
    WeightDtypeOption,
    dry_run_plan,
    friendly,
    given_options,
    option,
    print_version,
    training_options,
    with_group,
    with_strategy_options,
)
from cli_render import (
    KIND_NAMES,
    GenerationPrinter,
    RichReporter,
    bold_path,
    console,
    err_console,
    eval_display,
    fmt_memory,
    loads_in,
    print_error,
    print_json,
    progress_bar,
    render_candidates,
    render_compression_preview,
    render_estimate,
    render_eval,
    render_importance,
    render_info,
    render_memory_plans,
    render_search,
    render_training,
    say,
)
from compressor.budget import TERMS
from compressor.errors import CompressorError, OptionError

app = typer.Typer(
    name="compress",
    help="Prune, search and distill hybrid Mamba-Transformer (Nemotron-H format) language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CompressGroup,
)


@app.callback()
def _app_options(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    pass  # no docstring: the app's help stays Typer(help=...)


# ----- errors, shared options, rendering helpers ------------------------------------------------------------
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
    from compressor.pipelines.describing import describe_model

    record = describe_model(model)
    print_json(record.to_dict()) if json_output else render_info(model, record.config, record.counts, record.dtypes)


# ----- estimate -----------------------------------------------------------------------------------------
@app.command()
@friendly
def estimate(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, config.json or preset name.")],
    ctx: EstimateCtxOption = None,
    batch: Annotated[str, typer.Option(help="Sequences at once, or 'max': the most that fit the memory.")] = "1",
    gpu: GpuOption = None,
    gpu_bandwidth: GpuBandwidthOption = None,
    gpu_tflops: GpuTflopsOption = None,
    target_mem: EstimateTargetMemOption = None,
    isl: EstimateIslOption = None,
    osl: Annotated[str | None, typer.Option(help="Generated tokens (default: 1024, at most half the ctx).")] = None,
    weight_dtype: EstimateWeightDtypeOption = None,
    kv_dtype: KvDtypeOption = None,
    ssm_dtype: SsmDtypeOption = None,
    prefill_chunk: EstimatePrefillChunkOption = None,
    vs: EstimateVsOption = None,
    measure: EstimateMeasureOption = False,
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
) -> None:
    """Parameters, inference memory at a context length (with a verdict for --target-mem), and throughput."""
    from compressor.pipelines.estimating import EstimateConfig, estimate_model

    config = EstimateConfig(ctx, batch, target_mem, gpu, gpu_bandwidth, gpu_tflops, isl, osl, weight_dtype, kv_dtype,
                            ssm_dtype, prefill_chunk, vs, measure, device)  # fmt: skip
    record = estimate_model(model, config)
    print_json(record.to_dict()) if json_output else render_estimate(record, vs)


# ----- init ---------------------------------------------------------------------------------------------
@app.command()
@friendly
def init(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint to.")],
    preset: Annotated[str | None, typer.Option(help="A preset name, e.g. tiny, small, 8b, 12b-v2.")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.json to build instead of a preset.")] = None,
    set_: InitSetOption = None,
    layers: InitLayersOption = None,
    attention_ratio: Annotated[float, typer.Option(help="Share of attention blocks (with --layers).")] = 0.0,
    mlp_ratio: Annotated[float, typer.Option(help="Share of MLP blocks (with --layers); the rest are Mamba-2.")] = 0.0,
    tokenizer: Annotated[Path | None, typer.Option(help="Folder or tokenizer.json to ship with the model.")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Random seed of the initialisation.")] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Write a randomly initialised model (a preset or a config.json) as a checkpoint."""
    from compressor.pipelines.initializing import InitConfig, init_model

    spec = InitConfig(preset, config, layers, attention_ratio, mlp_ratio, tuple(set_ or ()), tokenizer, dtype, seed)
    record = init_model(out, spec, overwrite=overwrite)
    arch = record.config
    blocks = ", ".join(f"{arch.count(kind)} {KIND_NAMES[kind]}" for kind in arch.ratios())
    console.print(
        f"wrote a random {record.params:,}-parameter model ({dtype}; {arch.pattern}: {blocks}) to {bold_path(out)}"
    )


# ----- eval ---------------------------------------------------------------------------------------------
@app.command("eval")
@friendly
def eval_(
    context: typer.Context,
    models: Annotated[list[Path], typer.Argument(help="Checkpoint folder(s) to evaluate (several: a comparison).")],
    data: EvalDataOption = None,
    task: EvalTaskOption = None,
    ctx: Annotated[str, typer.Option(help="--task: context lengths, e.g. 1k,4k,16k.")] = "1k",
    task_sequences: Annotated[int, typer.Option(help="--task: sequences per context (16 queries each).")] = 8,
    lm_eval_tasks: EvalLmEvalTasksOption = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval tasks: few-shot examples per prompt.")] = None,
    limit: EvalLimitOption = None,
    include_path: EvalIncludePathOption = None,
    teacher: EvalTeacherOption = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 8,
    max_sequences: Annotated[int | None, typer.Option(help="Evaluate at most this many sequences.")] = None,
    split: Annotated[str, typer.Option(help="all, or valid / train: the deterministic split of the data.")] = "all",
    valid_fraction: Annotated[float, typer.Option(help="Validation share when --split is valid/train.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/valid split.")] = 0,
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    weights_only: EvalWeightsOnlyOption = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Mean next-token loss and perplexity on a dataset; with --teacher, KL and top-1 agreement too. Several
    models are evaluated on the same sequences and compared in one table. Under `torchrun --nproc-per-node N`
    the models are sharded across the processes, each evaluates its share of the batches. With
    --lm-eval-tasks, lm-eval's task metrics instead (the `eval` extra), side by side per model."""
    from compressor.pipelines.evaluating import (
        LmEvalTasks,
        LossEval,
        RetrievalEval,
        eval_mode,
        evaluate_checkpoints,
    )

    mode = eval_mode(given_options(context), split)
    if mode == "task":
        config = RetrievalEval(task, ctx, task_sequences, data, batch_size, seed, device, dtype)
    elif mode == "lm_eval_tasks":
        config = LmEvalTasks(lm_eval_tasks, num_fewshot, limit, include_path, batch_size, device, dtype, weights_only)
    elif data is None:
        raise OptionError(
            "data",
            "is needed: the text to measure loss on (or --task for a retrieval task, --lm-eval-tasks for lm-eval)",
        )
    else:
        config = LossEval(data, teacher, seq_len, batch_size, max_sequences, split, valid_fraction, seed, tokenizer,
                          text_field, weights_only, device, dtype)  # fmt: skip
    with eval_display(config) as display:
        record = evaluate_checkpoints(models, config, **display)
    if record is None:  # another process of a torchrun
        return
    if json_output:
        print_json(record.to_dict())
        return
    render_eval(record)


# ----- generate -----------------------------------------------------------------------------------------
@app.command()
@friendly
def generate(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (with tokenizer.json).")],
    prompt: Annotated[
        list[str], typer.Option(help="Text to continue; repeat it for several prompts, each continued on its own.")
    ],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sample from the smallest set holding p of the mass.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
) -> None:
    """Continue prompts with the model (cached decoding), printing each continuation as it is decoded."""
    from compressor.pipelines.generating import GenerateConfig, generate_text

    config = GenerateConfig(tuple(prompt), max_new_tokens, temperature, top_k, top_p, seed, device, dtype)
    printer = GenerationPrinter(config.prompts)
    try:
        generate_text(model, config, on_text=printer)
    finally:
        printer.end()  # a continuation cut short by an error or Ctrl-C still ends its line


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
    drop_one: ImportanceDropOneOption = "none",
    iterative_rounds: Annotated[int, typer.Option(help="Remove the least important block and re-score, N times.")] = 0,
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    resume: Annotated[bool, typer.Option(help="Continue the estimate of --out that a kill stopped.")] = False,
    dry_run: ImportanceDryRunOption = False,
    json_output: JsonOption = False,
    plan: dict[str, Any] | None = None,
    retrieval: dict[str, Any] | None = None,
) -> None:
    """Score every prunable axis (hidden channels, FFN neurons, Mamba heads and head_dim, attention heads,
    blocks) from activations on calibration data; pruning and strategies reuse the folder. Under
    `torchrun --nproc-per-node N` the model is sharded across the processes, each scores its share."""
    from compressor.importance import ImportanceOptions
    from compressor.pipelines.importance import ImportanceRunOptions, importance_or_preview

    plan = dry_run_plan(plan, dry_run)
    scoring = ImportanceOptions(seq_reduce, batch_reduce, mamba_signal, drop_one, iterative_rounds)
    options = ImportanceRunOptions(
        data=data, scoring=scoring, samples=samples, seq_len=seq_len, batch_size=batch_size, tokenizer=tokenizer,
        text_field=text_field, device=device, dtype=dtype, nproc=plan.get("nproc"), gpu=plan.get("gpu"), **retrieval,
    )  # fmt: skip
    with progress_bar() as progress:  # shown once scoring starts (never in a dry run)
        bar = progress.add_task("scoring", total=0, visible=False)
        on_tokens = lambda n, total: progress.update(bar, advance=n, total=total, visible=True)  # noqa: E731
        result = importance_or_preview(model, out, options, dry_run=dry_run, overwrite=overwrite, resume=resume,
                                       on_tokens=on_tokens, say=say)  # fmt: skip
    if dry_run:
        print_json(result.to_dict()[0]) if json_output else render_memory_plans(result)
    elif result is None:  # another process of a torchrun
        return
    elif json_output:
        print_json(result.to_dict())
    else:
        render_importance(result.scores, out)


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
    export_config: PruneExportConfigOption = None,
    importance_dir: ImportanceDirOption = None,
    data: Annotated[str | None, typer.Option(help="Calibration data (importance, then held-out scoring).")] = None,
    samples: SamplesOption = 1024,
    score_samples: ScoreSamplesOption = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 1,
    score: ScoreOption = "kl",
    retrieval_weight: RetrievalWeightOption = 1.0,
    strategy: PruneStrategyOption = "minitron",
    tokenizer: TokenizerOption = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    hf_exact: HfExactOption = False,
    dry_run: PruneDryRunOption = False,
    json_output: JsonOption = False,
    budget=None,
    strategy_options: dict[str, str] | None = None,
    plan: dict[str, Any] | None = None,
    retrieval: dict[str, Any] | None = None,
) -> None:
    """Pick the best architecture that meets a budget and write the pruned checkpoint (Minitron by default).
    Under `torchrun --nproc-per-node N` the source and every candidate are sharded across the processes."""
    from compressor.pipelines.pruning import PruneOptions, prune_or_preview

    if hf_exact:
        raise OptionError("hf_exact", HF_EXACT_RETIRED)
    plan = dry_run_plan(plan, dry_run)
    options = PruneOptions(
        data=data, budget=budget, strategy=strategy, strategy_options=strategy_options or {},
        export_config=export_config, importance_dir=importance_dir, samples=samples, score_samples=score_samples,
        seq_len=seq_len, batch_size=batch_size, score=score, retrieval_weight=retrieval_weight, tokenizer=tokenizer,
        text_field=text_field, device=device, dtype=dtype, nproc=plan.get("nproc"), **retrieval,
    )  # fmt: skip
    with nullcontext() if dry_run else err_console.status("pruning") as status:
        progress = lambda text: (status.update(escape(text)), say(text))  # noqa: E731
        result = prune_or_preview(model, out, options, dry_run=dry_run, overwrite=overwrite, say=progress)
    if dry_run:
        print_json(result.to_dict()) if json_output else render_compression_preview(result, budget)
    elif result is None:  # another process of a torchrun
        return
    elif json_output:
        print_json(result.to_dict())
    else:
        render_candidates(result)
        params = result.chosen.params
        console.print(f"wrote the pruned model ({params:,} parameters) to {bold_path(out)} ({loads_in(out)})")


# ----- search -------------------------------------------------------------------------------------------
@app.command()
@friendly
@with_strategy_options
@with_group("budget", BUDGET_OPTIONS, budget_from)
@with_group("plan", [NPROC_OPTION])
@with_group("retrieval", RETRIEVAL_OPTIONS, dict)
@with_group("library", LIBRARY_OPTIONS, dict)
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
    activation_checkpointing: SearchActivationCheckpointingOption = False,
    lr: Annotated[float, typer.Option(help="Distillation peak learning rate.")] = 1e-4,
    min_lr: Annotated[float | None, typer.Option(help="Distillation final learning rate (default: --lr / 10).")] = None,
    samples: SamplesOption = 1024,
    score_samples: ScoreSamplesOption = 64,
    importance_dir: ImportanceDirOption = None,
    rank_by: SearchRankByOption = "kl",
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
    share_teacher: SearchShareTeacherOption = False,
    dry_run: SearchDryRunOption = False,
    json_output: JsonOption = False,
    budget=None,
    strategy_options: dict[str, str] | None = None,
    plan: dict[str, Any] | None = None,
    retrieval: dict[str, Any] | None = None,
    library: dict[str, Any] | None = None,
) -> None:
    """Search architectures under a budget: candidates scored zero-shot, the best few distilled briefly and
    ranked again; writes the table, the Pareto front (JSON, PNG) and lets you materialize any candidate."""
    from compressor.pipelines.search import SearchOptions, search_or_preview

    plan = dry_run_plan(plan, dry_run)
    options = SearchOptions(
        data=data, budget=budget, strategy=strategy, strategy_options=strategy_options or {}, candidates=candidates,
        distill_tokens=distill_tokens, seq_len=seq_len, batch_size=batch_size, micro_batch_size=micro_batch_size,
        activation_checkpointing=activation_checkpointing, lr=lr, min_lr=min_lr, samples=samples,
        score_samples=score_samples, importance_dir=importance_dir, rank_by=rank_by, score=score,
        retrieval_weight=retrieval_weight, attention_loss=attention_loss, attention_queries=attention_queries,
        seed=seed, tokenizer=tokenizer, text_field=text_field, device=device, dtype=dtype,
        share_teacher=share_teacher, nproc=plan.get("nproc"), **library, **retrieval,
    )  # fmt: skip
    result = search_or_preview(model, out, options, dry_run=dry_run, resume=resume, overwrite=overwrite,
                               given=given_options(context), say=say)  # fmt: skip
    if dry_run:
        print_json(result.to_dict()) if json_output else render_compression_preview(result, budget)
    elif result is not None:  # None: another process of a torchrun, the main one reports
        render_search(result, out, json_output)


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
    console.print(f"wrote candidate {index} to {bold_path(out)} ({loads_in(out)})")


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
    keep: QuantizeKeepOption = None,
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
    console.print(f"wrote {record.quant_algo} weights, {fmt_memory(record.stored_bytes)}{budget}, to {bold_path(out)}")
    console.print(f"kept in high precision: {', '.join(record.excluded) or 'nothing'}", highlight=False)


# ----- train / distill ----------------------------------------------------------------------------------
def _train(options: dict[str, Any], plan: dict[str, Any]) -> None:
    """distill and train: the run their options describe (TrainConfig.from_options), planned (--dry-run) or
    trained with a live display (with --quiet, only the final line)."""
    from compressor.pipelines.training import train_or_preview
    from compressor.train import TrainConfig

    dry_run, quiet = options.pop("dry_run"), options.pop("quiet")
    plan = dry_run_plan(plan, dry_run)
    config = TrainConfig.from_options(**options)
    reporter = RichReporter(quiet)
    try:
        result = train_or_preview(config, dry_run=dry_run, nproc=plan.get("nproc"), gpu=plan.get("gpu"),
                                  reporter=reporter)  # fmt: skip
    finally:
        reporter.stop()
    if dry_run:
        render_memory_plans(result)
    else:
        render_training(result)


@app.command()
@friendly
@with_group("run", training_options(lr=1e-4), dict)
@with_group("plan", PLAN_OPTIONS)
def distill(
    teacher: Annotated[Path, typer.Argument(help="Teacher checkpoint folder.")],
    student: Annotated[Path, typer.Argument(help="Student checkpoint folder (e.g. the pruned model).")],
    divergence: Annotated[str, typer.Option(help="forward_kl, reverse_kl or jsd.")] = "forward_kl",
    temperature: Annotated[float, typer.Option(help="Distillation temperature (loss scaled by T^2).")] = 1.0,
    jsd_beta: Annotated[float, typer.Option(help="Mixture weight of the generalized JSD.")] = 0.5,
    lm_weight: Annotated[float, typer.Option(help="Weight of the student's LM loss in the mix (0-1).")] = 0.0,
    cache_teacher: Annotated[bool, typer.Option(help="Cache the teacher's targets; train without it.")] = False,
    cache_targets: CacheTargetsOption = None,
    top_k: Annotated[int, typer.Option(help="--cache-teacher: draws (sampled) or tokens (top-k) per position.")] = 64,
    teacher_cache_dir: TeacherCacheOption = None,
    attention_loss: AttentionLossOption = 0.0,
    attention_queries: AttentionQueriesOption = 256,
    teacher_dtype: Annotated[str | None, typer.Option(help="Teacher dtype (default bf16 on CUDA).")] = None,
    quantize: DistillQuantizeOption = None,
    quantize_keep: DistillQuantizeKeepOption = None,
    calib_sequences: Annotated[int, typer.Option(help="Training sequences that calibrate --quantize.")] = 128,
    run: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
) -> None:
    """Distill TEACHER's next-token distribution into STUDENT (logit distillation). Under
    `torchrun --nproc-per-node N` it trains data-parallel with both models sharded (FSDP2)."""
    options = {k: v for k, v in locals().items() if k not in ("run", "plan")}
    options["quantize_keep"] = tuple(quantize_keep or ())
    _train({**options, **run}, plan)


@app.command("train")
@friendly
@with_group("run", training_options(lr=1e-3), dict)
@with_group("plan", PLAN_OPTIONS)
def train_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to train (e.g. from `compress init`).")],
    run: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
) -> None:
    """Plain language-model training of MODEL (the distillation loop without a teacher)."""
    options = dict(student=model, divergence="forward_kl", temperature=1.0, jsd_beta=0.5, lm_weight=1.0)
    _train({**options, **run}, plan)


def main() -> None:  # pragma: no cover - console entry point
    app()


def lm_eval_main() -> None:
    """`lm-eval-compressor`: lm-eval's own command line with the "compressor" model registered.

    lm-eval (0.4.x) finds only the models its package registers, never a plug-in's, so `lm_eval --model
    compressor` cannot work by installation alone; this is the same command with that one addition."""
    try:
        import compressor.harness  # noqa: F401  (registers the model)
    except CompressorError as exc:
        print_error(str(exc))
        raise SystemExit(1) from None
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
