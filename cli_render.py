"""What `compress` shows: the consoles, tables, JSON and the renderers of the commands' records (cli.py
parses and calls the pipelines; this module only renders)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


KIND_NAMES = {"mamba": "Mamba-2", "attention": "attention", "mlp": "MLP", "moe": "MoE"}


def print_json(data: Any) -> None:
    """JSON on stdout, always valid: NaN and infinity (not JSON) are written as null."""
    print(json.dumps(_finite(data), indent=2, default=str, allow_nan=False))


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def say(text: str) -> None:
    err_console.print(escape(text), highlight=False)


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


def table(title: str | None, columns: list[str], rows: list[list[str]], *, left: int = 1, **kwargs) -> Table:
    """A Rich table whose first `left` columns are left-aligned and the rest right-aligned."""
    out = Table(title=title, title_justify="left", **kwargs)
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i < left else "right")
    for row in rows:
        out.add_row(*row)
    return out


def fmt_memory(nbytes: int | None) -> str:
    from compressor.budget import format_bytes

    return format_bytes(nbytes) if nbytes is not None else "-"


def retrieval_column(probe: dict[str, Any]) -> str:
    """'phonebook @4k (acc, ll)': the header of a retrieval column."""
    return f"{probe['task']} @{fmt_context(probe['context'])} (acc, ll)"


def retrieval_cell(result: dict[str, Any] | None) -> str:
    """'94% (-0.21)': exact-match accuracy and the answers' mean log-likelihood."""
    return f"{100 * result['accuracy']:.0f}% ({result['log_likelihood']:.2f})" if result else "-"


def fmt_context(tokens: int) -> str:
    """4096 -> '4k'; other counts as they are."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def fmt_speedup(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


# ----- eval ---------------------------------------------------------------------------------------------
def render_eval(record) -> None:
    """The table of an eval record (compressor.pipelines.evaluating), by its mode."""
    from compressor.pipelines.evaluating import LossRecord, RetrievalRecord

    if isinstance(record, LossRecord):
        _print_loss(record)
    elif isinstance(record, RetrievalRecord):
        _print_retrieval(record)
    else:
        _print_lm_eval(record)


def _print_loss(record) -> None:
    """The loss mode's table (one model: its metrics; several: a row each)."""
    for m in record.models:
        result = m.result
        if not math.isfinite(result.loss) or (result.kl is not None and not math.isfinite(result.kl)):
            say(f"[yellow]warning:[/] {m.model}: the loss is not finite (an overflow: evaluate with --dtype float32)")
    title = f"{Path(record.data).name}: {record.sequences} x {record.seq_len} tokens"
    teacher = record.teacher
    if len(record.models) == 1:
        result = record.models[0].result
        rows = [["loss (nats/token)", f"{result.loss:.4f}"], ["perplexity", f"{result.perplexity:.2f}"]]
        if teacher is not None:
            rows += [["teacher loss", f"{result.teacher_loss:.4f}"],
                     ["teacher perplexity", f"{result.teacher_perplexity:.2f}"],
                     ["KL(teacher || model)", f"{result.kl:.4f}"],
                     ["top-1 agreement", f"{100 * result.top1_agreement:.1f}%"]]  # fmt: skip
        console.print(table(title, ["metric", "value"], [*rows, ["tokens", f"{result.tokens:,}"]]))
        return
    columns = ["model", "parameters", "weights", "loss", "perplexity"] + (["KL to teacher", "top-1"] if teacher else [])
    rows = []
    for m in record.models:
        result = m.result
        row = [str(m.model), f"{m.params:,}", m.format, f"{result.loss:.4f}", f"{result.perplexity:.2f}"]
        rows.append(row + ([f"{result.kl:.4f}", f"{100 * result.top1_agreement:.1f}%"] if teacher else []))
    console.print(table(title, columns, rows))


def _print_retrieval(record) -> None:
    """Each model's exact match (answer log-likelihood) by context, a column per model."""
    results = list(record.results.values())
    queries = results[0][0].queries
    rows = [[fmt_context(context), *(retrieval_cell(rs[i].to_dict()) for rs in results)]
            for i, context in enumerate(record.contexts)]  # fmt: skip
    title = f"{record.task}: {queries} queries per context, exact match (answer log-likelihood)"
    console.print(table(title, ["context", *map(str, record.results)], rows))


def _print_lm_eval(record) -> None:
    """lm-eval's metrics, a column per model (rows: task and metric, value +- standard error)."""
    values: dict[tuple[str, str], dict[int, str]] = {}  # (task, metric) -> {model column: "value +- stderr"}
    for column, result in enumerate(record.results):
        for task in result.tasks:
            for metric in task.metrics:
                name = metric.name if metric.filter == "none" else f"{metric.name} ({metric.filter})"
                error = f" ± {metric.stderr:.4f}" if metric.stderr is not None else ""
                values.setdefault((task.task, name), {})[column] = f"{metric.value:.4f}{error}"
    rows = [
        [task, metric, *(cells.get(i, "-") for i in range(len(record.results)))]
        for (task, metric), cells in values.items()
    ]
    num_fewshot, limit = record.config.num_fewshot, record.config.limit
    shots = f", {num_fewshot}-shot" if num_fewshot else ""
    title = f"lm-eval{shots}{f', at most {limit:g} documents per task' if limit else ''}"
    console.print(table(title, ["task", "metric", *(str(r.model) for r in record.results)], rows, left=2))


# ----- dry runs -----------------------------------------------------------------------------------------
def render_memory_plans(preview) -> None:
    """One table per stage of a MemoryPreview (compressor.pipelines.preview): bytes per process, the verdict,
    the fewest processes that fit."""
    from compressor import planning

    for stage in preview.stages:
        plan, nproc = stage.plan, stage.nproc
        rows = [[name, fmt_memory(nbytes)] for name, nbytes in plan.terms(nproc).items()]
        rows.append(["[bold]total", f"[bold]{fmt_memory(plan.total(nproc))}"])
        console.print(table(f"memory plan: {plan.stage}, per process of {nproc}", ["term", "size"], rows))
        for line in [*planning.describe(plan, nproc, stage.memory, stage.device), *plan.notes]:
            console.print(line, highlight=False)
    gpu = preview.gpu
    if gpu is not None:
        reserve = fmt_memory(planning.GPU_RESERVE)
        console.print(
            f"usable: {gpu.name}'s {fmt_memory(gpu.memory)} less {reserve} for the CUDA context and the allocator; "
            "activations as compressor's torch path keeps them"
        )


def render_compression_preview(preview, config) -> None:
    """A prune's or search's dry run: the candidates that meet the budget, then the memory plans."""
    from strategies.base import describe_stats

    result = preview.candidates
    stats = describe_stats(result.stats)
    console.print(
        f"{result.strategy}: {stats + '; ' if stats else ''}{len(result.candidates)} candidates meet the budget "
        f"({config.budget.describe() if config.budget else 'export_config'}) in {result.seconds:.2f} s; "
        "not scored (a config has no weights):",
        highlight=False,
    )
    moe = any("num_moe_experts" in c.architecture for c in result.candidates)  # the label names MoE widths
    chars = "M*-E" if moe else "M*-"
    rows = []
    for c in result.candidates:
        blocks = "/".join(str(c.pattern.count(char)) for char in chars)
        arch = c.architecture
        widths = [f"{c.active_params:,}"] if moe else [str(arch["hidden_size"]), str(arch["ffn_hidden_size"])]
        rows.append([c.label, blocks, *widths, f"{c.params:,}", fmt_memory(c.memory_bytes)])
    widths = ["active"] if moe else ["hidden", "ffn"]
    console.print(table(None, ["candidate", f"{'/'.join(chars)} blocks", *widths, "parameters", "memory"], rows))
    for warning in result.warnings:
        say(f"warning: {warning}")
    render_memory_plans(preview.memory)
