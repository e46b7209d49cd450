"""Figures of search results, drawn by the command line once a search has returned (matplotlib, imported only
here and only when a figure is drawn)."""

from __future__ import annotations

from pathlib import Path

from compressor.pipelines.records import Candidate, SearchRecord


def plot_pareto(record: SearchRecord, path: Path) -> None:
    """Quality against memory (and against speedup when estimated), the Pareto front joined, as a PNG; with
    a retrieval probe, one more panel: retrieval accuracy against memory (after distillation where there is
    one, else zero-shot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_index = {c.index: c for c in record.candidates}
    if record.rank_by == "retrieval":
        quality = "retrieval error (1 - acc.), distilled (o) / zero-shot (x)"
    else:
        quality = f"val_{record.rank_by} after short distillation (o) / zero-shot {record.score_metric} (x)"

    def x_of(c: Candidate, panel: str) -> float:
        return (c.memory_bytes or 0) / 2**20 if panel == "memory" else c.speedup

    def y_of(c: Candidate) -> float:
        return c.quality(record.rank_by)

    panels = [("memory", "memory (MiB)")] + ([("speedup", "estimated speedup")] if "speedup" in record.pareto else [])
    columns = len(panels) + (record.retrieval is not None)
    fig, axes = plt.subplots(1, columns, figsize=(6 * columns, 4.5), squeeze=False)
    for ax, (panel, label) in zip(axes[0][: len(panels)], panels, strict=True):
        for c in record.candidates:
            done = c.distilled is not None
            ax.scatter(x_of(c, panel), y_of(c), marker="o" if done else "x", color="tab:blue" if done else "tab:gray")
            ax.annotate(str(c.index), (x_of(c, panel), y_of(c)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = [by_index[i] for i in record.pareto[panel]]
        ax.plot(
            [x_of(c, panel) for c in front],
            [y_of(c) for c in front],
            color="tab:red",
            linewidth=1,
            label="Pareto front",
        )
        ax.set_xlabel(label)
        ax.set_ylabel(quality)
        ax.legend()
    if record.retrieval is not None:
        _retrieval_panel(fig, record)
    fig.suptitle(f"{record.strategy} search: {record.budget.describe()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _retrieval_panel(fig, record: SearchRecord) -> None:
    """The last axes of `fig`: each candidate's retrieval accuracy against memory, the original's as a line."""
    ax = fig.axes[-1]
    probe = record.retrieval
    for c in record.candidates:
        result = c.distilled.retrieval if c.distilled is not None and c.distilled.retrieval else c.retrieval
        if result is None:
            continue
        x, y = (c.memory_bytes or 0) / 2**20, 100 * result["accuracy"]
        done = c.distilled is not None
        ax.scatter(x, y, marker="o" if done else "x", color="tab:green" if done else "tab:gray")
        ax.annotate(str(c.index), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(100 * probe["source"]["accuracy"], color="tab:red", linewidth=1, label="original")
    ax.set_xlabel("memory (MiB)")
    ax.set_ylabel(f"{probe['task']} accuracy at {probe['context']} tokens (%)")
    ax.legend()
