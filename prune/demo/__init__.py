"""`prune demo`: the whole story end to end on scikit-learn's bundled digits, with a report a person can read.

Six runs of one small transformer classifier, same budget and seed (see :mod:`prune.demo.runs`); each is
deployed the way a user would ship it (converted and ``sparsify``-ed, heads pruned, ...) and measured:
accuracy, total and active parameters, file bytes, CPU latency at several batch sizes (interleaved, one run).
Writes ``report.md``, ``results.json`` and PNG plots into the output directory.

Example:
    >>> import tempfile
    >>> results = run_demo(DemoConfig(out=tempfile.mkdtemp(), quick=True, runs=("dense",), steps=4),
    ...                    progress=False, verbose=False)
    >>> [r["run"] for r in results["runs"]]
    ['dense']
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from prune.demo.deploy import deploy, measure_latency
from prune.demo.report import findings, plot_deployment, plot_training, table, write_report
from prune.demo.runs import RUNS, Budget, Data, load_data, train_run
from sparse_ops.errors import UserValueError
from sparse_ops.timing import environment

__all__ = ["RUNS", "DemoConfig", "run_demo"]


# ``quick``: a smoke run of every stage (train, prune, convert, sparsify, time, report), not a result.
QUICK_STEPS = 20  # per run; the pruning schedules still reach their final sparsity (cubic ends at 70-80%)
QUICK_EVALS = 2  # accuracy points per run's curve (each evaluates the whole test set: ~3 training steps)
QUICK_THREADS = 1  # on a shared 2-core machine two torch threads spin against each other: 3-15x slower
QUICK_REPEATS = 3  # timed samples per candidate and batch


@dataclass(frozen=True)
class DemoConfig:
    """What to run. ``quick`` is the smoke-run budget above (the tests use it); the dense baseline always runs."""

    out: str = "demo-report"
    seed: int = 0
    quick: bool = False
    runs: tuple[str, ...] = tuple(RUNS)
    steps: int | None = None  # default: 500, or QUICK_STEPS with quick
    threads: int | None = None  # torch CPU threads; default: torch's choice, or QUICK_THREADS with quick

    def __post_init__(self) -> None:
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown or not self.runs:
            raise UserValueError(f"unknown run(s) {unknown or list(self.runs)}; choose from {list(RUNS)}")
        if self.steps is not None and self.steps < 1:
            raise UserValueError(f"steps must be >= 1, got {self.steps}")
        if self.threads is not None and self.threads < 1:
            raise UserValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def budget(self) -> Budget:
        steps = self.steps or (QUICK_STEPS if self.quick else 500)
        evals = max(1, steps // QUICK_EVALS) if self.quick else max(5, steps // 20)
        return Budget(steps=steps, eval_every=evals)

    @property
    def batches(self) -> tuple[int, ...]:
        return (1, 16) if self.quick else (1, 32, 256)

    @property
    def repeats(self) -> int:
        """Timed samples per candidate and batch size."""
        return QUICK_REPEATS if self.quick else 15

    @property
    def torch_threads(self) -> int | None:
        """Threads the run sets (None: leave torch's setting)."""
        return self.threads or (QUICK_THREADS if self.quick else None)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: unchanged), restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(config: DemoConfig = DemoConfig(), progress: bool = True, verbose: bool = True) -> dict:
    """Train, deploy and measure every run; write the report; return the results dict (as in results.json)."""
    names = ["dense"] + [r for r in dict.fromkeys(config.runs) if r != "dense"]
    data = load_data(config.seed)
    with _torch_threads(config.torch_threads):  # environment() and the config record the threads used
        trained = [train_run(RUNS[n], data, config.budget, config.seed, progress) for n in names]
        with tempfile.TemporaryDirectory() as work:
            deployed = [deploy(t, work) for t in trained]
            latency = measure_latency(deployed, data.x_test, config.batches, repeats=config.repeats)
            rows = [_row(t, d, latency, data) for t, d in zip(trained, deployed)]
        results = {"environment": environment(), "config": _config_dict(config, trained[0]), "runs": rows}
    _write(config.out, results)
    if verbose:
        print(table(rows))
        print("\n".join(f"- {s}" for s in findings(rows)))
        print(f"\nreport written to {os.path.join(config.out, 'report.md')}")
    return results


def _row(trained, deployed, latency, data: Data) -> dict:
    from prune.demo.runs import accuracy

    base = latency["dense"]
    lat = {str(b): {**cell, "speedup_vs_dense": base[b]["deployed_ms"] / cell["deployed_ms"]}
           for b, cell in latency[deployed.name].items()}
    return {
        "run": deployed.name, "description": trained.spec.description, "deployed_as": deployed.deployed_as,
        "accuracy": accuracy(deployed.model, data.x_test, data.y_test), "accuracy_before_deploy": trained.accuracy,
        "sparsity": trained.pruned_sparsity, "params_total": deployed.params_total,
        "params_active": deployed.params_active, "file_dense_bytes": deployed.file_dense_bytes,
        "file_deployed_bytes": deployed.file_deployed_bytes, "open_heads": deployed.open_heads,
        "train_seconds": trained.train_seconds, "latency": lat, "curve": trained.curve,
    }


def _config_dict(config: DemoConfig, first) -> dict:
    m = first.spec.model
    return {**dataclasses.asdict(config), "steps": config.budget.steps, "batches": list(config.batches),
            "budget": dataclasses.asdict(config.budget), "torch_threads": torch.get_num_threads(),
            "model": f"{m.num_layers}-layer transformer (d_model {m.d_model}, {m.num_heads} heads, FFN {m.d_ffn})"}


def _write(out: str, results: dict) -> None:
    """Build the report in a temporary directory, then move the finished files into ``out``."""
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        plots = [plot_training(tmp, results["runs"]), plot_deployment(tmp, results["runs"])]
        write_report(tmp, results, plots)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
