"""Pruning runs under FSDP2 (``fully_shard``) on CPU with gloo, shared by ``tests/test_fsdp2.py``.

Imported by the tests (the same runs in one process as the reference, and ``rank_main`` for spawned ranks),
and run as a script, one process per rank, by the kill-and-resume test:

    python tests/_fsdp_job.py --rank R --world 2 --init file:///PATH --steps 18 --ckpt-dir DIR
        [--save-every N] [--resume] [--step-delay S] --out FINAL.pt

The script's checkpoints are full state dicts (model, optimizer, pruner) that rank 0 writes atomically.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from prune import Constant, CubicRamp, LinearRamp, Pruner
from tests._ranks import finish

WORLD, GLOBAL_BATCH = 2, 16

# name -> Pruner keyword arguments and gradient-accumulation micro-batches per step
CONFIGS: dict[str, dict] = {
    "magnitude-global": dict(criterion="magnitude", scope="global", max_layer_sparsity=0.85,
                             sparsity=CubicRamp(0.0, 0.8, begin_step=2, end_step=10, every=2)),
    "magnitude-2:4": dict(criterion="magnitude", pattern="2:4",
                          sparsity=LinearRamp(0.0, 0.5, begin_step=0, end_step=8, every=2)),
    "movement-global": dict(criterion="movement", scope="global", accumulate=2,
                            sparsity=CubicRamp(0.0, 0.8, begin_step=2, end_step=10, every=2)),
    "movement-row": dict(criterion="movement", scope="row",
                         sparsity=LinearRamp(0.0, 0.75, begin_step=2, end_step=10, every=4)),
}
STEPS = 12


def mlp() -> nn.Sequential:
    """Row counts 32, 20 and 5: the last splits 3 + 2 over two ranks (FSDP2 pads uneven shards)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 20), nn.Tanh(), nn.Linear(20, 5))


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def batch(step: int, micro: int = 0):
    g = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(GLOBAL_BATCH, 12, generator=g)
    return x, torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def build(config: str, sharded: bool):
    kwargs = dict(CONFIGS[config])
    accumulate = kwargs.pop("accumulate", 1)
    model = mlp()
    if sharded:
        shard(model)
    pruner = Pruner(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return model, pruner, opt, accumulate


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def capture_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Forward pre-hooks that record the weight each Linear computes with (FSDP2: the all-gathered one)."""
    seen: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, mod.weight.detach()
                                                                                      .clone()))
    return seen


def train(config: str, sharded: bool, rows: slice) -> dict:
    """Train ``STEPS`` steps on ``rows`` of each global batch; return what the tests compare (whole tensors)."""
    model, pruner, opt, accumulate = build(config, sharded)
    seen = capture_weights(model)
    out: dict = {"masks": [], "eval": [], "zeros_exact": []}
    for step in range(STEPS):
        for micro in range(accumulate):
            x, y = batch(step, micro)
            (nn.functional.cross_entropy(model(x[rows]), y[rows]) / accumulate).backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
        if pruner.schedule.is_update_step(pruner.step_count):
            out["masks"].append({k: whole(v).clone() for k, v in pruner.masks.items()})
        if step % 3 == 1:  # a forward without backward between steps: outputs, and the weights it used
            with torch.no_grad():
                out["eval"].append(model(batch(999)[0]))
            masks = {k: whole(v) for k, v in pruner.masks.items()}
            out["zeros_exact"].append(all(bool((seen[k][~m] == 0).all()) for k, m in masks.items()))
    state = pruner.state_dict(full_state_dict=True)
    out["pruner"] = {k: state[k] for k in ("step", "masks", "scores") if k in state}
    if sharded:
        local = pruner.state_dict()
        out["local_bytes"] = sum(v.to_local().nbytes for k in ("masks", "scores") for v in local.get(k, {}).values())
    else:
        out["local_bytes"] = sum(v.nbytes for k in ("masks", "scores") for v in state.get(k, {}).values())
    out["report_sparsity"] = pruner.report().sparsity
    out["state_dict"] = full_model_state(pruner.finalize()) if sharded else pruner.finalize().state_dict()
    return out


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def init(rank: int, world: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)


def rank_main(rank: int, mode: str, config: str, init_file: str, out_dir: str) -> None:
    """One spawned rank: run ``MODES[mode]`` and save what it returns to ``out_dir/RANK.pt``."""
    init(rank, WORLD, f"file://{init_file}")
    result = MODES[mode](config, rank, out_dir)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finish()


def _train_mode(config: str, rank: int, out_dir: str) -> dict:
    per_rank = GLOBAL_BATCH // WORLD
    return train(config, True, slice(rank * per_rank, (rank + 1) * per_rank))


def _dcp_mode(config: str, rank: int, out_dir: str) -> dict:
    """Resume through a distributed (DCP) checkpoint: save at step 5, continue; load into fresh objects, continue."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    per_rank = GLOBAL_BATCH // WORLD
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    path = os.path.join(out_dir, "dcp")

    def run(model, pruner, opt, steps):
        for step in steps:
            x, y = batch(step)
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
            pruner.step()
            opt.zero_grad()

    def everything(model, pruner, opt):
        return {"model": sd.get_model_state_dict(model), "optim": sd.get_optimizer_state_dict(model, opt),
                "pruner": pruner.state_dict()}

    model, pruner, opt, _ = build(config, True)
    run(model, pruner, opt, range(5))
    with torch.no_grad():  # an evaluation before saving: the pruned entries are parked, the saved model dense
        model(batch(999)[0])
    dcp.save(everything(model, pruner, opt), checkpoint_id=path)
    run(model, pruner, opt, range(5, STEPS))
    ref = pruner.state_dict(full_state_dict=True), full_model_state(pruner.finalize())
    model, pruner, opt, _ = build(config, True)
    state = everything(model, pruner, opt)
    dcp.load(state, checkpoint_id=path)
    sd.set_model_state_dict(model, state["model"])
    sd.set_optimizer_state_dict(model, opt, state["optim"])
    pruner.load_state_dict(state["pruner"])
    resumed_step = pruner.step_count
    run(model, pruner, opt, range(resumed_step, STEPS))
    return {"ref": ref, "resumed_step": resumed_step,
            "resumed": (pruner.state_dict(full_state_dict=True), full_model_state(pruner.finalize()))}


def _checks_mode(config: str, rank: int, out_dir: str) -> dict:
    """Sharded mask math against ``prune.masks`` on hand-made ties, and what the pruner refuses (messages)."""
    from prune import masks, sharded_masks

    out: dict = {"math": [], "errors": {}}
    g = torch.Generator().manual_seed(7)
    for n_rows, n_prune in ((5, 17), (9, 40), (1, 3), (8, 0), (8, 64)):
        full = torch.randint(0, 4, (n_rows, 8), generator=g).float()  # many ties
        full[0, :3] = torch.tensor([-0.0, 0.0, float("-inf")])
        chunk = -(-n_rows // WORLD)
        local = full[rank * chunk:(rank + 1) * chunk]
        got = sharded_masks.prune_lowest(local.reshape(-1), [local.numel()], n_prune, None)
        out["math"].append(torch.equal(gather_rows(got.view(local.shape), n_rows),
                                       masks.prune_lowest(full, n_prune)))
    parts = [torch.randint(0, 3, (r, 4), generator=g).float() for r in (6, 3, 4)]
    chunks = [p[rank * -(-p.shape[0] // WORLD):(rank + 1) * -(-p.shape[0] // WORLD)] for p in parts]
    for sparsity, cap in ((0.5, None), (0.6, 0.7), (0.3, 0.4)):
        flat = torch.cat([c.reshape(-1) for c in chunks])
        got = sharded_masks.global_masks(flat, [c.numel() for c in chunks], sparsity, cap, None)
        ref = masks.global_masks(torch.cat([p.reshape(-1) for p in parts]), [p.numel() for p in parts], sparsity,
                                 cap)
        out["math"].append(all(torch.equal(gather_rows(m.view(c.shape), p.shape[0]).reshape(-1), r)
                               for m, c, p, r in zip(got, chunks, parts, ref)))
    for name, make in REFUSALS.items():
        try:
            make()
            out["errors"][name] = None
        except (ValueError, RuntimeError) as e:
            out["errors"][name] = f"{type(e).__name__}: {e}"
    out["conv1d"] = _conv1d_masks()
    return out


def gather_rows(local: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Whole tensor from dim-0 chunks (the FSDP2 layout) of a plain local tensor."""
    chunk = -(-n_rows // WORLD)
    padded = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(WORLD)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n_rows]


def _conv1d(sharded: bool) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.Tanh(), Conv1D(6, 12))  # weights (8, 12) and (12, 6): (in, out)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
    return model


def _conv1d_masks() -> dict:
    """transformers' Conv1D, weight (in, out), sharded along its input dim: unstructured masks (layer, global)."""
    result = {}
    for scope in ("layer", "global"):
        pruner = Pruner(_conv1d(True), sparsity=0.6, scope=scope)
        result[scope] = {k: whole(v) for k, v in pruner.masks.items()}
    return result


def _pruner_before_fully_shard() -> None:
    model = mlp()
    pruner = Pruner(model, sparsity=LinearRamp(0.0, 0.5, begin_step=0, end_step=2, every=1))
    shard(model)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()


def _hsdp() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")))
    Pruner(model, sparsity=0.5)


REFUSALS = {
    "before_fully_shard": _pruner_before_fully_shard,
    "conv1d_nm": lambda: Pruner(_conv1d(True), sparsity=0.5, pattern="2:4"),
    "conv1d_row": lambda: Pruner(_conv1d(True), sparsity=0.5, scope="row"),
    "wanda": lambda: Pruner(shard(mlp()), sparsity=CubicRamp(0.0, 0.5, begin_step=1, end_step=3), criterion="wanda"),
    "obert": lambda: Pruner(shard(mlp()), sparsity=CubicRamp(0.0, 0.5, begin_step=1, end_step=3), criterion="obert"),
    "hsdp": _hsdp,
    "process_group": lambda: Pruner(shard(mlp()), sparsity=Constant(0.5), process_group=dist.group.WORLD),
}
MODES = {"train": _train_mode, "dcp": _dcp_mode, "checks": _checks_mode}


# -- the kill-and-resume script ---------------------------------------------------------------------------------
def resumable_build(sharded: bool = True):
    model = shard(mlp()) if sharded else mlp()
    pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.9, begin_step=2, end_step=14, every=4), criterion="movement",
                    scope="global")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return model, pruner, opt


def full_checkpoint(model, pruner, opt) -> dict:
    """Whole tensors of model, optimizer and pruner on every rank (collectives)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)
    return {"model": full_model_state(model), "optimizer": get_optimizer_state_dict(model, opt, options=full),
            "pruner": pruner.state_dict(full_state_dict=True)}


def load_full_checkpoint(model, pruner, opt, state: dict) -> None:
    from torch.distributed.checkpoint import state_dict as sd

    full = sd.StateDictOptions(full_state_dict=True)
    sd.set_model_state_dict(model, state["model"], options=full)
    sd.set_optimizer_state_dict(model, opt, state["optimizer"], options=full)
    pruner.load_state_dict(state["pruner"])


def main() -> None:
    from tests._train_job import save_atomic

    ap = argparse.ArgumentParser()
    for flag in ("--rank", "--world", "--steps", "--save-every"):
        ap.add_argument(flag, type=int, default=0)
    ap.add_argument("--init", required=True)
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--step-delay", type=float, default=0.0)
    args = ap.parse_args()
    init(args.rank, args.world, args.init)
    model, pruner, opt = resumable_build()
    latest = os.path.join(args.ckpt_dir, "latest.pt")
    if args.resume:
        load_full_checkpoint(model, pruner, opt, torch.load(latest, weights_only=True))
    per_rank = GLOBAL_BATCH // args.world
    rows = slice(args.rank * per_rank, (args.rank + 1) * per_rank)
    for step in range(pruner.step_count, args.steps):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
        time.sleep(args.step_delay)
        if args.save_every and pruner.step_count % args.save_every == 0:
            with torch.no_grad():  # an evaluation before saving (the saved weights must still be dense)
                model(batch(999)[0][rows])
            state = full_checkpoint(model, pruner, opt)
            if args.rank == 0:
                save_atomic(state, latest)
            dist.barrier()
    state = full_checkpoint(model, pruner, opt)
    state["model"] = full_model_state(pruner.finalize())
    if args.rank == 0:
        save_atomic(state, args.out)
    finish()


if __name__ == "__main__":
    main()
