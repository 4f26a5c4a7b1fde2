"""Speedup-over-dense plots (matplotlib, Agg).

``plot_speedup`` (sweeps): one panel per (group, tokens per call); x: sparsity; y: speedup over dense in the
same run (log scale); one series per candidate. The grey line at 1.0 is break-even: below it sparsity does
not pay. Black lines/marks are the memory-bound limits (dense weight bytes / stored bytes) of the CSR and 2:4
formats: the best a kernel reading that format once can do at 1 token (at more tokens a product is less
memory-bound, and the limit is only a reference).

``plot_bars`` (a checkpoint): "faster or not, per layer and for the whole model": one panel per token count,
one horizontal bar per layer (or group of alike layers) from break-even (1.0) to its speedup, log x, green
where faster and red where slower, the whole-model bar hatched on top; marks for the other candidates.

Example:
    >>> import tempfile, pathlib
    >>> rows = [dict(group="64x64 fp32", batch=1, sparsity=s, candidate=c, speedup=v, limit=lim)
    ...         for s, c, v, lim in [(0.5, "csr", 0.6, 1.3), (0.9, "csr", 2.0, 3.3), (0.5, "dense", 1, 1)]]
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.png"
    >>> plot_speedup(rows, p, title="demo")
    >>> p.read_bytes()[:4] == b"\\x89PNG"
    True
    >>> bars = [SpeedupBar("whole model (2 linear layers)", 1.4, (("csr", 1.3),), whole=True),
    ...         SpeedupBar("fc1 (64x64, 90%)", 2.0), SpeedupBar("fc2 (64x64, 50%)", 0.7, (("2:4", 1.1),))]
    >>> plot_bars({"1 token per call": bars}, p, title="demo")
    >>> p.read_bytes()[:4] == b"\\x89PNG"
    True
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# format -> line style of its memory-bound limit
LIMIT_STYLE = {"csr": "--", "2:4": ":"}
# candidate -> colour, the same in every panel and plot
COLORS = {"csr": "C0", "2:4": "C1", "auto": "C2", "torch_csr_i64": "C3", "torch_csr_i32": "C4", "scipy_csr": "C5",
          "torch_2:4": "C6", "layers": "C0", "fused": "C2"}
MARKERS = {"csr": "o", "2:4": "D"}  # plot_bars: the candidates drawn as marks on a bar
FASTER, SLOWER = "#2ca02c", "#d62728"  # plot_bars: a bar's colour says which side of break-even it is


@dataclass(frozen=True)
class SpeedupBar:
    """One horizontal bar of ``plot_bars``: a layer, a group of alike layers, or the whole model."""

    label: str
    speedup: float  # over dense in the same run (> 1: faster); the bar runs from break-even (1.0) to it
    marks: tuple[tuple[str, float], ...] = ()  # other candidates at this bar: (name, speedup)
    spread: tuple[float, float] | None = None  # (min, max) over the layers a grouped bar sums
    layers: int = 1  # layers the bar covers
    whole: bool = False  # the whole-model bar: drawn first, hatched


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


def _draw_bars(ax, bars: Sequence[SpeedupBar], ys: Sequence[float]) -> None:
    values = [1.0]
    for y, b in zip(ys, bars):
        ax.barh(y, b.speedup - 1.0, left=1.0, height=0.72, color=FASTER if b.speedup >= 1 else SLOWER,
                alpha=0.95 if b.whole else 0.6, edgecolor="k" if b.whole else "none",
                hatch="//" if b.whole else None)
        if b.spread:
            ax.plot(b.spread, [y, y], color="k", lw=0.8, marker="|", ms=5)
        for name, v in b.marks:
            ax.plot(v, y, MARKERS.get(name, "s"), color=COLORS.get(name, "C7"), ms=3.5, mec="k", mew=0.4)
        row = [b.speedup, *(v for _, v in b.marks), *(b.spread or ())]
        right = b.speedup >= 1  # the value goes past everything drawn on its row, on the bar's side
        ax.annotate(f"{b.speedup:.2f}x", (max(row) if right else min(row), y), xytext=(4 if right else -4, 0),
                    textcoords="offset points", ha="left" if right else "right", va="center", fontsize=6)
        values += row
    ax.axvline(1.0, color="grey", lw=1.5)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 1.6, max(values) * 1.6)  # room for the value labels on either side

    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3, axis="x", which="both")


def _bar_legend(bars: Sequence[SpeedupBar], bar_name: str) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=FASTER, alpha=0.6, label=f"{bar_name}: faster than dense"),
               Patch(color=SLOWER, alpha=0.6, label=f"{bar_name}: slower than dense"),
               Line2D([], [], color="grey", lw=1.5, label="break-even (dense)")]
    for name in dict.fromkeys(n for b in bars for n, _ in b.marks):
        handles.append(Line2D([], [], ls="none", marker=MARKERS.get(name, "s"), color=COLORS.get(name, "C7"),
                              mec="k", mew=0.4, label=name))
    if any(b.spread for b in bars):
        handles.append(Line2D([], [], color="k", lw=0.8, marker="|", label="range over a bar's layers"))
    return handles


def plot_bars(panels: Mapping[str, Sequence[SpeedupBar]], path: Path, *, title: str,
              bar_name: str = "auto (what sparsify() runs)") -> None:
    """One panel per key of ``panels`` (e.g. "64 tokens per call"), the same bars in each, whole first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = list(next(iter(panels.values())))
    # (n_bars,) positions top-down; a gap separates the whole-model bar(s) from the layers
    gap = 0.6 if any(b.whole for b in first) else 0.0
    ys = [i + (0.0 if b.whole else gap) for i, b in enumerate(first)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels) + 3.4, 0.24 * len(first) + 2.3),
                             squeeze=False, sharey=True)
    for ax, (name, bars) in zip(axes[0], panels.items()):
        _draw_bars(ax, bars, ys)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("speedup over dense (log)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(ys, [b.label for b in first], fontsize=7)
    axes[0][0].set_ylim(max(ys) + 0.7, min(ys) - 0.7)  # top-down, file order
    handles = _bar_legend([b for bars in panels.values() for b in bars], bar_name)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7)
    fig.suptitle("\n".join(w for line in title.splitlines() for w in textwrap.wrap(line, 150)), fontsize=8)
    legend_in = 0.2 * -(-len(handles) // 4) + 0.1
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=90, bbox_inches="tight")  # long layer names widen the figure instead of being cut
    plt.close(fig)
