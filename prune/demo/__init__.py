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

import dataclasses
import os
import tempfile
from dataclasses import dataclass

import torch

from benchmarks.timing import environment
from prune.demo.deploy import deploy, measure_latency
from prune.demo.report import findings, plot_deployment, plot_training, table, write_report
from prune.demo.runs import RUNS, Budget, Data, load_data, train_run

__all__ = ["DemoConfig", "run_demo", "RUNS"]


@dataclass(frozen=True)
class DemoConfig:
    """What to run. ``quick`` is a small budget (used by the tests); the dense baseline always runs."""

    out: str = "demo-report"
    seed: int = 0
    quick: bool = False
    runs: tuple[str, ...] = tuple(RUNS)
    steps: int | None = None  # default: 500, or 60 with quick

    def __post_init__(self) -> None:
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown or not self.runs:
            raise ValueError(f"unknown run(s) {unknown or list(self.runs)}; choose from {list(RUNS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def budget(self) -> Budget:
        steps = self.steps or (60 if self.quick else 500)
        return Budget(steps=steps, eval_every=max(5, steps // 20))

    @property
    def batches(self) -> tuple[int, ...]:
        return (1, 16) if self.quick else (1, 32, 256)


def run_demo(config: DemoConfig = DemoConfig(), progress: bool = True, verbose: bool = True) -> dict:
    """Train, deploy and measure every run; write the report; return the results dict (as in results.json)."""
    names = ["dense"] + [r for r in dict.fromkeys(config.runs) if r != "dense"]
    data = load_data(config.seed)
    trained = [train_run(RUNS[n], data, config.budget, config.seed, progress) for n in names]
    with tempfile.TemporaryDirectory() as work:
        deployed = [deploy(t, work) for t in trained]
        latency = measure_latency(deployed, data.x_test, config.batches, repeats=3 if config.quick else 9)
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
