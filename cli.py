"""`compress`: the command line of compressor. Thin Typer commands: parse, validate, call the library,
render with Rich. A user mistake prints one line and exits with status 1; `--json` prints machine-readable
results on stdout."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from compressor.distributed import resolve_device
from compressor.errors import CompressorError

app = typer.Typer(
    name="compress",
    help="Prune, search and distill hybrid Mamba-Transformer (Nemotron-H format) language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's).")]


def friendly(command):
    """Turn compressor's user-facing errors into one red line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CompressorError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def load_config_or_preset(model: str):
    """A checkpoint folder, a config.json, or a preset name -> (HybridConfig, folder or None)."""
    from compressor.config import HybridConfig
    from compressor.presets import get_preset

    path = Path(model)
    if path.exists():
        return HybridConfig.from_file(path), (path if path.is_dir() else None)
    try:
        return get_preset(model), None
    except CompressorError:
        raise CompressorError(f"{model!r} is neither a checkpoint folder, a config.json nor a preset name") from None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


# ----- info ---------------------------------------------------------------------------------------------
@app.command()
@friendly
def info(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, config.json or preset name (see `compress init`).")],
    json_output: JsonOption = False,
) -> None:
    """Describe a model: blocks by type, widths, parameters by component, dtype."""
    from compressor.budget import parameter_counts
    from compressor.checkpoint import weight_files

    config, folder = load_config_or_preset(model)
    counts = parameter_counts(config)
    total = sum(counts.values())
    dtypes: list[str] = []
    if folder is not None:
        from safetensors import safe_open

        seen = set()
        for file in sorted(set(weight_files(folder).values())):
            with safe_open(file, framework="pt") as f:
                seen.update(f.get_slice(name).get_dtype() for name in f.keys())  # noqa: SIM118
        dtypes = sorted(seen)
    summary = config.summary()
    if json_output:
        print_json(
            {
                "model": model,
                "pattern": config.pattern,
                "architecture": summary,
                "block_overrides": config.block_overrides,
                "parameters": {**counts, "total": total},
                "dtypes": dtypes,
            }
        )
        return
    arch = Table(title=f"{model}", show_header=False, title_justify="left")
    arch.add_column(style="bold")
    arch.add_column()
    pattern = config.pattern if len(config.pattern) <= 80 else config.pattern[:77] + "..."
    arch.add_row("pattern", pattern)
    arch.add_row(
        "blocks",
        f"{summary['blocks']} ({summary['mamba']} Mamba-2, {summary['attention']} attention, {summary['mlp']} MLP)",
    )
    arch.add_row("hidden", str(config.hidden_size))
    arch.add_row("MLP ffn", str(config.intermediate_size))
    arch.add_row(
        "attention",
        f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, head_dim {config.head_dim}",
    )
    arch.add_row(
        "Mamba-2",
        f"{config.mamba_num_heads} heads x head_dim {config.mamba_head_dim}, {config.n_groups} groups, "
        f"state {config.ssm_state_size}, conv {config.conv_kernel}",
    )
    arch.add_row("vocab", str(config.vocab_size))
    arch.add_row("widths", "uniform" if config.is_uniform else f"per block ({len(config.block_overrides)} differ)")
    if dtypes:
        arch.add_row("dtype", ", ".join(dtypes))
    console.print(arch)
    params = Table(title="parameters", title_justify="left")
    params.add_column("component")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    for name, count in counts.items():
        params.add_row(name, f"{count:,}", f"{100 * count / total:.1f}%")
    params.add_row("[bold]total", f"[bold]{total:,}", "100%")
    console.print(params)


# ----- estimate -----------------------------------------------------------------------------------------
@app.command()
@friendly
def estimate(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, config.json or preset name.")],
    ctx: Annotated[
        str | None, typer.Option(help="Context length, e.g. 128k (k = 1024). Default: max_position_embeddings.")
    ] = None,
    batch: Annotated[str, typer.Option(help="Sequences at once, or 'max': the most that fit the memory.")] = "1",
    gpu: Annotated[
        str | None,
        typer.Option(help="GPU for throughput: a10g, l4, l40s, a100-40gb, a100-80gb, h100-sxm, h200, b200, rtx-5090."),
    ] = None,
    gpu_bandwidth: Annotated[
        str | None, typer.Option(help="Your GPU's memory bandwidth, e.g. 600GB/s (with --gpu-tflops).")
    ] = None,
    gpu_tflops: Annotated[float | None, typer.Option(help="Your GPU's dense bf16 TFLOP/s.")] = None,
    target_mem: Annotated[
        str | None, typer.Option(help="Memory budget, e.g. 22GiB, 19.66GiB, 20GB (= 10^9 bytes); G alone = GiB.")
    ] = None,
    isl: Annotated[
        str | None, typer.Option(help="Prompt tokens of the throughput workload (default: ctx - osl).")
    ] = None,
    osl: Annotated[str | None, typer.Option(help="Generated tokens (default: 1024, at most half the ctx).")] = None,
    weight_dtype: Annotated[str, typer.Option(help="bf16, fp16, fp32, fp8 or fp4 (NVFP4).")] = "bf16",
    kv_dtype: Annotated[str | None, typer.Option(help="bf16, fp16, fp32 or fp8 (default: compute dtype).")] = None,
    ssm_dtype: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16 (default: the config's mamba_ssm_cache_dtype).")
    ] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="Prefill chunk of the activation allowance (default 2048); 0 leaves it out.")
    ] = None,
    measure: Annotated[
        bool, typer.Option(help="Also build the model, allocate its cache on --device and time decoding.")
    ] = False,
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
) -> None:
    """Parameters, inference memory at a context length (with a verdict for --target-mem), and throughput."""
    from compressor import budget
    from compressor.config import ATTENTION, MAMBA, MLP

    config, _ = load_config_or_preset(model)
    context = budget.parse_context(ctx) if ctx is not None else config.max_position_embeddings
    limit = budget.parse_size(target_mem) if target_mem is not None else None
    spec = _gpu_spec(gpu, gpu_bandwidth, gpu_tflops, limit)
    chunk = budget.DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    dtypes = dict(weight_dtype=weight_dtype, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype, prefill_chunk=chunk)
    largest = batch.strip().lower() == "max"
    if largest:
        fill = limit if limit is not None else spec.memory if spec is not None else None
        if fill is None:
            raise CompressorError("--batch max needs --target-mem or --gpu: the memory to fill")
        batch_size = max(budget.largest_batch(config, context, fill, **dtypes), 1)
    elif batch.strip().isdigit() and int(batch) > 0:
        batch_size = int(batch)
    else:
        raise CompressorError(f"--batch {batch!r} is not a positive whole number or 'max'")
    memory = budget.estimate_memory(config, context, batch_size, **dtypes)
    counts = budget.parameter_counts(config)
    total = sum(counts.values())

    throughput = None
    if spec is not None:
        out_tokens = budget.parse_context(osl) if osl is not None else max(min(1024, context // 2), 1)
        in_tokens = budget.parse_context(isl) if isl is not None else max(context - out_tokens, 1)
        workload = budget.Workload(in_tokens, out_tokens, "max" if largest else batch_size)
        throughput = budget.estimate_throughput(config, workload, spec, memory_limit=limit, **dtypes)
    measured = None
    if measure:
        measured = budget.measure(
            config,
            context,
            batch_size,
            device=resolve_device(device),
            weight_dtype=weight_dtype,
            kv_dtype=kv_dtype,
            ssm_dtype=ssm_dtype,
        )

    if json_output:
        target = None
        if limit is not None:
            target = {"bytes": limit, "fits": memory.headroom(limit) >= 0, "headroom": memory.headroom(limit)}
        print_json(
            {
                "model": model,
                "parameters": {**counts, "total": total},
                "memory": memory.to_dict(),
                "target": target,
                "throughput": throughput.to_dict() if throughput is not None else None,
                "measured": measured.to_dict() if measured is not None else None,
            }
        )
        return

    def gib(nbytes: float) -> str:
        return f"{nbytes / budget.GIB:,.2f} GiB"

    console.print(
        f"[bold]{model}[/]: {total:,} parameters ({config.num_blocks} blocks: {config.count(MAMBA)} Mamba-2, "
        f"{config.count(ATTENTION)} attention, {config.count(MLP)} MLP)",
        highlight=False,
    )
    table = Table(title=f"memory at {context:,} tokens x batch {batch_size}", title_justify="left")
    for name, justify in (("term", "left"), ("detail", "left"), ("GiB", "right"), ("bytes", "right")):
        table.add_column(name, justify=justify)
    quantized = " (matrices; the rest bf16)" if memory.weight_dtype in ("fp8", "fp4") else ""
    activations = f"prefill chunk {memory.prefill_chunk:,} tokens" if memory.prefill_chunk else "left out"
    rows = [
        ("weights", f"{memory.weight_dtype}{quantized}", memory.weights),
        ("KV cache", f"{config.count(ATTENTION)} attention blocks, {memory.kv_dtype}", memory.kv_cache),
        ("SSM state", f"{config.count(MAMBA)} Mamba blocks, {memory.ssm_dtype}", memory.ssm_state),
        ("conv state", f"K-1 = {config.conv_kernel - 1} columns, {memory.compute_dtype}", memory.conv_state),
        ("activations", f"{activations}, {memory.compute_dtype}", memory.activations),
    ]
    for term, detail, nbytes in rows:
        table.add_row(term, detail, f"{nbytes / budget.GIB:,.2f}", f"{nbytes:,}")
    table.add_row("[bold]total", "", f"[bold]{memory.total / budget.GIB:,.2f}", f"[bold]{memory.total:,}")
    console.print(table)
    if limit is not None:
        spare = memory.headroom(limit)
        at = f" at batch {batch_size} (the largest that fits)" if largest and spare >= 0 else ""
        if spare >= 0:
            console.print(f"[green]fits[/] in {gib(limit)} with {gib(spare)} to spare{at}", highlight=False)
        else:
            console.print(f"[red]does not fit[/] in {gib(limit)}: over by {gib(-spare)}", highlight=False)
    if throughput is not None:
        title = (
            f"throughput on {spec.name}: {throughput.input_tokens:,} in / {throughput.output_tokens:,} out x "
            f"batch {throughput.batch}"
        )
        caption = (
            f"roofline at {spec.memory_bandwidth / 1e9:,.0f} GB/s and {spec.bf16_flops / 1e12:,.1f} TFLOP/s bf16 "
            "(datasheet peaks)"
        )
        table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
        for name, justify in (("metric", "left"), ("value", "right"), ("note", "left")):
            table.add_column(name, justify=justify)
        ttft = f"{throughput.time_to_first_token_s:,.2f} s"
        table.add_row("time to first token", ttft, f"{throughput.prefill_bound} bound")
        latency = f"{1000 * throughput.decode_latency_s:,.2f} ms/token"
        table.add_row("decode latency", latency, f"{throughput.decode_bound} bound, mean over the output")
        table.add_row("decode tokens/s", f"{throughput.decode_tokens_per_s:,.1f}", "batch together")
        table.add_row("tokens/s overall", f"{throughput.tokens_per_s:,.1f}", "output / (prefill + decode)")
        console.print(table)
    if measured is not None:
        table = Table(title=f"measured on {measured.device} ({weight_dtype})", title_justify="left")
        for name, justify in (("metric", "left"), ("measured", "right"), ("estimated", "right")):
            table.add_column(name, justify=justify)
        table.add_row("cache bytes", f"{measured.cache_bytes:,}", f"{measured.estimated_cache_bytes:,}")
        table.add_row("decode latency", f"{1000 * measured.decode_latency_s:,.2f} ms/token", "")
        table.add_row("decode tokens/s", f"{measured.decode_tokens_per_s:,.1f}", "")
        console.print(table)


def _gpu_spec(name: str | None, bandwidth: str | None, tflops: float | None, memory: int | None):
    """--gpu NAME, optionally with its numbers replaced, or a GPU described by --gpu-bandwidth/--gpu-tflops."""
    import dataclasses

    from compressor import budget

    if tflops is not None and tflops <= 0:
        raise CompressorError(f"--gpu-tflops must be more than 0, got {tflops}")
    if name is None and bandwidth is None and tflops is None:
        return None
    if name is None and (bandwidth is None or tflops is None):
        raise CompressorError("describe your GPU with both --gpu-bandwidth and --gpu-tflops, or name one with --gpu")
    spec = budget.get_gpu(name) if name is not None else budget.GPUSpec("custom GPU", 0.0, 0.0, memory or 0)
    if bandwidth is not None:
        spec = dataclasses.replace(spec, memory_bandwidth=budget.parse_bandwidth(bandwidth))
    if tflops is not None:
        spec = dataclasses.replace(spec, bf16_flops=tflops * 1e12)
    return spec


# ----- init ---------------------------------------------------------------------------------------------
@app.command()
@friendly
def init(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint to.")],
    preset: Annotated[str | None, typer.Option(help="A preset name, e.g. tiny, small, 8b, 12b-v2.")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.json to build instead of a preset.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field, KEY=VALUE (JSON value); repeatable."),
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Folder or tokenizer.json to ship with the model.")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Random seed of the initialisation.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a randomly initialised model (a preset or a config.json) as a checkpoint."""
    import shutil
    import tempfile

    import torch

    from compressor.budget import available_memory, num_parameters
    from compressor.checkpoint import parse_dtype, save_model
    from compressor.config import HybridConfig
    from compressor.model import HybridLM
    from compressor.outputs import check_output
    from compressor.presets import get_preset

    if (preset is None) == (config is None):
        raise CompressorError("give exactly one of --preset NAME or --config JSON")
    check_output(out, overwrite=overwrite)
    arch = get_preset(preset) if preset is not None else HybridConfig.from_file(config)
    if set_:
        raw = arch.to_dict()
        for item in set_:
            key, sep, value = item.partition("=")
            if not sep:
                raise CompressorError(f"--set {item!r} is not KEY=VALUE")
            try:
                raw[key] = json.loads(value)
            except json.JSONDecodeError:
                raw[key] = value
        arch = HybridConfig.from_dict(raw)
    torch_dtype = parse_dtype(dtype)
    n_params = num_parameters(arch)
    needed = n_params * torch.empty(0, dtype=torch_dtype).element_size()
    available = available_memory("cpu")
    if available is not None and needed > 0.9 * available:
        raise CompressorError(
            f"a {n_params:,}-parameter model needs {needed / 2**30:.1f} GiB in {dtype}, but only "
            f"{available / 2**30:.1f} GiB of memory is available"
        )
    tokenizer_dir = None
    if tokenizer is not None:
        source = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
        if not source.is_file():
            raise CompressorError(f"no tokenizer.json at {tokenizer}")
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(source)).get_vocab_size()
        if vocab > arch.vocab_size:
            raise CompressorError(
                f"the tokenizer has {vocab} tokens but the model's vocab_size is {arch.vocab_size}: "
                f"add --set vocab_size={vocab}"
            )
        tokenizer_dir = Path(tempfile.mkdtemp())
        shutil.copyfile(source, tokenizer_dir / "tokenizer.json")
    try:
        torch.manual_seed(seed)
        model = HybridLM(arch).to(torch_dtype)
        save_model(model, out, tokenizer_from=tokenizer_dir, overwrite=overwrite)
    finally:
        if tokenizer_dir is not None:
            shutil.rmtree(tokenizer_dir)
    console.print(f"wrote a random {n_params:,}-parameter model ({dtype}) to [bold]{out}[/]")


# ----- eval ---------------------------------------------------------------------------------------------
@app.command("eval")
@friendly
def eval_(
    models: Annotated[list[Path], typer.Argument(help="Checkpoint folder(s) to evaluate (several: a comparison).")],
    data: Annotated[
        str,
        typer.Option(help="Text (.txt/.jsonl/.parquet/folder), tokens (.npy/.safetensors) or dataset name."),
    ],
    teacher: Annotated[
        Path | None, typer.Option(help="A teacher checkpoint: adds KL(teacher||model) and top-1 agreement.")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 8,
    max_sequences: Annotated[int | None, typer.Option(help="Evaluate at most this many sequences.")] = None,
    split: Annotated[str, typer.Option(help="all, or valid / train: the deterministic split of the data.")] = "all",
    valid_fraction: Annotated[float, typer.Option(help="Validation share when --split is valid/train.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/valid split.")] = 0,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer (default: the model folder's tokenizer.json).")
    ] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text in jsonl/parquet/datasets.")] = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Mean next-token loss and perplexity on a dataset; with --teacher, KL and top-1 agreement too. Several
    models are evaluated on the same sequences and compared in one table."""
    from compressor.checkpoint import load_model
    from compressor.data import model_sequences
    from compressor.evaluate import evaluate

    if split not in ("all", "valid", "train"):
        raise CompressorError(f"--split {split!r} is not one of all, valid, train")
    torch_device = resolve_device(device)
    teacher_model = load_model(teacher, dtype=dtype, device=torch_device) if teacher is not None else None
    first = load_model(models[0], dtype=dtype, device=torch_device)
    sequences = model_sequences(
        data,
        models[0],
        first.config.eos_id,
        seq_len=seq_len,
        tokenizer=tokenizer,
        text_field=text_field,
        max_sequences=max_sequences if split == "all" else None,
    )
    if split != "all":
        train, valid = sequences.split(valid_fraction, seed)
        sequences = valid if split == "valid" else train
        if max_sequences is not None:
            sequences = sequences.head(max_sequences)
    results = []
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=sequences.num_tokens * len(models))
        for path in models:
            student = first if path == models[0] else load_model(path, dtype=dtype, device=torch_device)
            result = evaluate(
                student,
                sequences.batches(batch_size, shuffle=False, drop_last=False),
                teacher=teacher_model,
                on_batch=lambda n: progress.advance(task, n),
            )
            results.append((path, student.num_parameters(), result))
    title = f"{Path(data).name}: {len(sequences)} x {seq_len} tokens"
    if json_output:
        rows = [
            {"model": str(p), "params": n, "teacher": str(teacher) if teacher else None, **r.to_dict()}
            for p, n, r in results
        ]
        print_json(rows[0] if len(rows) == 1 else rows)
        return
    if len(results) == 1:
        _print_eval(results[0][2], title, teacher_model is not None)
        return
    table = Table(title=title, title_justify="left")
    columns = ["model", "parameters", "loss", "perplexity"] + (["KL to teacher", "top-1"] if teacher else [])
    for column in columns:
        if column == "model":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for path, params, result in results:
        row = [str(path), f"{params:,}", f"{result.loss:.4f}", f"{result.perplexity:.2f}"]
        if teacher:
            row += [f"{result.kl:.4f}", f"{100 * result.top1_agreement:.1f}%"]
        table.add_row(*row)
    console.print(table)


def _print_eval(result, title: str, with_teacher: bool) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.2f}")
    if with_teacher:
        table.add_row("teacher loss", f"{result.teacher_loss:.4f}")
        table.add_row("teacher perplexity", f"{result.teacher_perplexity:.2f}")
        table.add_row("KL(teacher || model)", f"{result.kl:.4f}")
        table.add_row("top-1 agreement", f"{100 * result.top1_agreement:.1f}%")
    table.add_row("tokens", f"{result.tokens:,}")
    console.print(table)


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
    import torch

    from compressor.checkpoint import load_model
    from compressor.data import load_tokenizer
    from compressor.generate import generate as run_generate

    if max_new_tokens < 1:
        raise CompressorError("--max-new-tokens must be at least 1")
    torch_device = resolve_device(device)
    lm = load_model(model, dtype=dtype, device=torch_device)
    tok = load_tokenizer(model)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise CompressorError("the prompt is empty after tokenization")
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    out = run_generate(
        lm,
        torch.tensor([ids]),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=lm.config.eos_id,
        generator=generator,
    )
    console.print(prompt, style="bold", end="", highlight=False)
    console.print(tok.decode(out[0, len(ids) :].tolist()), highlight=False)


# ----- importance ---------------------------------------------------------------------------------------
@app.command()
@friendly
def importance(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to score.")],
    data: Annotated[str, typer.Option(help="Calibration text or tokens (as for `compress eval`).")],
    out: Annotated[Path, typer.Option(help="Importance folder to write.")],
    samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 1024,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 1,
    seq_reduce: Annotated[str, typer.Option(help="Over the sequence: mean, l2 or max (of |a|).")] = "mean",
    batch_reduce: Annotated[str, typer.Option(help="Over samples: l2, mean or max.")] = "l2",
    mamba_signal: Annotated[str, typer.Option(help="x (in_proj's x) or ssm_out (out_proj's input).")] = "x",
    drop_one: Annotated[str, typer.Option(help="Drop-one-block effect: none, kl or loss.")] = "none",
    iterative_rounds: Annotated[int, typer.Option(help="Remove the least important block and re-score, N times.")] = 0,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer (default: the model's).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of jsonl/parquet data.")] = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Score every prunable axis (hidden channels, FFN neurons, Mamba heads and head_dim, attention heads,
    blocks) from activations on calibration data; pruning and strategies reuse the folder."""
    from compressor.importance import ImportanceOptions, compute
    from compressor.outputs import atomic_output, check_output

    check_output(out, overwrite=overwrite)
    options = ImportanceOptions(seq_reduce, batch_reduce, mamba_signal, drop_one, iterative_rounds)
    passes = 1 + (0 if drop_one == "none" else max(1, iterative_rounds))
    with progress_bar() as progress:
        task = progress.add_task("scoring", total=samples * seq_len * passes)
        scores, world = compute(
            model,
            data,
            samples=samples,
            seq_len=seq_len,
            batch_size=batch_size,
            options=options,
            tokenizer=tokenizer,
            text_field=text_field,
            device=device,
            dtype=dtype,
            on_batch=lambda n: progress.advance(task, n * max(1, _world_size())),
        )
    if not world.is_main:
        return
    with atomic_output(out, overwrite=overwrite) as tmp:
        scores.save(tmp)
    if json_output:
        print_json({"out": str(out), **scores.meta, "block_influence": scores.block_influence.tolist()})
        return
    _print_importance(scores, out)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _print_importance(scores, out: Path) -> None:
    from compressor.config import PATTERN_CHARS

    pattern = scores.meta["pattern"]
    blocks = Table(title=f"blocks, least important first ({out})", title_justify="left")
    blocks.add_column("block", justify="right")
    blocks.add_column("kind")
    blocks.add_column("influence", justify="right")
    has_drop = scores.block_drop is not None
    if has_drop:
        blocks.add_column("drop-one", justify="right")
    method = "drop" if has_drop else "influence"
    order = scores.block_scores(method).argsort().tolist()
    shown = order if len(order) <= 12 else order[:6] + order[-6:]
    for rank, i in enumerate(shown):
        if len(order) > 12 and rank == 6:
            blocks.add_row("...", "", "", *([""] if has_drop else []))
        row = [str(i), PATTERN_CHARS[pattern[i]], f"{scores.block_influence[i]:.4f}"]
        if has_drop:
            row.append(f"{scores.block_drop[i]:.4f}")
        blocks.add_row(*row)
    console.print(blocks)
    axes = Table(title="score distributions (min / median / max)", title_justify="left")
    for column in ("axis", "count", "min", "median", "max"):
        axes.add_column(column, justify="right" if column != "axis" else "left")

    def add(name, values):
        values = values.flatten()
        axes.add_row(name, str(values.numel()), f"{values.min():.3g}", f"{values.median():.3g}", f"{values.max():.3g}")

    import torch

    add("hidden channels", scores.hidden)
    if scores.ffn:
        add("FFN neurons (all blocks)", torch.cat(list(scores.ffn.values())))
    if scores.mamba:
        add("Mamba heads (all blocks)", torch.cat([s.norm(dim=1) for s in scores.mamba.values()]))
        add("Mamba head_dim (all blocks)", torch.cat([s.norm(dim=0) for s in scores.mamba.values()]))
    if scores.attention:
        add("attention heads (all blocks)", torch.cat([s.norm(dim=1) for s in scores.attention.values()]))
    console.print(axes)


# ----- prune --------------------------------------------------------------------------------------------
def _budget_from_options(
    target_mem,
    ctx,
    batch,
    target_params,
    gpu,
    gpu_bandwidth,
    gpu_tflops,
    min_speedup,
    isl,
    osl,
    weight_dtype,
    kv_dtype,
    ssm_dtype,
):
    """A Budget from the command-line spellings, or None when no limit is given."""
    from compressor import budget

    if target_mem is None and target_params is None and min_speedup is None:
        return None
    limit = budget.parse_size(target_mem) if target_mem is not None else None
    context = budget.parse_context(ctx)
    workload = None
    if isl is not None or osl is not None:
        out_tokens = budget.parse_context(osl) if osl is not None else max(min(1024, context // 2), 1)
        in_tokens = budget.parse_context(isl) if isl is not None else max(context - out_tokens, 1)
        workload = budget.Workload(in_tokens, out_tokens, batch)
    return budget.Budget(
        memory=limit,
        context=context,
        batch=batch,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        ssm_dtype=ssm_dtype,
        params=budget.parse_params(target_params) if target_params is not None else None,
        gpu=_gpu_spec(gpu, gpu_bandwidth, gpu_tflops, limit),
        min_speedup=min_speedup,
        workload=workload,
    )


@app.command("prune")
@friendly
def prune_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to prune (--dry-run: also a preset or config).")],
    out: Annotated[Path | None, typer.Option(help="Folder for the pruned checkpoint (+ compression.json).")] = None,
    target_mem: Annotated[str | None, typer.Option(help="Memory budget at --ctx, e.g. 22GiB or 19.66GiB.")] = None,
    ctx: Annotated[str, typer.Option(help="Context length of the memory budget, e.g. 128k.")] = "8k",
    batch: Annotated[int, typer.Option(help="Sequences served at once.")] = 1,
    target_params: Annotated[str | None, typer.Option(help="Parameter budget, e.g. 9B.")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU for a throughput budget, e.g. a10g.")] = None,
    gpu_bandwidth: Annotated[str | None, typer.Option(help="Your GPU's bandwidth, e.g. 600GB/s.")] = None,
    gpu_tflops: Annotated[float | None, typer.Option(help="Your GPU's dense bf16 TFLOP/s.")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="At least this many times the original tokens/s.")] = None,
    isl: Annotated[str | None, typer.Option(help="Prompt tokens of the throughput workload.")] = None,
    osl: Annotated[str | None, typer.Option(help="Generated tokens of the throughput workload.")] = None,
    weight_dtype: Annotated[str, typer.Option(help="Deployment weights: bf16, fp16, fp32, fp8 or fp4.")] = "bf16",
    kv_dtype: Annotated[str | None, typer.Option(help="KV cache dtype (default: compute dtype).")] = None,
    ssm_dtype: Annotated[str | None, typer.Option(help="SSM state dtype (default: the config's).")] = None,
    export_config: Annotated[
        str | None, typer.Option(help="Prune to this ModelOpt export_config (JSON or file) instead of searching.")
    ] = None,
    importance_dir: Annotated[
        Path | None, typer.Option("--importance", help="Importance folder (`compress importance`).")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Calibration data (importance, then held-out scoring).")] = None,
    samples: Annotated[int, typer.Option(help="Calibration sequences for importance.")] = 1024,
    score_samples: Annotated[int, typer.Option(help="Held-out sequences to score candidates on.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 1,
    score: Annotated[str, typer.Option(help="Candidate score: kl (to the original) or loss.")] = "kl",
    strategy: Annotated[str, typer.Option(help="Search strategy (see `compressor.strategies`).")] = "minitron",
    top_k: Annotated[int, typer.Option(help="Candidates to score.")] = 10,
    max_width_pruning: Annotated[float, typer.Option(help="At most this share of a width removed.")] = 0.4,
    max_depth_pruning: Annotated[float, typer.Option(help="At most this share of all blocks removed.")] = 0.2,
    axes: Annotated[
        str, typer.Option(help="What to prune: hidden,ffn,mamba_heads,mamba_head_dim,depth.")
    ] = "hidden,ffn,depth",
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer (default: the model's).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of jsonl/parquet data.")] = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Only list the candidates that fit (works on presets and config.json too).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Pick the best architecture that meets a budget and write the pruned checkpoint (Minitron by default)."""
    from compressor.budget import format_bytes
    from compressor.search import prune_to_budget

    budget_ = _budget_from_options(
        target_mem, ctx, batch, target_params, gpu, gpu_bandwidth, gpu_tflops, min_speedup, isl, osl,
        weight_dtype, kv_dtype, ssm_dtype,
    )  # fmt: skip
    export = None
    if export_config is not None:
        text = Path(export_config).read_text() if Path(export_config).is_file() else export_config
        try:
            export = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CompressorError(f"--export-config is neither a JSON object nor a JSON file ({exc})") from None
    options = dict(
        top_k=top_k,
        max_width_pruning=max_width_pruning,
        max_depth_pruning=max_depth_pruning,
        axes=tuple(a.strip() for a in axes.split(",") if a.strip()),
    )
    if dry_run:
        _list_fitting(model, budget_, options, json_output)
        return
    if out is None:
        raise CompressorError("give --out FOLDER for the pruned checkpoint (or --dry-run to only list candidates)")
    with err_console.status("pruning") as status:
        record = prune_to_budget(
            model,
            out,
            budget=budget_,
            data=data,
            importance_dir=importance_dir,
            samples=samples,
            score_samples=score_samples,
            seq_len=seq_len,
            batch_size=batch_size,
            score_metric=score,
            strategy=strategy,
            strategy_options=options if strategy == "minitron" else {},
            export=export,
            tokenizer=tokenizer,
            text_field=text_field,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            on_progress=lambda text: (status.update(text), err_console.print(text, highlight=False)),
        )
    if json_output:
        print_json(record)
        return
    table = Table(title=f"candidates ({record['strategy']['name']}), best first", title_justify="left")
    for column in ("#", "candidate", "blocks", "parameters", "memory", "speedup", f"score ({record['score']})"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for i, c in enumerate(record["candidates"], start=1):
        table.add_row(
            str(i),
            c["label"],
            str(len(c["pattern"])),
            f"{c['params']:,}",
            format_bytes(c["memory_bytes"]) if c["memory_bytes"] is not None else "-",
            f"{c['speedup']:.2f}x" if c["speedup"] is not None else "-",
            f"{c['score']:.4f}" if c["score"] is not None else "-",
        )
    console.print(table)
    console.print(f"wrote the pruned model ({record['chosen']['params']:,} parameters) to [bold]{out}[/]")


def _list_fitting(model, budget_, options: dict, json_output: bool) -> None:
    """The analytic stage of the Minitron search on a config alone: what fits, largest per depth choice."""
    import time

    from compressor.budget import format_bytes, num_parameters
    from strategies.minitron import MinitronStrategy, describe

    if budget_ is None:
        raise CompressorError("give a budget (--target-mem / --target-params / --min-speedup)")
    config, _ = load_config_or_preset(str(model))
    start = time.perf_counter()
    targets, grid_points = MinitronStrategy(**options).fitting(config, None, budget_)
    seconds = time.perf_counter() - start
    shown = []
    for target in targets[: options["top_k"]]:
        pruned = target.config(config)
        shown.append(
            {
                "candidate": describe(config, pruned),
                "blocks": f"{pruned.count('mamba')}/{pruned.count('attention')}/{pruned.count('mlp')}",
                "params": num_parameters(pruned),
                "memory_bytes": budget_.memory_of(pruned).total if budget_.memory is not None else None,
                **target.summary(config),
            }
        )
    if json_output:
        print_json(
            {"grid_points": grid_points, "fitting_considered": len(targets), "seconds": seconds, "candidates": shown}
        )
        return
    console.print(
        f"{grid_points:,} grid points costed in {seconds:.2f} s; {len(targets):,} fitting candidates considered "
        f"({budget_.describe()}); the first {len(shown)} (no scores: a config has no weights):",
        highlight=False,
    )
    table = Table()
    for column in ("candidate", "M/*/- blocks", "hidden", "ffn", "parameters", "memory"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for c in shown:
        memory = format_bytes(c["memory_bytes"]) if c["memory_bytes"] is not None else "-"
        table.add_row(
            c["candidate"], c["blocks"], str(c["hidden_size"]), str(c["ffn_hidden_size"]), f"{c['params']:,}", memory
        )
    console.print(table)


# ----- search -------------------------------------------------------------------------------------------
@app.command()
@friendly
def search(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to compress.")],
    data: Annotated[str, typer.Option(help="Calibration and distillation data (text or tokens).")],
    out: Annotated[Path, typer.Option(help="Search folder: search.json, pareto.json/.png, candidates/.")],
    target_mem: Annotated[str | None, typer.Option(help="Memory budget at --ctx, e.g. 88GiB.")] = None,
    ctx: Annotated[str, typer.Option(help="Context length of the memory budget, e.g. 128k.")] = "8k",
    batch: Annotated[int, typer.Option(help="Sequences served at once.")] = 1,
    target_params: Annotated[str | None, typer.Option(help="Parameter budget, e.g. 47B.")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU for a throughput budget, e.g. a10g.")] = None,
    gpu_bandwidth: Annotated[str | None, typer.Option(help="Your GPU's bandwidth, e.g. 600GB/s.")] = None,
    gpu_tflops: Annotated[float | None, typer.Option(help="Your GPU's dense bf16 TFLOP/s.")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="At least this many times the original tokens/s.")] = None,
    isl: Annotated[str | None, typer.Option(help="Prompt tokens of the throughput workload, e.g. 8k.")] = None,
    osl: Annotated[str | None, typer.Option(help="Generated tokens of the throughput workload, e.g. 16k.")] = None,
    weight_dtype: Annotated[str, typer.Option(help="Deployment weights: bf16, fp16, fp32, fp8 or fp4.")] = "bf16",
    kv_dtype: Annotated[str | None, typer.Option(help="KV cache dtype.")] = None,
    ssm_dtype: Annotated[str | None, typer.Option(help="SSM state dtype.")] = None,
    strategy: Annotated[str, typer.Option(help="minipuzzle, minitron, or a plugged-in one.")] = "minipuzzle",
    candidates: Annotated[int, typer.Option(help="Finalists put through the short distillation.")] = 8,
    distill_tokens: Annotated[str, typer.Option(help="Distillation tokens per finalist, e.g. 50M.")] = "50M",
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (importance, scoring, distillation).")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Distillation sequences per step.")] = 16,
    micro_batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 4,
    lr: Annotated[float, typer.Option(help="Distillation peak learning rate.")] = 1e-4,
    min_lr: Annotated[float, typer.Option(help="Distillation final learning rate.")] = 1e-5,
    samples: Annotated[int, typer.Option(help="Calibration sequences for importance.")] = 1024,
    score_samples: Annotated[int, typer.Option(help="Held-out sequences for the zero-shot KL.")] = 64,
    importance_dir: Annotated[Path | None, typer.Option("--importance", help="Importance folder to reuse.")] = None,
    rank_by: Annotated[str, typer.Option(help="Rank finalists by kl (to the original) or loss.")] = "kl",
    ffn_fractions: Annotated[str, typer.Option(help="MiniPuzzle: FFN widths an MLP block may keep.")] = "1,0.75,0.5",
    mamba_head_fractions: Annotated[str, typer.Option(help="MiniPuzzle: Mamba head shares a block may keep.")] = "1",
    hidden_choices: Annotated[int, typer.Option(help="MiniPuzzle: hidden sizes tried.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the distillation data order and split.")] = 0,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer (default: the model's).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of jsonl/parquet data.")] = "text",
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the search in OUT, skipping finished candidates.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Search architectures under a budget: candidates scored zero-shot, the best few distilled briefly and
    ranked again; writes the table, the Pareto front (JSON, PNG) and lets you materialize any candidate."""
    from compressor.budget import format_bytes, parse_tokens
    from compressor.search import DistillSettings, run_search

    budget_ = _budget_from_options(
        target_mem, ctx, batch, target_params, gpu, gpu_bandwidth, gpu_tflops, min_speedup, isl, osl,
        weight_dtype, kv_dtype, ssm_dtype,
    )  # fmt: skip
    if budget_ is None and not resume:
        raise CompressorError("give a budget: --target-mem, --target-params or --gpu with --min-speedup")
    options: dict = {}
    if strategy == "minipuzzle":
        options = dict(
            ffn_fractions=tuple(float(f) for f in ffn_fractions.split(",")),
            mamba_head_fractions=tuple(float(f) for f in mamba_head_fractions.split(",")),
            hidden_choices=hidden_choices,
            top_k=max(candidates, 12),
        )
    elif strategy == "minitron":
        options = dict(top_k=max(candidates, 10))
    settings = DistillSettings(
        tokens=parse_tokens(distill_tokens), seq_len=seq_len, batch_size=batch_size,
        micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, seed=seed,
    )  # fmt: skip
    record = run_search(
        model, out, budget=budget_, data=data, strategy=strategy, strategy_options=options, finalists=candidates,
        distill=settings, importance_dir=importance_dir, samples=samples, score_samples=score_samples,
        rank_by=rank_by, tokenizer=tokenizer, text_field=text_field, device=device, dtype=dtype,
        overwrite=overwrite, resume=resume, on_progress=lambda text: err_console.print(text, highlight=False),
    )  # fmt: skip
    if json_output:
        print_json(record)
        return
    key = "val_kl" if record["rank_by"] == "kl" else "val_loss"
    rank = {index: position for position, index in enumerate(record["ranking"], start=1)}
    table = Table(title=f"{record['strategy']['name']} search ({out}), ranked after distillation", title_justify="left")
    for column in ("rank", "#", "candidate", "blocks", "parameters", "memory", "speedup", "zero-shot KL", key):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for e in sorted(record["candidates"], key=lambda e: (rank.get(e["index"], 10**6), e["zero_shot_kl"])):
        table.add_row(
            str(rank.get(e["index"], "-")),
            str(e["index"]),
            e["label"],
            str(len(e["pattern"])),
            f"{e['params']:,}",
            format_bytes(e["memory_bytes"]) if e["memory_bytes"] is not None else "-",
            f"{e['speedup']:.2f}x" if e["speedup"] is not None else "-",
            f"{e['zero_shot_kl']:.4f}",
            f"{e['distilled'][key]:.4f}" if e.get("distilled") else "-",
        )
    console.print(table)
    console.print(
        f"Pareto front (memory): {record['pareto']['memory']}; plot in {out / 'pareto.png'}; "
        f"`compress materialize {out} K --out DIR` writes candidate K"
    )


@app.command()
@friendly
def materialize(
    search_dir: Annotated[Path, typer.Argument(help="A folder written by `compress search`.")],
    index: Annotated[int, typer.Argument(help="The candidate's number (# in the search table).")],
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint.")],
    distilled: Annotated[bool, typer.Option(help="Its short-distilled weights instead of the pruned ones.")] = False,
    device: DeviceOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a searched candidate as a checkpoint (pruned from the original, or as distilled in the search)."""
    from compressor.search import materialize as write

    write(search_dir, index, out, distilled=distilled, overwrite=overwrite, device=device)
    console.print(f"wrote candidate {index} to [bold]{out}[/]")


# ----- train / distill ----------------------------------------------------------------------------------
class RichReporter:
    """Live progress of a training run: a bar over steps with loss, KL, tokens/s and ETA; eval lines above."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[line]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            disable=quiet,
        )
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
        line += f"  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=record["step"], line=line)

    def evaluated(self, record: dict) -> None:
        line = f"step {record['step']:>6}  val loss {record['val_loss']:.4f}  ppl {record['val_ppl']:.2f}"
        if record.get("val_kl") is not None:
            line += f"  KL {record['val_kl']:.4f}  top-1 {100 * record['val_top1_agreement']:.1f}%"
        if record.get("teacher_val_loss") is not None:
            line += f"  (teacher loss {record['teacher_val_loss']:.4f})"
        self.note(line)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(text, highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def _run_training(config, dry_run: bool, quiet: bool) -> None:
    from compressor.budget import format_bytes
    from compressor.train import memory_plan, train

    if dry_run:
        plan = memory_plan(config)
        table = Table(title="memory plan (per process)", title_justify="left")
        table.add_column("term")
        table.add_column("size", justify="right")
        for name, nbytes in plan["terms"].items():
            table.add_row(name, format_bytes(nbytes))
        table.add_row("[bold]total", f"[bold]{format_bytes(plan['total'])}")
        console.print(table)
        if plan["available"] is not None:
            spare = plan["available"] - plan["total"]
            verdict = "fits" if spare >= 0 else "does not fit"
            console.print(
                f"{verdict} on {plan['device']}: {format_bytes(plan['available'])} available, "
                f"{format_bytes(abs(spare))} {'to spare' if spare >= 0 else 'short'}"
            )
        return
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


def _train_config(**options):
    from compressor.budget import parse_tokens
    from compressor.losses import LossSpec
    from compressor.train import TrainConfig

    tokens, steps = options.pop("tokens"), options.pop("steps")
    if tokens is not None and steps is not None:
        raise CompressorError("give --tokens or --steps, not both")
    if tokens is not None:
        per_step = options["batch_size"] * options["seq_len"]
        steps = max(1, parse_tokens(tokens) // per_step)
    loss = LossSpec(
        divergence=options.pop("divergence"),
        temperature=options.pop("temperature"),
        jsd_beta=options.pop("jsd_beta"),
        lm_weight=options.pop("lm_weight"),
        chunk_tokens=options.pop("chunk_tokens"),
    )
    return TrainConfig(
        steps=steps, loss=loss, **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    )


OutOption = Annotated[Path, typer.Option(help="Run folder: model/ (latest checkpoint), metrics.jsonl.")]
DataOption = Annotated[str, typer.Option(help="Training text or tokens (as for `compress eval`).")]


TokensOption = Annotated[str | None, typer.Option(help="Token budget, e.g. 50M or 2B (sets the steps).")]
StepsOption = Annotated[int | None, typer.Option(help="Optimizer steps (default: one epoch).")]
SeqLenOption = Annotated[int, typer.Option(help="Tokens per sequence.")]
BatchSizeOption = Annotated[int, typer.Option(help="Sequences per optimizer step, all processes together.")]
MicroBatchOption = Annotated[int, typer.Option(help="Sequences per forward pass of one process.")]
LrOption = Annotated[float, typer.Option(help="Peak learning rate.")]
MinLrOption = Annotated[float, typer.Option(help="Final learning rate.")]
WarmupOption = Annotated[int | None, typer.Option(help="Linear warmup steps (default 5%).")]
ScheduleOption = Annotated[str, typer.Option(help="cosine, wsd (warmup-stable-decay) or constant.")]
DecayFractionOption = Annotated[float, typer.Option(help="WSD: share of steps spent decaying.")]
WeightDecayOption = Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")]
GradClipOption = Annotated[float, typer.Option(help="Gradient-norm clipping (0: off).")]
EvalEveryOption = Annotated[int, typer.Option(help="Validate every N steps.")]
EvalSequencesOption = Annotated[int, typer.Option(help="Validation sequences.")]
SaveEveryOption = Annotated[int, typer.Option(help="Checkpoint every N steps.")]
LogEveryOption = Annotated[int, typer.Option(help="Log training metrics every N steps.")]
ValidFractionOption = Annotated[float, typer.Option(help="Share of the data held out for validation.")]
MaxSequencesOption = Annotated[int | None, typer.Option(help="Read at most this many sequences.")]
AutocastOption = Annotated[str, typer.Option(help="auto (bf16 on CUDA), bf16 or off.")]
TextFieldOption = Annotated[str, typer.Option(help="Text field of jsonl/parquet data.")]
ResumeOption = Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")]
DryRunOption = Annotated[bool, typer.Option(help="Print the memory plan and whether it fits; train nothing.")]
QuietOption = Annotated[bool, typer.Option(help="No live display.")]
ChunkTokensOption = Annotated[
    int | None, typer.Option(help="Tokens per logits chunk in the loss (default: 128 MiB of logits).")
]
OverwriteRunOption = Annotated[bool, typer.Option(help="Replace an existing run folder.")]


@app.command()
@friendly
def distill(
    teacher: Annotated[Path, typer.Argument(help="Teacher checkpoint folder.")],
    student: Annotated[Path, typer.Argument(help="Student checkpoint folder (e.g. the pruned model).")],
    data: DataOption,
    out: OutOption,
    tokens: TokensOption = None,
    steps: StepsOption = None,
    seq_len: SeqLenOption = 512,
    batch_size: BatchSizeOption = 16,
    micro_batch_size: MicroBatchOption = 4,
    lr: LrOption = 1e-4,
    min_lr: MinLrOption = 1e-5,
    warmup_steps: WarmupOption = None,
    schedule: ScheduleOption = "cosine",
    decay_fraction: DecayFractionOption = 0.2,
    weight_decay: WeightDecayOption = 0.1,
    grad_clip: GradClipOption = 1.0,
    divergence: Annotated[str, typer.Option(help="forward_kl, reverse_kl or jsd.")] = "forward_kl",
    temperature: Annotated[float, typer.Option(help="Distillation temperature (loss scaled by T^2).")] = 1.0,
    jsd_beta: Annotated[float, typer.Option(help="Mixture weight of the generalized JSD.")] = 0.5,
    lm_weight: Annotated[float, typer.Option(help="Weight of the student's LM loss in the mix (0-1).")] = 0.0,
    chunk_tokens: ChunkTokensOption = None,
    cache_teacher: Annotated[bool, typer.Option(help="Precompute the teacher's top-k once; train without it.")] = False,
    top_k: Annotated[int, typer.Option(help="Tokens kept per position by --cache-teacher.")] = 64,
    eval_every: EvalEveryOption = 50,
    eval_sequences: EvalSequencesOption = 64,
    save_every: SaveEveryOption = 100,
    log_every: LogEveryOption = 10,
    valid_fraction: ValidFractionOption = 0.05,
    max_sequences: MaxSequencesOption = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, split and initialisation.")] = 0,
    dtype: Annotated[str, typer.Option(help="Student master-weight dtype.")] = "float32",
    teacher_dtype: Annotated[str | None, typer.Option(help="Teacher dtype (default bf16 on CUDA).")] = None,
    autocast: AutocastOption = "auto",
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer (default: the student's).")] = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    overwrite: OverwriteRunOption = False,
    resume: ResumeOption = False,
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
) -> None:
    """Distill TEACHER's next-token distribution into STUDENT (logit distillation). Under
    `torchrun --nproc-per-node N` it trains data-parallel with both models sharded (FSDP2)."""
    options = dict(locals())
    dry_run, quiet = options.pop("dry_run"), options.pop("quiet")
    _run_training(_train_config(**options), dry_run, quiet)


@app.command("train")
@friendly
def train_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to train (e.g. from `compress init`).")],
    data: DataOption,
    out: OutOption,
    tokens: TokensOption = None,
    steps: StepsOption = None,
    seq_len: SeqLenOption = 512,
    batch_size: BatchSizeOption = 16,
    micro_batch_size: MicroBatchOption = 4,
    lr: LrOption = 1e-3,
    min_lr: MinLrOption = 1e-4,
    warmup_steps: WarmupOption = None,
    schedule: ScheduleOption = "cosine",
    decay_fraction: DecayFractionOption = 0.2,
    weight_decay: WeightDecayOption = 0.1,
    grad_clip: GradClipOption = 1.0,
    chunk_tokens: ChunkTokensOption = None,
    eval_every: EvalEveryOption = 50,
    eval_sequences: EvalSequencesOption = 64,
    save_every: SaveEveryOption = 100,
    log_every: LogEveryOption = 10,
    valid_fraction: ValidFractionOption = 0.05,
    max_sequences: MaxSequencesOption = None,
    seed: Annotated[int, typer.Option(help="Seed of data order and split.")] = 0,
    dtype: Annotated[str, typer.Option(help="Master-weight dtype.")] = "float32",
    autocast: AutocastOption = "auto",
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer (default: the model's).")] = None,
    text_field: TextFieldOption = "text",
    device: DeviceOption = "auto",
    overwrite: OverwriteRunOption = False,
    resume: ResumeOption = False,
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
) -> None:
    """Plain language-model training of MODEL (the distillation loop without a teacher)."""
    options = dict(locals())
    dry_run, quiet = options.pop("dry_run"), options.pop("quiet")
    options["student"] = options.pop("model")
    options.update(divergence="forward_kl", temperature=1.0, jsd_beta=0.5, lm_weight=1.0)
    _run_training(_train_config(**options), dry_run, quiet)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
