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


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CompressorError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError(f"device {name!r} asked for, but no CUDA device is available: use --device cpu")
    return device


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
    import torch

    from compressor.checkpoint import weight_files
    from compressor.model import HybridLM

    config, folder = load_config_or_preset(model)
    with torch.device("meta"):
        counts = HybridLM(config).parameter_counts()
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
    with torch.device("meta"):
        n_params = HybridLM(arch).num_parameters()
    needed = n_params * torch.empty(0, dtype=torch_dtype).element_size()
    available = _available_memory()
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


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----- eval ---------------------------------------------------------------------------------------------
@app.command("eval")
@friendly
def eval_(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to evaluate.")],
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
    """Mean next-token loss and perplexity on a dataset; with --teacher, KL and top-1 agreement too."""
    from compressor.checkpoint import load_model
    from compressor.data import load_sequences, load_tokenizer
    from compressor.evaluate import evaluate

    if split not in ("all", "valid", "train"):
        raise CompressorError(f"--split {split!r} is not one of all, valid, train")
    torch_device = resolve_device(device)
    student = load_model(model, dtype=dtype, device=torch_device)
    teacher_model = load_model(teacher, dtype=dtype, device=torch_device) if teacher is not None else None
    sequences = load_sequences(
        data,
        seq_len=seq_len,
        tokenizer=_tokenizer_for(data, tokenizer, model, load_tokenizer),
        text_field=text_field,
        max_sequences=max_sequences if split == "all" else None,
        eos_id=_eos_id(student.config),
    )
    if split != "all":
        train, valid = sequences.split(valid_fraction, seed)
        sequences = valid if split == "valid" else train
        if max_sequences is not None:
            sequences = sequences.head(max_sequences)
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=sequences.num_tokens)
        result = evaluate(
            student,
            sequences.batches(batch_size, shuffle=False, drop_last=False),
            teacher=teacher_model,
            on_batch=lambda n: progress.advance(task, n),
        )
    if json_output:
        print_json({"model": str(model), "teacher": str(teacher) if teacher else None, **result.to_dict()})
        return
    table = Table(title=f"{Path(data).name}: {len(sequences)} x {seq_len} tokens", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.2f}")
    if teacher_model is not None:
        table.add_row("teacher loss", f"{result.teacher_loss:.4f}")
        table.add_row("teacher perplexity", f"{result.teacher_perplexity:.2f}")
        table.add_row("KL(teacher || model)", f"{result.kl:.4f}")
        table.add_row("top-1 agreement", f"{100 * result.top1_agreement:.1f}%")
    table.add_row("tokens", f"{result.tokens:,}")
    console.print(table)


def _tokenizer_for(data: str, tokenizer: Path | None, model: Path, load_tokenizer):
    """The tokenizer for text data: --tokenizer, else the model folder's; token files need none."""
    if Path(data).suffix.lower() in (".npy", ".safetensors"):
        return None
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if not (model / "tokenizer.json").is_file():
        raise CompressorError(f"{model} has no tokenizer.json: pass --tokenizer, or give tokenized data (.npy)")
    return load_tokenizer(model)


def _eos_id(config) -> int | None:
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


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
        eos_token_id=_eos_id(lm.config),
        generator=generator,
    )
    console.print(prompt, style="bold", end="", highlight=False)
    console.print(tok.decode(out[0, len(ids) :].tolist()), highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
