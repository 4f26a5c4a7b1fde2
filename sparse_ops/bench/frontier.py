"""The quality-versus-speed frontier: the variants of a model that no other variant beats on both.

A user choosing between dense fp32, int8, a sparsity, 2:4 or pruned heads asks one question: at the quality I
accept, which is fastest? :func:`pareto` answers it for a set of measured :class:`Variant` s (a variant is on
the front when no other is at least as fast and at least as good, and better in one), :func:`fastest_at`
picks the fastest variant at or above a quality bar, and :func:`plot_frontier` draws one panel per model:
every variant as a point (colour by family), the front as a step line.

Example:
    >>> vs = [Variant("dense", 10.0, 1.0, "dense"), Variant("int8", 4.0, 0.99, "int8"),
    ...       Variant("90%", 2.0, 0.6, "sparse"), Variant("70%", 5.0, 0.9, "sparse")]
    >>> [v.name for v in pareto(vs)]
    ['90%', 'int8', 'dense']
    >>> fastest_at(vs, 0.95).name
    'int8'
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("dense", "int8", "sparse", "sparse+int8", "2:4", "heads", "peer")


@dataclass(frozen=True)
class Variant:
    """One way to run a model: ``cost`` (seconds per call, or per token; lower is better), ``quality`` (higher
    is better unless the panel says otherwise) and ``family`` (one of :data:`FAMILIES`, for the colour)."""

    name: str
    cost: float
    quality: float
    family: str = "dense"


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def dominates(a: Variant, b: Variant, higher_quality: bool = True) -> bool:
    """True when ``a`` is at least as fast and as good as ``b``, and strictly better in one."""
    no_worse = a.cost <= b.cost and not _better(b.quality, a.quality, higher_quality)
    return no_worse and (a.cost < b.cost or _better(a.quality, b.quality, higher_quality))


def pareto(variants: Sequence[Variant], higher_quality: bool = True) -> list[Variant]:
    """The variants no other dominates, fastest first (see the module docstring)."""
    front = [v for v in variants if not any(dominates(o, v, higher_quality) for o in variants if o is not v)]
    return sorted(front, key=lambda v: v.cost)


def fastest_at(variants: Sequence[Variant], bar: float, higher_quality: bool = True) -> Variant | None:
    """The fastest variant whose quality reaches ``bar`` (None when none does)."""
    ok = [v for v in variants if v.quality == bar or _better(v.quality, bar, higher_quality)]
    return min(ok, key=lambda v: v.cost, default=None)


@dataclass(frozen=True)
class Panel:
    """One model's variants and how to draw them: axis labels, the quality's direction, horizontal bars
    ({label: quality}) and whether the y axis is logarithmic."""

    variants: tuple[Variant, ...]
    xlabel: str
    ylabel: str
    higher_quality: bool = True
    bars: Mapping[str, float] | None = None
    log_y: bool = False


def plot_frontier(panels: Mapping[str, Panel], path: str | Path, title: str) -> None:
    """One panel per model: each variant a labelled point coloured by family, the Pareto front a step line
    (PNG at ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), squeeze=False)
    colours = dict(zip(FAMILIES, plt.get_cmap("tab10").colors))
    for ax, (name, panel) in zip(axes[0], panels.items()):
        seen = set()
        for v in panel.variants:
            ax.scatter(v.cost, v.quality, color=colours.get(v.family, "k"), zorder=3,
                       label=v.family if v.family not in seen else None)
            seen.add(v.family)
            ax.annotate(v.name, (v.cost, v.quality), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
        front = pareto(panel.variants, panel.higher_quality)
        ax.step([v.cost for v in front], [v.quality for v in front], where="post", color="k", lw=1, alpha=0.6,
                label="Pareto front", zorder=2)
        for label, y in (panel.bars or {}).items():
            ax.axhline(y, color="grey", ls=":", lw=0.8)
            ax.annotate(label, (ax.get_xlim()[1], y), fontsize=6.5, ha="right", va="bottom", color="grey")
        ax.set_xscale("log")
        if panel.log_y:
            ax.set_yscale("log")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right" if panel.higher_quality else "upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
