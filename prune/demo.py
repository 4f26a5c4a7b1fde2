"""`prune demo`: prune a small MLP on scikit-learn's bundled digits while it trains, and print its report.

Example:
    >>> acc_dense, acc_pruned, report = run_demo(steps=30, verbose=False)
    >>> round(report.sparsity, 2)
    0.9
"""
from __future__ import annotations

import torch
from torch import nn

from prune.pruner import Pruner
from prune.report import SparsityReport
from prune.schedules import Cubic


def _digits(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def _train(model: nn.Module, data: tuple[torch.Tensor, ...], steps: int, seed: int, pruner_args: dict | None):
    x_tr, y_tr, x_te, y_te = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    pruner = Pruner(model, **pruner_args) if pruner_args else None
    for _ in range(steps):
        idx = torch.randint(len(x_tr), (64,), generator=gen)
        nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
        if pruner:
            pruner.step()
        opt.zero_grad()
    report = pruner.report() if pruner else None
    if pruner:
        pruner.finalize()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return acc, report


def run_demo(steps: int = 300, sparsity: float = 0.9, criterion: str = "magnitude", seed: int = 0,
             verbose: bool = True) -> tuple[float, float, SparsityReport]:
    """Train a dense and a pruned MLP with the same budget; return both test accuracies and the pruned report."""
    data = _digits(seed)

    def mlp() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    schedule = Cubic(0.0, sparsity, begin_step=max(1, steps // 10), end_step=max(2, steps * 7 // 10),
                     every=max(1, steps // 30))
    acc_dense, _ = _train(mlp(), data, steps, seed, None)
    acc_pruned, report = _train(mlp(), data, steps, seed, {"sparsity": schedule, "criterion": criterion})
    if verbose:
        print(report)
        print(f"\ntest accuracy: dense {acc_dense:.4f}, {criterion} pruned to {report.sparsity:.0%} "
              f"{acc_pruned:.4f} ({steps} steps, seed {seed})")
    return acc_dense, acc_pruned, report
