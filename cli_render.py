"""What `compress` shows: the consoles, tables, JSON and the renderers of the commands' records (cli.py
parses and calls the pipelines; this module only renders)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def _rank() -> int:
    """This process's rank under torchrun (RANK, with WORLD_SIZE above 1), else 0."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


# Under torchrun every process runs the command: only the first shows progress and results, and every one
# its errors (marked with its rank when it is not the first). A line of text is never broken at the
# console's width (80 columns in a pipe or a log): a path or a figure stays whole for grep and copy (soft
# wrap); tables are still laid out to the width.
RANK = _rank()
console = Console(quiet=RANK != 0, soft_wrap=True)
err_console = Console(stderr=True, quiet=RANK != 0, soft_wrap=True)
_error_console = Console(stderr=True, soft_wrap=True)


def print_error(message: str, style: str = "bold red", label: str = "error:") -> None:
    """One error line on stderr, from any process."""
    where = f"rank {RANK}: " if RANK else ""
    _error_console.print(f"{where}[{style}]{label}[/] {escape(message)}".rstrip(), highlight=False)


KIND_NAMES = {"mamba": "Mamba-2", "attention": "attention", "mlp": "MLP", "moe": "MoE"}


def print_json(data: Any) -> None:
    """JSON on stdout, always valid: NaN and infinity (not JSON) are written as null (from the first process)."""
    if RANK == 0:
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
    """A bar over tokens on a terminal's stderr; elsewhere (a log file, a pipe) none: a transient bar leaves
    only an empty line there."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def table(title: str | None, columns: list[str], rows: list[list[str | Text]], *, left: int = 1, **kwargs) -> Table:
    """A Rich table whose first `left` columns are left-aligned and the rest right-aligned. Its title,
    headers and cells are plain text (a path's '[...]' is not Rich markup; a cell may be a `Text`, e.g.
    `strong`). A word too long for its column (a path, in a table 80 columns wide) is folded onto the next
    lines, never cut short: two models in one folder stay told apart."""
    out = Table(title=None if title is None else Text(title), title_justify="left", **kwargs)
    for i, column in enumerate(columns):
        out.add_column(Text(column), justify="left" if i < left else "right", overflow="fold")
    for row in rows:
        out.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in row))
    return out


def bold_path(path: str | Path) -> str:
    """A path in bold, in a line of Rich markup: a '[...]' in it is text."""
    return f"[bold]{escape(str(path))}[/]"


def strong(text: str) -> Text:
    """A table cell in bold (a total)."""
    return Text(text, style="bold")


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
@contextlib.contextmanager
def eval_display(config):
    """The live display of an eval mode, as the pipeline's progress callbacks: a bar over the tokens (loss),
    the model being scored (retrieval), none (lm-eval, which reports its own)."""
    from compressor.pipelines.evaluating import LossEval, RetrievalEval

    if isinstance(config, LossEval):
        with progress_bar() as progress:
            bar = progress.add_task("evaluating", total=0, visible=False)
            yield {"on_tokens": lambda n, total: progress.update(bar, advance=n, total=total, visible=True)}
    elif isinstance(config, RetrievalEval):
        with err_console.status(config.task) as status:
            yield {"on_model": lambda path: status.update(escape(f"{config.task}: {path}"))}
    else:
        yield {}


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
            warning = f"{m.model}: the loss is not finite (an overflow: evaluate with --dtype float32)"
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)  # the first process only
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
        rows.append([strong("total"), strong(fmt_memory(plan.total(nproc)))])
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


def render_compression_preview(preview, budget) -> None:
    """A prune's or search's dry run: the candidates that meet the budget, then the memory plans."""
    from strategies.base import describe_stats

    result = preview.candidates
    stats = describe_stats(result.stats)
    console.print(
        f"{result.strategy}: {stats + '; ' if stats else ''}{len(result.candidates)} candidates meet the budget "
        f"({budget.describe() if budget else 'export_config'}) in {result.seconds:.2f} s; "
        "not scored (a config has no weights):",
        highlight=False,
    )
    moe = any("num_moe_experts" in c.architecture for c in result.candidates)  # the label names MoE widths
    chars = "M*-E" if moe else "M*-"
    rows = []
    for c in result.candidates:
        blocks = "/".join(str(c.pattern.count(char)) for char in chars)
        arch = c.architecture
        widths = [f"{c.active_params:,}"] if moe else [str(arch["hidden_size"]), _width(arch["ffn_hidden_size"])]
        rows.append([c.label, blocks, *widths, f"{c.params:,}", fmt_memory(c.memory_bytes)])
    widths = ["active"] if moe else ["hidden", "ffn"]
    console.print(table(None, ["candidate", f"{'/'.join(chars)} blocks", *widths, "parameters", "memory"], rows))
    for warning in result.warnings:
        say(f"warning: {warning}")
    render_memory_plans(preview.memory)


def _width(value: int | list[int]) -> str:
    """A width, or the range of one that differs from block to block (`Target.summary` lists those)."""
    if isinstance(value, list):
        return f"{min(value)}-{max(value)}" if value and min(value) != max(value) else str(value[0] if value else "-")
    return str(value)


# ----- info, estimate, importance, prune, search, train --------------------------------------------------
def render_info(model: str, config, counts: dict[str, int], dtypes: list[str]) -> None:
    """`compress info`: the architecture's table and the parameters by component."""
    from compressor.budget import active_parameters
    from compressor.config import loaders

    summary = config.summary()
    total, active = sum(counts.values()), active_parameters(config)
    pattern = config.pattern if len(config.pattern) <= 80 else config.pattern[:77] + "..."
    rows = [
        ["pattern", pattern],
        ["blocks", f"{summary['blocks']} ({block_counts(config)})"],
        ["hidden", str(config.hidden_size)],
        ["MLP ffn", str(config.intermediate_size)],
        ["attention", f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, "
                      f"head_dim {config.head_dim}"],
        ["Mamba-2", f"{config.mamba_num_heads} heads x head_dim {config.mamba_head_dim}, {config.n_groups} groups, "
                    f"state {config.ssm_state_size}, conv {config.conv_kernel}"],
        *([["MoE", moe_widths(config)]] if config.has_moe else []),
        ["vocab", str(config.vocab_size)],
        ["ratios", " / ".join(f"{100 * share:.0f}% {KIND_NAMES[kind]}" for kind, share in config.ratios().items())],
        ["widths", "uniform" if config.is_uniform else f"per block ({len(config.block_overrides)} differ)"],
        ["loads in", ", ".join(loaders(config))],
    ] + ([["dtype", ", ".join(dtypes)]] if dtypes else [])  # fmt: skip
    console.print(table(model, ["", ""], rows, left=2, show_header=False))
    rows = [
        [name, f"{count:,}", f"{100 * count / total:.1f}%"] for name, count in counts.items() if count or name != "moe"
    ]
    rows.append([strong("total"), strong(f"{total:,}"), "100%"])
    if config.has_moe:
        rows.append(["active per token", f"{active:,}", f"{100 * active / total:.1f}%"])
    console.print(table("parameters", ["component", "parameters", "share"], rows))


def block_counts(config) -> str:
    """'23 Mamba-2, 6 attention, 0 MLP, 23 MoE' (MoE only for models that have MoE blocks)."""
    from compressor.config import ATTENTION, MAMBA, MLP, MOE

    counts = f"{config.count(MAMBA)} Mamba-2, {config.count(ATTENTION)} attention, {config.count(MLP)} MLP"
    return counts + (f", {config.count(MOE)} MoE" if config.has_moe else "")


def moe_widths(config) -> str:
    """The MoE row of `compress info`: experts, top-k, expert and shared-expert FFN, groups, scaling."""
    groups = f"{config.n_group} group{'s' if config.n_group > 1 else ''} (top {config.topk_group})"
    latent = f", latent {config.moe_latent_size}" if config.moe_latent_size else ""
    return (
        f"{config.n_routed_experts} experts, top-{config.num_experts_per_tok}, expert FFN "
        f"{config.moe_intermediate_size}, shared FFN {config.moe_shared_expert_intermediate_size}, {groups}, "
        f"scaling {config.routed_scaling_factor:g}{latent}"
    )


def render_estimate(record, vs: str | None) -> None:
    """`compress estimate`: the report, a quantized checkpoint's stored weights, the comparison with `vs` and
    the measurement."""
    render_report(record.model, record.config, record.report)
    stored = record.stored
    if stored is not None:
        dtypes = ", ".join(f"{name} {fmt_memory(n)}" for name, n in sorted(stored.by_dtype.items()))
        console.print(f"stored weights ({stored.quant_algo}): {fmt_memory(stored.total)} ({dtypes})", highlight=False)
    if record.report.versus is not None:
        render_versus(record.model, vs, record.report.versus)
    if record.measured is not None:
        render_measured(record.measured, record.weight_dtype)


def render_report(model: str, config, report) -> None:
    from compressor.budget import GIB
    from compressor.config import ATTENTION, MAMBA

    memory = report.memory
    active = f", {report.active_parameters:,} active per token" if config.has_moe else ""
    console.print(
        f"{bold_path(model)}: {report.total_parameters:,} parameters{active} ({config.num_blocks} blocks: "
        f"{block_counts(config)})",
        highlight=False,
    )
    if config.has_moe:
        console.print(f"MoE: {moe_widths(config)}", highlight=False)
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
    rows.append([strong("total"), "", strong(f"{memory.total / GIB:,.2f}"), strong(f"{memory.total:,}")])
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


def render_versus(model: str, baseline: str, versus) -> None:
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


def render_importance(scores, out: Path) -> None:
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


def render_candidates(record) -> None:
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


def render_search(record, out: Path, json_output: bool = False) -> None:
    """A search's figure, its Pareto fronts (`pareto.png` in `out`, drawn from the record, with --json too),
    then the record as JSON, or its candidates ranked after distillation and where its front and plot are."""
    from compressor.pipelines.plots import plot_pareto
    from compressor.pipelines.search import PLOT_FILE

    plot_pareto(record, out / PLOT_FILE)
    if json_output:
        print_json(record.to_dict())
        return
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
        f"Pareto front (memory): {record.pareto['memory']}; plot in {out / PLOT_FILE}; "
        f"`compress materialize {out} K --out DIR` writes candidate K",
        markup=False,
    )
    served: dict[str, list[str]] = {}  # search folders written before it was recorded have no loads_in
    for c in record.candidates:
        served.setdefault(", ".join(c.architecture.get("loads_in", ["compressor"])), []).append(f"#{c.index}")
    say("loads in: " + "; ".join(f"{' '.join(ids)}: {engines}" for engines, ids in served.items()))
    if probe:
        say(f"the original on {retrieval_column(probe)}: {retrieval_cell(probe['source'])}")
    if record.library:
        lib = record.library
        how = " (streamed)" if (record.bld or {}).get("stream") else ""
        say(f"library: {lib['variants']} variants on {lib['tokens']:,} tokens{how}, mean blockwise error "
            f"{lib['mean_initial_error']:.3f} pruned -> {lib['mean_error']:.3f} trained")  # fmt: skip
    if record.correlation:
        r = record.correlation
        say(f"{picked_by} against val_{r['after']} over {r['finalists']} finalists: Spearman {r['spearman']:.2f}, "
            f"Kendall {r['kendall']:.2f}")  # fmt: skip
    if record.seconds:
        say("time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in record.seconds.items()))


class GenerationPrinter:
    """`compress generate`'s output as it is decoded (`generating.generate_text`'s `on_text`): each prompt in
    bold, then its continuation piece by piece; a blank line between prompts. Prompts and continuations are
    printed as they are, never read as Rich markup (a '[/b]' in them is text)."""

    def __init__(self, prompts: tuple[str, ...]) -> None:
        self.prompts, self.current = prompts, None

    def __call__(self, index: int, piece: str) -> None:
        if index != self.current:
            if self.current is not None:
                console.print("\n")
            console.print(self.prompts[index], style="bold", end="", markup=False, highlight=False)
            self.current = index
        console.print(piece, end="", markup=False, highlight=False)

    def end(self) -> None:
        if self.current is not None:
            console.print()


def loads_in(path: Path) -> str:
    """'loads in: compressor, transformers, vLLM' for a written checkpoint (per-block ones: compressor only)."""
    from compressor.config import HybridConfig, loaders

    return f"loads in: {', '.join(loaders(HybridConfig.from_file(path)))}"


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
            self.progress.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        if self.task is not None:  # a run refused before it started has no bar to end (stopping prints a line)
            self.progress.stop()


def render_measured(measured, weight_dtype: str) -> None:
    """`estimate --measure`: what the built model took and how fast it decoded, beside the estimate."""
    rows = [
        ["cache bytes", f"{measured.cache_bytes:,}", f"{measured.estimated_cache_bytes:,}"],
        ["decode latency", f"{1000 * measured.decode_latency_s:,.2f} ms/token", ""],
        ["decode tokens/s", f"{measured.decode_tokens_per_s:,.1f}", ""],
    ]
    console.print(table(f"measured on {measured.device} ({weight_dtype})", ["metric", "measured", "estimated"], rows))


def render_training(result) -> None:
    """The line a finished run ends with: steps, tokens, where the checkpoint is, the last validation."""
    final = result.final_eval
    summary = f"done: {result.steps} steps, {result.tokens:,} tokens; checkpoint in {result.out / 'model'}"
    if final:
        summary += f"; val loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.2f})"
    console.print(summary, markup=False)
