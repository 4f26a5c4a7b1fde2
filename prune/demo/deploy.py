"""Deploy each trained run the way a user would ship it, and measure it: parameters, file bytes, latency.

- pruning runs: the dense checkpoint is converted with ``convert_checkpoint`` (CSR or 2:4) and loaded into a
  fresh model with ``sparsify(..., fuse=True)`` (activations, FFN pairs, residual + LayerNorm fused where
  proven); the same
  weights executed densely are timed beside it;
- head gating: closed heads are removed with ``prune_closed_heads``;
- dense and MoE: shipped as trained.

Example:
    >>> import tempfile
    >>> from prune.demo.runs import RUNS, Budget, load_data, train_run
    >>> t = train_run(RUNS["dense"], load_data(0), Budget(steps=2, eval_every=2), seed=0, progress=False)
    >>> d = deploy(t, tempfile.mkdtemp())
    >>> d.params_active == d.params_total and d.file_deployed_bytes == d.file_dense_bytes
    True
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from prune.demo.model import ROWS, DigitsTransformer
from prune.demo.runs import Trained
from sparse_ops.busy import Watch
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.layers.head_gating import GatedMultiheadAttention
from sparse_ops.layers.moe import MoE
from sparse_ops.loading import sparsify
from sparse_ops.plan import DENSE, bucket, plan_rows
from sparse_ops.timing import time_interleaved


@dataclass
class Deployed:
    """A run as shipped: the model to run, and the same weights run densely where that differs."""

    name: str
    model: nn.Module
    dense_exec: nn.Module | None  # pruning runs: the finalized dense model with its zeros
    deployed_as: str  # "dense", "csr", "2:4", "heads pruned"
    params_total: int  # parameters of the trained model
    params_active: int  # parameters one token uses in the deployed model
    file_dense_bytes: int  # safetensors file of the trained model's state dict
    file_deployed_bytes: int  # the file that ships (converted, or shrunk by head pruning)
    open_heads: list[list[int]] | None = None  # per layer, for head gating


def count_params(model: nn.Module) -> int:
    """Number of parameters (sparse layers count their stored weights' full shape)."""
    return sum(p.numel() for p in model.parameters())


def save_dense(model: nn.Module, path: str) -> int:
    """Write the state dict as safetensors; returns the file size in bytes."""
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path)


def _moe_inactive(model: nn.Module) -> int:
    counts = [m.param_counts() for m in model.modules() if isinstance(m, MoE)]
    return sum(c.total - c.active for c in counts)


def deploy(trained: Trained, workdir: str) -> Deployed:
    """Ship one trained run (files written under ``workdir``)."""
    spec, model = trained.spec, trained.model.eval()
    dense_path = os.path.join(workdir, f"{spec.name.replace(':', '-')}.safetensors")
    dense_bytes = save_dense(model, dense_path)
    total = count_params(model)
    if spec.sparse_format:
        sparse_path = dense_path.replace(".safetensors", f".{spec.sparse_format.replace(':', '-')}.safetensors")
        convert_checkpoint(dense_path, sparse_path, format=spec.sparse_format)
        shipped = sparsify(DigitsTransformer(spec.model), sparse_path, fuse=True).eval()
        return Deployed(spec.name, shipped, model, spec.sparse_format, total, total - trained.pruned_zeros,
                        dense_bytes, os.path.getsize(sparse_path))
    if spec.model.gated_heads:
        gated = [m for m in model.modules() if isinstance(m, GatedMultiheadAttention)]
        open_heads = [m.open_heads() for m in gated]
        for m in gated:
            m.prune_closed_heads()
        pruned_bytes = save_dense(model, dense_path.replace(".safetensors", ".heads-pruned.safetensors"))
        return Deployed(spec.name, model, None, "heads pruned", total, count_params(model), dense_bytes,
                        pruned_bytes, open_heads)
    return Deployed(spec.name, model, None, "dense", total, total - _moe_inactive(model), dense_bytes, dense_bytes)


def sparse_layers(model: nn.Module, tokens: int) -> tuple[int, int]:
    """(planned layers that run a sparse kernel for calls of ``tokens`` tokens, planned layers): the rest run
    dense because the planner measured dense faster for them on this machine. Read after such a call.

    >>> sparse_layers(nn.Linear(4, 4), tokens=8)  # no planned sparse layer
    (0, 0)
    """
    routes = [r["routes"][bucket(tokens)] for r in plan_rows(model)]
    return sum(e is not None and e["choice"] != DENSE for e in routes), len(routes)


def measure_latency(deployed: list[Deployed], x: Tensor, batches: tuple[int, ...], repeats: int
                    ) -> dict[str, dict[int, dict[str, float]]]:
    """Milliseconds per forward of every deployed model (and dense execution of pruned ones) per batch size.

    All candidates of one batch size are timed interleaved in the same run (``sparse_ops.timing``); the "dense"
    run is timed twice, as two candidates half a cycle apart: with the pruned runs' dense executions, the same
    computation timed several times, whose spread is the noise floor of every ratio (``report.findings``).
    Returns ``{run: {batch: {"deployed_ms", "p10_ms", "p90_ms"}}}``; "dense" adds "again_ms", pruning runs
    "dense_exec_ms" and "sparse_layers" / "planned_layers" (``sparse_layers``); "busy" says what other work the
    machine had while a batch was timed (``sparse_ops.busy``), where it had.
    """
    out: dict[str, dict[int, dict[str, float]]] = {d.name: {} for d in deployed}
    for b in batches:
        xb = x[torch.arange(b) % len(x)]  # (b, 64)
        fns = {d.name: (lambda m=d.model: m(xb)) for d in deployed}
        fns.update({f"{d.name}/dense": (lambda m=d.dense_exec: m(xb)) for d in deployed if d.dense_exec})
        if "dense" in fns:  # halfway round the cycle from "dense": neighbours and position differ (time_interleaved)
            items = list(fns.items())
            half = (len(items) + 1) // 2
            fns = dict(items[:half] + [("dense/again", fns["dense"])] + items[half:])
        with Watch() as watch:
            times = time_interleaved(fns, warmup=2, repeats=repeats, min_sample_s=0.01)
        for d in deployed:
            t = times[d.name]
            row = {"deployed_ms": t.median_s * 1e3, "p10_ms": t.p10_s * 1e3, "p90_ms": t.p90_s * 1e3}
            if watch.load.busy:
                row["busy"] = watch.load.describe()
            if d.name == "dense":
                row["again_ms"] = times["dense/again"].median_s * 1e3
            if d.dense_exec:
                row["dense_exec_ms"] = times[f"{d.name}/dense"].median_s * 1e3
                row["sparse_layers"], row["planned_layers"] = sparse_layers(d.model, b * ROWS)
            out[d.name][b] = row
    return out
