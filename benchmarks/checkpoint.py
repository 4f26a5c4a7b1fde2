"""The engine of ``prune bench checkpoint``: is sparsity worth it for *this* checkpoint, on *this* machine?

For every linear (2-D, float) weight of a checkpoint that ``prune convert`` accepts (dense with zeros, or
converted CSR / 2:4), read one tensor at a time: dense ``F.linear`` is timed against our CSR layer, where
the weight has the 2:4 pattern our 2:4 layer, CSR on torch's kernel ("csr:torch"), and "auto": the layer
``sparsify()`` makes by default, its path planned at this batch on this machine (``sparse_ops.plan``; its
choice is recorded), interleaved in one run at the layer's real shape, dtype and sparsity, for each batch
(tokens). The whole-model figure adds the layers up: sum of dense medians over the sum of the chosen format's medians (only the linear
layers: attention scores, norms and activations are not counted).

Example:
    >>> import os, tempfile, torch
    >>> from benchmarks.timing import Deadline
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
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks.linear import DTYPES, Measured, measure_weight, timed_columns
from benchmarks.timing import Deadline
from sparse_ops.checkpoint import EMBEDDING, iter_tensors
from sparse_ops.formats import is_two_four
from sparse_ops.linear import candidate_formats

SPARSE = ("csr", "2:4")  # formats timed against dense for each layer (plus "csr:torch" where auto may pick it)


@dataclass(frozen=True)
class LayerRow:
    """One candidate for one layer at one batch. speedup = dense median / this median (same run)."""

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


LAYER_COLUMNS = tuple(f.name for f in dataclasses.fields(LayerRow))
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def not_linear(name: str, w: torch.Tensor) -> str:
    """Why a tensor is not timed as a linear weight ("" when it is)."""
    if w.dim() != 2:
        return f"{w.dim()}-D tensor"
    if w.dtype not in _DTYPE_NAMES:
        return f"dtype {w.dtype} (timed: {', '.join(map(str, _DTYPE_NAMES))})"
    if EMBEDDING.search(name):
        return "embedding table (a lookup, not a matmul)"
    return ""


def linear_weights(path: str | os.PathLike, skipped: dict[str, str]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(name, dense (out, in) weight, stored format) per linear weight, one at a time; others -> ``skipped``."""
    for name, t in iter_tensors(path):
        fmt = "dense" if isinstance(t, torch.Tensor) else t.format
        w = t if isinstance(t, torch.Tensor) else t.to_dense()
        reason = not_linear(name, w)
        if reason:
            skipped[name] = reason
            continue
        yield name, w, fmt


def layer_rows(name: str, w: torch.Tensor, stored: str, batch: int, measured: list[Measured]) -> list[LayerRow]:
    shape, nnz = (w.shape[0], w.shape[1]), int(torch.count_nonzero(w))
    dense = next(m.timing for m in measured if m.candidate == "dense")
    auto = next((m.auto_chose for m in measured if m.candidate == "auto"), "dense")
    sparsity = round(1 - nnz / max(w.numel(), 1), 4)
    return [LayerRow(layer=name, out_features=shape[0], in_features=shape[1], dtype=_DTYPE_NAMES[w.dtype],
                     stored_format=stored, sparsity=sparsity, batch=batch, auto_chose=auto,
                     **timed_columns(m, dense, shape, nnz, w.dtype)) for m in measured]


def sweep_checkpoint(path: str | os.PathLike, batches: tuple[int, ...], *, dtype: str | None = None,
                     device: str = "cpu", repeats: int = 5, min_sample_s: float = 0.02,
                     deadline: Deadline, skipped: dict[str, str],
                     clock: Callable[[], float] = time.perf_counter) -> Iterator[list[LayerRow]]:
    """Rows of each (layer, batch) in file order until done or out of time; ``dtype`` None keeps the file's."""
    start, last, done = clock(), 0.0, 0
    for name, w, stored in linear_weights(path, skipped):
        w = w.to(device, DTYPES[dtype] if dtype else w.dtype)
        formats = tuple(f for f in SPARSE if f != "2:4" or is_two_four(w))
        formats += (*(c for c in candidate_formats(w) if c not in SPARSE), "auto")  # torch's kernel; the default
        for batch in batches:
            if not deadline.allows(done, clock() - start, last):
                return
            t0 = clock()
            x = torch.randn(batch, w.shape[1], device=device).to(w.dtype)  # (batch, in)
            measured, _ = measure_weight(w, x, ("dense", *formats), with_anchors=False, repeats=repeats,
                                         min_sample_s=min_sample_s)
            yield layer_rows(name, w, stored, batch, measured)
            done, last = done + 1, clock() - t0


def whole_model(rows: list[LayerRow]) -> list[dict[str, object]]:
    """Per batch: summed medians of dense, each format (dense where a layer lacks it), auto's and the best
    choice per layer, their speedups over dense, and the summed weight bytes of each storage (and as stored)."""
    out = []
    for batch in sorted({r.batch for r in rows}):
        layers: dict[str, dict[str, LayerRow]] = {}
        for r in (r for r in rows if r.batch == batch):
            layers.setdefault(r.layer, {})[r.candidate] = r
        sums = {"dense": 0.0, **dict.fromkeys(SPARSE, 0.0), "auto": 0.0, "best": 0.0}
        nbytes = dict.fromkeys(("dense", *SPARSE, "stored"), 0)
        for by_cand in layers.values():
            dense = by_cand["dense"]
            for f in ("dense", *SPARSE):
                pick = by_cand.get(f, dense)
                sums[f] += pick.median_s
                nbytes[f] += pick.weight_bytes
            nbytes["stored"] += by_cand.get(dense.stored_format, dense).weight_bytes
            sums["auto"] += by_cand.get("auto", dense).median_s
            sums["best"] += min(r.median_s for r in by_cand.values())
        with_fmt = {f: sum(f in by_cand for by_cand in layers.values()) for f in SPARSE}
        out.append({"batch": batch, "layers": len(layers), **{f"layers_{f}": n for f, n in with_fmt.items()},
                    **{f"{k}_s": v for k, v in sums.items()},
                    **{f"speedup_{k}": round(sums["dense"] / v, 4) for k, v in sums.items() if k != "dense"},
                    **{f"{k}_bytes": v for k, v in nbytes.items()}})
    return out
