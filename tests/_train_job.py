"""A small, deterministic pruning run used by the resume tests (run as a script in a fresh process).

    python tests/_train_job.py --steps 40 --ckpt-dir DIR [--save-every N] [--resume] [--step-delay S] --out FINAL.pt

Checkpoints hold model, optimizer and pruner state; they are written atomically (temp file + rename).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import nn

from prune import CubicRamp, Pruner


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.9, begin_step=2, end_step=30, every=4), criterion="movement")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return model, pruner, opt


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)  # data depends only on the step: resumable
    x = torch.randn(32, 16, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()


def save_atomic(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (to be killed mid-run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, pruner, opt = build()
    latest = os.path.join(args.ckpt_dir, "latest.pt")
    if args.resume:
        state = torch.load(latest, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        pruner.load_state_dict(state["pruner"])
    for step in range(pruner.step_count, args.steps):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
        time.sleep(args.step_delay)
        if args.save_every and pruner.step_count % args.save_every == 0:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "pruner": pruner.state_dict()}, latest)
    state = {"pruner": pruner.state_dict(), "optimizer": opt.state_dict()}
    state["model"] = pruner.finalize().state_dict()
    save_atomic(state, args.out)


if __name__ == "__main__":
    main()
