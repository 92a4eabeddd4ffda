"""Plots of pruning results (matplotlib, drawn off-screen)."""
from __future__ import annotations

__all__ = ["write_plot"]


def write_plot(path: str, result, points: list | None = None):
    """Left: per-layer fraction of SIMD groups pruned. Right: accuracy vs latency points
    (``points``: ``[(label, ms, accuracy)]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result.sparsities)
    a.bar(range(len(names)), [result.sparsities[n] for n in names], color="tab:blue")
    a.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    a.set_ylabel("SIMD groups pruned")
    a.set_ylim(0, 1)
    a.set_title("per-layer sparsity")
    for label, ms, acc in points or []:
        b.scatter(ms, acc, label=label)
    b.axvline(result.budget_ms, color="grey", ls="--", label="budget")
    b.set_xlabel("latency (ms)")
    b.set_ylabel("test accuracy")
    b.set_title("accuracy vs latency")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
