"""The engine of ``prune bench checkpoint``: is sparsity worth it for *this* checkpoint, on *this* machine?

For every linear (2-D, float) weight of a checkpoint that ``prune convert`` accepts (dense with zeros, or
converted CSR / 2:4), read one tensor at a time: dense ``F.linear`` is timed against our CSR layer, where
the weight has the 2:4 pattern our 2:4 layer, CSR on torch's kernel ("csr:torch"), and "auto": the layer
``sparsify()`` makes by default, its path planned at this batch on this machine (``sparse_ops.plan``; its
choice is recorded), interleaved in one run at the layer's real shape, dtype and sparsity, for each batch
(tokens). The whole-model figure adds the layers up: sum of dense medians over the sum of the chosen format's medians (only the linear
layers: attention scores, norms and activations are not counted). A deadline stops the sweep between layers,
never inside one, so every token count covers the same layers; ``count_linear`` (headers only) gives the
total to report against (``coverage``), and ``speedup_bars`` is the per-layer answer the plot draws.

Example:
    >>> import os, tempfile, torch
    >>> from sparse_ops.timing import Deadline
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> w = torch.zeros(32, 64)
    >>> w[:, :8] = 1.0  # 87.5% sparse, not 2:4 (its first groups of 4 are full)
    >>> torch.save({"fc.weight": w, "fc.bias": torch.zeros(32), "embed.weight": torch.randn(10, 64)}, path)
    >>> skipped = {}
    >>> rows = [r for layer in sweep_checkpoint(path, (1,), repeats=1, min_sample_s=1e-4, deadline=Deadline(None),
    ...                                         skipped=skipped) for r in layer]
    >>> [(r.layer, r.candidate) for r in rows][:2], sorted(skipped)
    ([('fc.weight', 'dense'), ('fc.weight', 'csr')], ['embed.weight', 'fc.bias'])
    >>> s = whole_model(rows)[0]
    >>> s["batch"], s["layers"], s["dense_bytes"] == 32 * 64 * 4
    (1, 1, True)
    >>> count_linear(path, {}), coverage(1, 1, None)
    (1, 'all 1 linear layer measured')
    >>> print(coverage(8, 37, 60.0))
    8 of 37 linear layers measured (stopped by --max-seconds 60): the whole-model figure covers these 8 only
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from sparse_ops.bench.matmul import DTYPES, Measured, measure_weight, timed_columns
from sparse_ops.bench.plots import SpeedupBar
from sparse_ops.checkpoint.layout import EMBEDDING
from sparse_ops.checkpoint.schema import Entry, iter_tensors, read_entries
from sparse_ops.linear import candidate_formats
from sparse_ops.registry import FORMATS, LOSSLESS, QUANTIZED
from sparse_ops.tensorio import RawSource, open_raw
from sparse_ops.timing import Deadline

SPARSE = LOSSLESS  # formats timed against dense for each layer (plus "csr:torch" where auto may pick it, and an
# int8 layer's own format: the int8 formats change the numbers, so only a checkpoint holding one times one)


@dataclass(frozen=True)
class LayerRow:
    """One candidate for one layer at one token count (``batch``: tokens, the rows of x, per call; the column
    keeps its name so new results read like the committed ones). speedup = dense median / this median."""

    layer: str
    out_features: int
    in_features: int
    dtype: str
    stored_format: str  # how the checkpoint stores this weight
    sparsity: float
    batch: int
    candidate: str
    median_s: float
    p10_s: float
    p90_s: float
    speedup: float
    weight_bytes: int
    limit: float
    fraction_of_limit: float
    max_rel_err: float
    auto_chose: str  # the default plan's path for this layer at this batch (its own measurement)
    measured_as: str = ""  # the layer whose measurement these columns are: itself, or its twin (same shape,
    #                        dtype, storage and sparsity to 1%) measured earlier in the sweep


LAYER_COLUMNS = tuple(f.name for f in dataclasses.fields(LayerRow))
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def not_linear(name: str, w: torch.Tensor) -> str:
    """Why a tensor is not timed as a linear weight ("" when it is)."""
    return _why_not_linear(name, tuple(w.shape), w.dtype)


def _why_not_linear(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    if len(shape) != 2:
        return f"{len(shape)}-D tensor"
    if dtype not in _DTYPE_NAMES:
        return f"dtype {dtype} (timed: {', '.join(map(str, _DTYPE_NAMES))})"
    if EMBEDDING.search(name):
        return "embedding table (a lookup, not a matmul)"
    return ""


def _declared(src: RawSource, entry: Entry) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of a logical tensor from the file's headers (a pickle's tensors are mmapped)."""
    if entry.shape is not None:
        return entry.shape, entry.dtype
    key = entry.parts["tensor"]
    if src.state is not None:
        return tuple(src.state[key].shape), src.state[key].dtype
    stored = src.files[src.key_files[key]].tensors[key]
    return stored.shape, stored.dtype


def count_linear(path: str | os.PathLike, skipped: dict[str, str]) -> int:
    """How many linear weights ``linear_weights`` will yield, from the headers alone (no tensor data read);
    every other tensor goes to ``skipped`` with its reason, measured or not."""
    n = 0
    with open_raw(path) as src:
        for entry in read_entries(src):
            reason = _why_not_linear(entry.name, *_declared(src, entry))
            if reason:
                skipped[entry.name] = reason
            n += not reason
    return n


def coverage(measured: int, total: int, max_seconds: float | None) -> str:
    """The sentence every summary of a run carries: how many of the linear layers its figures cover."""
    if measured >= total:
        return f"all {total} linear layer{'s' if total != 1 else ''} measured"
    why = f"stopped by --max-seconds {max_seconds:g}" if max_seconds is not None else "stopped early"
    these = f"these {measured}" if measured != 1 else "this one"
    return f"{measured} of {total} linear layers measured ({why}): the whole-model figure covers {these} only"


def linear_weights(path: str | os.PathLike, skipped: dict[str, str]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(name, dense (out, in) weight, stored format) per linear weight, one at a time; others -> ``skipped``."""
    for name, t in iter_tensors(path):
        fmt = "dense" if isinstance(t, torch.Tensor) else t.format
        # a Conv1D weight stored transposed: its inner (out, in) weight is the layer the kernels run
        w = t if isinstance(t, torch.Tensor) else (t.inner if getattr(t, "transposed", False) else t).to_dense()
        reason = not_linear(name, w)
        if reason:
            skipped[name] = reason
            continue
        yield name, w, fmt


def layer_rows(name: str, w: torch.Tensor, stored: str, batch: int, measured: list[Measured],
               measured_as: str | None = None) -> list[LayerRow]:
    shape, nnz = (w.shape[0], w.shape[1]), int(torch.count_nonzero(w))
    dense = next(m.timing for m in measured if m.candidate == "dense")
    auto = next((m.auto_chose for m in measured if m.candidate == "auto"), "dense")
    sparsity = round(1 - nnz / max(w.numel(), 1), 4)
    return [LayerRow(layer=name, out_features=shape[0], in_features=shape[1], dtype=_DTYPE_NAMES[w.dtype],
                     stored_format=stored, sparsity=sparsity, batch=batch, auto_chose=auto,
                     measured_as=measured_as or name, **timed_columns(m, dense, shape, nnz, w.dtype))
            for m in measured]


def sweep_checkpoint(path: str | os.PathLike, batches: tuple[int, ...], *, dtype: str | None = None,
                     device: str = "cpu", repeats: int = 5, min_sample_s: float = 0.02,
                     deadline: Deadline, skipped: dict[str, str],
                     clock: Callable[[], float] = time.perf_counter) -> Iterator[list[LayerRow]]:
    """Rows of each (layer, batch) in file order until done or out of time; ``dtype`` None keeps the file's.

    The deadline is asked before each layer (``done`` = layers measured, cost = the last layer's seconds over
    all its batches): a layer is measured at every batch or not at all, so each batch's whole-model sum
    covers the same layers. A layer with the same shape, dtype, storage and sparsity (to 1%) as one measured
    before (the same projection in every block of a uniformly pruned model) reuses that one's measurement,
    named in ``measured_as``: a 30-block LLM is measured in about a thirtieth of the time.
    """
    start, last, done = clock(), 0.0, 0
    measured_before: dict[tuple, list[tuple[float, str, dict[int, list[Measured]]]]] = {}
    for name, w, stored in linear_weights(path, skipped):
        if not deadline.allows(done, clock() - start, last):
            return
        t0 = clock()
        w = w.to(device, DTYPES[dtype] if dtype else w.dtype)
        sparsity = 1 - int(torch.count_nonzero(w)) / max(w.numel(), 1)
        alike = measured_before.setdefault((tuple(w.shape), w.dtype, stored), [])
        twin = next((t for t in alike if abs(t[0] - sparsity) <= 0.01), None)
        if twin is not None:
            for batch in batches:
                yield layer_rows(name, w, stored, batch, twin[2][batch], measured_as=twin[1])
            done += 1
            continue
        by_batch: dict[int, list[Measured]] = {}
        alike.append((sparsity, name, by_batch))
        formats = tuple(f for f in SPARSE if FORMATS[f].eligible(w)) + ((stored,) if stored in QUANTIZED else ())
        formats += (*(c for c in candidate_formats(w) if c not in SPARSE), "auto")  # torch's kernel; the default
        for batch in batches:
            x = torch.randn(batch, w.shape[1], device=device).to(w.dtype)  # (batch, in)
            measured, _ = measure_weight(w, x, ("dense", *formats), with_anchors=False, repeats=repeats,
                                         min_sample_s=min_sample_s)
            by_batch[batch] = measured
            yield layer_rows(name, w, stored, batch, measured)
        done, last = done + 1, clock() - t0


def _by_layer(rows: Iterable[LayerRow], batch: int) -> dict[str, dict[str, LayerRow]]:
    """{layer: {candidate: row}} at one batch, in file order."""
    layers: dict[str, dict[str, LayerRow]] = {}
    for r in rows:
        if r.batch == batch:
            layers.setdefault(r.layer, {})[r.candidate] = r
    return layers


def summed(layers: Iterable[dict[str, LayerRow]]) -> dict[str, float]:
    """Summed medians (seconds) of dense, each sparse format (dense where a layer lacks it), auto's path and
    the best candidate per layer, over some layers' {candidate: row} at one batch."""
    sums = {"dense": 0.0, **dict.fromkeys(SPARSE, 0.0), "auto": 0.0, "best": 0.0}
    for by_cand in layers:
        dense = by_cand["dense"]
        for f in ("dense", *SPARSE, "auto"):
            sums[f] += by_cand.get(f, dense).median_s
        sums["best"] += min(r.median_s for r in by_cand.values())
    return sums


def whole_model(rows: list[LayerRow], layers_total: int | None = None) -> list[dict[str, object]]:
    """Per batch: summed medians of dense, each format (dense where a layer lacks it), auto's and the best
    choice per layer, their speedups over dense, and the summed weight bytes of each storage (and as stored).
    ``layers``: how many layers the sums cover; ``layers_total``: how many the checkpoint has (default: as many)."""
    out = []
    for batch in sorted({r.batch for r in rows}):
        layers = _by_layer(rows, batch)
        sums = summed(layers.values())
        nbytes = dict.fromkeys(("dense", *SPARSE, "stored"), 0)
        for by_cand in layers.values():
            dense = by_cand["dense"]
            for f in ("dense", *SPARSE):
                nbytes[f] += by_cand.get(f, dense).weight_bytes
            nbytes["stored"] += by_cand.get(dense.stored_format, dense).weight_bytes
        with_fmt = {f: sum(f in by_cand for by_cand in layers.values()) for f in SPARSE}
        out.append({"batch": batch, "layers": len(layers), "layers_total": layers_total or len(layers),
                    **{f"layers_{f}": n for f, n in with_fmt.items()},
                    **{f"{k}_s": v for k, v in sums.items()},
                    **{f"speedup_{k}": round(sums["dense"] / v, 4) for k, v in sums.items() if k != "dense"},
                    **{f"{k}_bytes": v for k, v in nbytes.items()}})
    return out


# --- the plot's answer: per layer (or group of alike layers) and whole model, faster than dense or not ---

MAX_BARS = 40  # layer bars per panel; past this, alike layers share a bar (a 100-layer model stays readable)
MARKS = ("csr", "2:4")  # marks on each bar; the bar itself is "auto", what sparsify() runs by default


def _group_keys(r: LayerRow) -> tuple[tuple, tuple, tuple]:
    """Ever coarser keys: the layer; its shape, dtype, storage and sparsity (to 1%); its shape and dtype."""
    shape = (r.out_features, r.in_features, r.dtype)
    return (r.layer,), (*shape, r.stored_format, round(r.sparsity, 2)), shape


def _bar(label: str, layers: list[dict[str, LayerRow]]) -> SpeedupBar:
    sums = summed(layers)
    marks = tuple((f, sums["dense"] / sums[f]) for f in MARKS if any(f in c for c in layers))
    per_layer = [c["dense"].median_s / c.get("auto", c["dense"]).median_s for c in layers]
    spread = (min(per_layer), max(per_layer)) if len(layers) > 1 else None
    return SpeedupBar(label, sums["dense"] / sums["auto"], marks, spread, layers=len(layers))


def _label(level: int, group: list[dict[str, LayerRow]], dtypes: int) -> str:
    d = group[0]["dense"]
    shape = f"{d.out_features}x{d.in_features}" + (f" {d.dtype}" if dtypes > 1 else "")
    if level == 0 or len(group) == 1:
        name = d.layer if len(d.layer) <= 40 else "..." + d.layer[-37:]
        return f"{name} ({shape}, {d.sparsity:.0%})"
    lo, hi = min(c["dense"].sparsity for c in group), max(c["dense"].sparsity for c in group)
    sparsity = f"{lo:.0%}" if round(lo, 2) == round(hi, 2) else f"{lo:.0%}-{hi:.0%}"
    return f"{shape}, {sparsity} ({len(group)} layers)"


def speedup_bars(rows: list[LayerRow], batch: int, max_bars: int = MAX_BARS) -> list[SpeedupBar]:
    """The layer bars of one batch, in file order: one per layer while they fit in ``max_bars``, else one per
    group of alike layers (same shape and sparsity, then same shape), and the groups past ``max_bars - 1``
    (those holding the fewest weights) lumped into one "other" bar. Each bar's speedup is its layers' summed
    dense time over their summed time (as the whole model's is); ``spread`` is the range over those layers."""
    layers = list(_by_layer(rows, batch).values())
    dtypes = len({c["dense"].dtype for c in layers})
    for level in range(3):
        groups: dict[tuple, list[dict[str, LayerRow]]] = {}
        for c in layers:
            groups.setdefault(_group_keys(c["dense"])[level], []).append(c)
        if len(groups) <= max_bars or level == 2:
            break
    kept = list(groups.values())
    if len(kept) > max_bars:
        by_size = sorted(kept, key=lambda g: -sum(c["dense"].in_features * c["dense"].out_features
                                                  for c in g))
        top = {id(g) for g in by_size[:max_bars - 1]}  # by weights, not times: the same bars at every batch
        kept, other = [g for g in kept if id(g) in top], [c for g in by_size[max_bars - 1:] for c in g]
        return [*(_bar(_label(level, g, dtypes), g) for g in kept),
                _bar(f"other shapes ({len(other)} layers)", other)]
    return [_bar(_label(level, g, dtypes), g) for g in kept]


def whole_model_bar(summary: dict[str, object]) -> SpeedupBar:
    """The whole-model bar of one batch's ``whole_model`` entry, saying how many of the layers it covers."""
    n, total = summary["layers"], summary["layers_total"]
    label = f"whole model ({n} linear layers)" if n >= total else \
        f"whole model: {n} of {total} layers measured"
    marks = tuple((f, float(summary[f"speedup_{f}"])) for f in MARKS if summary[f"layers_{f}"])
    return SpeedupBar(label, float(summary["speedup_auto"]), marks, None, layers=n, whole=True)
