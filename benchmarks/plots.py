"""Speedup-over-dense plots (matplotlib, Agg): one panel per (group, batch), break-even and memory-bound limit.

x: sparsity; y: speedup over dense in the same run (log scale); one series per candidate. The grey line at
1.0 is break-even: below it sparsity does not pay. Black lines/marks are the memory-bound limits (dense
weight bytes / stored bytes) of the CSR and 2:4 formats: the best a kernel reading that format once can do
at batch 1 (at larger batches a product is less memory-bound, and the limit is only a reference).

Example:
    >>> import tempfile, pathlib
    >>> rows = [dict(group="64x64 fp32", batch=1, sparsity=s, candidate=c, speedup=v, limit=lim)
    ...         for s, c, v, lim in [(0.5, "csr", 0.6, 1.3), (0.9, "csr", 2.0, 3.3), (0.5, "dense", 1, 1)]]
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.png"
    >>> plot_speedup(rows, p, title="demo")
    >>> p.read_bytes()[:4] == b"\\x89PNG"
    True
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# format -> line style of its memory-bound limit
LIMIT_STYLE = {"csr": "--", "2:4": ":"}
# candidate -> colour, the same in every panel and plot
COLORS = {"csr": "C0", "2:4": "C1", "auto": "C2", "torch_csr_i64": "C3", "torch_csr_i32": "C4", "scipy_csr": "C5",
          "torch_2:4": "C6", "layers": "C0", "fused": "C2"}


def _panels(rows: Sequence[Mapping[str, object]]) -> tuple[list[object], list[int]]:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    batches = sorted({int(r["batch"]) for r in rows})
    return groups, batches


def _series(rows: Sequence[Mapping[str, object]], candidate: str, key: str) -> tuple[list[float], list[float]]:
    pts = sorted((float(r["sparsity"]), float(r[key])) for r in rows if r["candidate"] == candidate)
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw_panel(ax, rows: Sequence[Mapping[str, object]], connect: bool) -> None:
    style = "-o" if connect else "o"
    for cand in dict.fromkeys(r["candidate"] for r in rows):
        if cand != "dense":
            ax.plot(*_series(rows, cand, "speedup"), style, ms=3, lw=1.2, label=cand, color=COLORS.get(cand, "C7"))
    for fmt, ls in LIMIT_STYLE.items():
        xs, ys = _series(rows, fmt, "limit")
        if xs:
            ax.plot(xs, ys, color="k", ls=ls if connect else "none", marker=None if connect else "_", ms=8,
                    lw=1, label=f"memory-bound limit ({fmt})")
    ax.axhline(1.0, color="grey", lw=1.5, label="break-even (dense)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")


def plot_speedup(rows: Sequence[Mapping[str, object]], path: Path, *, title: str, connect: bool = True) -> None:
    """Rows need group, batch, sparsity, candidate, speedup, limit. ``connect=False`` draws marks only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, batches = _panels(rows)
    fig, axes = plt.subplots(len(groups), len(batches), figsize=(3.6 * len(batches) + 1.5, 3.0 * len(groups) + 0.8),
                             squeeze=False, sharey="row")
    for i, group in enumerate(groups):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            _draw_panel(ax, [r for r in rows if r["group"] == group and int(r["batch"]) == batch], connect)
            ax.set_title(f"{group}, batch {batch}", fontsize=8)
            if i == len(groups) - 1:
                ax.set_xlabel("sparsity")
        axes[i][0].set_ylabel("speedup over dense")
    legend = {}  # label -> handle, over all panels (a candidate may be missing from some)
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    ncol = min(len(legend), 5)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=7)
    fig.suptitle(title, fontsize=9)
    legend_in = 0.2 * -(-len(legend) // ncol) + 0.15  # inches under the panels for the legend rows
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
