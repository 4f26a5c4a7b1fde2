"""The Pruner in an accelerate loop (CPU): with gradient accumulation it equals the plain PyTorch loop bit for
bit, and save_state plus the pruner's state resumes bit-identically; on 2 processes (gloo) a pruner built
before ``Accelerator.prepare`` gives every rank the same masks (magnitude: the single-process ones), and one
built after it (on the DistributedDataParallel wrapper) breaks DDP, as the README says."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prune import CubicRamp, Pruner
from tests._ranks import finish

STEPS, ACCUMULATE, BATCH = 12, 2, 8
SCHEDULE = CubicRamp(0.0, 0.8, begin_step=2, end_step=10, every=2)


def build(criterion="movement"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    return model, (lambda m: Pruner(m, sparsity=SCHEDULE, criterion=criterion))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * ACCUMULATE * BATCH, 12, generator=g)
    return TensorDataset(x, (x[:, :3].sum(1) > 0).long() + (x[:, 3:6].sum(1) > 0).long())


def plain_loop(criterion):
    model, make_pruner = build(criterion)
    pruner = make_pruner(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i, (x, y) in enumerate(DataLoader(data(), batch_size=BATCH)):
        (nn.functional.cross_entropy(model(x), y) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            opt.step()
            pruner.step()
            opt.zero_grad()
    return model, pruner


def accelerate_loop(criterion, prune_after_prepare):
    """The loop of the README's accelerate section."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model, make_pruner = build(criterion)
    pruner = None if prune_after_prepare else make_pruner(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data(), batch_size=BATCH))
    pruner = pruner or make_pruner(model)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:  # once per optimizer step, not per micro-batch
            pruner.step()
    return accelerator.unwrap_model(model), pruner


@pytest.mark.parametrize("prune_after_prepare", [False, True])  # one process: prepare wraps nothing
@pytest.mark.parametrize("criterion", ["movement", "magnitude"])
def test_accelerate_with_accumulation_equals_the_plain_loop(criterion, prune_after_prepare):
    model_a, pruner_a = plain_loop(criterion)
    model_b, pruner_b = accelerate_loop(criterion, prune_after_prepare)
    assert pruner_b.step_count == pruner_a.step_count == STEPS
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(pruner_a.masks[k], pruner_b.masks[k]) for k in pruner_a.masks)
    assert pruner_b.report().sparsity == pytest.approx(0.8, abs=1e-3)
    assert all((m.weight[~pruner_b.masks[str(i)]] == 0).all() for i, m in enumerate(model_b) if i % 2 == 0)


def test_save_state_plus_the_pruner_state_resumes_bit_identically(tmp_path):
    """accelerate's save_state/load_state for model, optimizer and RNG; the pruner's state beside them with
    torch.save, read back with weights_only=True (accelerate's register_for_checkpointing would unpickle it)."""

    def run(resume_dir=None, stop_after=None):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
        model, make_pruner = build()
        pruner = make_pruner(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt, loader = accelerator.prepare(model, opt, DataLoader(data(), batch_size=BATCH))
        if resume_dir is not None:
            accelerator.load_state(resume_dir)
            pruner.load_state_dict(torch.load(f"{resume_dir}/pruner.pt", weights_only=True))
            loader = accelerator.skip_first_batches(loader, pruner.step_count * ACCUMULATE)
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                pruner.step()
                if pruner.step_count == stop_after:
                    accelerator.save_state(str(tmp_path / "ckpt"))
                    torch.save(pruner.state_dict(), tmp_path / "ckpt" / "pruner.pt")
                    break
        return model, pruner

    model_a, pruner_a = run()
    run(stop_after=5)  # mid-ramp: masks and movement scores in flight
    model_b, pruner_b = run(resume_dir=str(tmp_path / "ckpt"))
    assert pruner_b.step_count == STEPS
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = pruner_a.state_dict(), pruner_b.state_dict()
    assert all(torch.equal(sa["scores"][k], sb["scores"][k]) for k in sa["scores"])


def _global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2 * BATCH, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


def _ddp_run(accelerator, prune_after_prepare, rank, world, criterion="movement"):
    model, make_pruner = build(criterion)
    pruner = None if prune_after_prepare else make_pruner(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    pruner = pruner or make_pruner(model)
    shard = slice(rank * 2 * BATCH // world, (rank + 1) * 2 * BATCH // world)
    for step in range(STEPS):
        x, y = _global_batch(step)
        accelerator.backward(nn.functional.cross_entropy(model(x[shard]), y[shard]))
        opt.step()
        pruner.step()
        opt.zero_grad()
    return {k.removeprefix("module."): v.clone() for k, v in pruner.masks.items()}


def _rank_main(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    result = {c: _ddp_run(accelerator, False, rank, 2, c) for c in ("movement", "magnitude")}
    try:
        _ddp_run(accelerator, True, rank, 2)
        result["after"] = "ran"
    except RuntimeError as e:
        result["after"] = str(e)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finish()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_prune_before_prepare(tmp_path):
    mp.start_processes(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    for criterion in ("movement", "magnitude"):  # every rank has the same masks, at the target
        masks = [result[criterion] for result in ranks]
        assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
        pruned = sum(int((~m).sum()) for m in masks[0].values())
        assert pruned == sum(round(0.8 * m.numel()) for m in masks[0].values())
    single = _ddp_run(Accelerator(cpu=True), False, 0, 1, "magnitude")  # one process, the whole global batch
    assert all(torch.equal(ranks[0]["magnitude"][k], single[k]) for k in single)
    for result in ranks:
        # a pruner built after prepare, on the DDP wrapper: DDP's reducer fails at the second step
        assert "finished reduction in the prior iteration" in result["after"]
