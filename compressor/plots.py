"""Figures of search results (matplotlib, imported only here and only when a figure is drawn)."""

from __future__ import annotations

from pathlib import Path

from compressor.pipelines.records import Candidate, SearchRecord


def plot_pareto(record: SearchRecord, path: Path) -> None:
    """Quality against memory (and against speedup when estimated), the Pareto front joined, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_index = {c.index: c for c in record.candidates}
    rank_key = "val_kl" if record.rank_by == "kl" else "val_loss"

    def x_of(c: Candidate, panel: str) -> float:
        return (c.memory_bytes or 0) / 2**20 if panel == "memory" else c.speedup

    def y_of(c: Candidate) -> float:
        return c.distilled.metric(record.rank_by) if c.distilled is not None else c.score

    panels = [("memory", "memory (MiB)")] + ([("speedup", "estimated speedup")] if "speedup" in record.pareto else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (panel, label) in zip(axes[0], panels, strict=True):
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
        ax.set_ylabel(f"{rank_key} after short distillation (o) / zero-shot KL (x)")
        ax.legend()
    fig.suptitle(f"{record.strategy} search: {record.budget.describe()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
