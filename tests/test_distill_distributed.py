"""Distillation under DDP and FSDP2 (2 processes, gloo, CPU): every step's loss and each of its terms (the
ranks' mean), the masks and the final weights equal a single process training on the global batch; the
teacher replicated (the default copy) or sharded (``teacher=`` a ``fully_shard``-ed copy); and the orders
that cannot work are refused with their reason."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prune import CubicRamp, Distiller, Pruner
from tests import _fsdp_job as job
from tests._ranks import finish

STEPS = 10
MODES = ("ddp", "fsdp2", "fsdp2-sharded-teacher")


def run(mode: str, rows: slice) -> dict:
    """Train ``STEPS`` steps on ``rows`` of each global batch; losses are this process's (per micro-batch)."""
    model = job.mlp()
    teacher = None
    if mode == "fsdp2-sharded-teacher":
        teacher = job.shard(copy.deepcopy(model))
    labels = {}
    distiller = Distiller(model, teacher, temperature=2.0, hidden={"2": "2"}, hidden_weight=0.5,
                          task_loss=lambda out, inputs: nn.functional.cross_entropy(out, labels["y"]))
    if mode.startswith("fsdp2"):
        job.shard(model)
    pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.7, begin_step=2, end_step=8, every=2), criterion="magnitude")
    student = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = {"loss": [], "parts": []}
    for step in range(STEPS):
        x, labels["y"] = job.batch(step)[0][rows], job.batch(step)[1][rows]
        step_out = distiller(x, student=student)
        step_out.loss.backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
        out["loss"].append(step_out.loss.detach())
        out["parts"].append(torch.stack([step_out.parts[k] for k in ("task", "logits", "hidden")]))
    out["loss"], out["parts"] = torch.stack(out["loss"]), torch.stack(out["parts"])
    out["masks"] = {k: job.whole(v).clone() for k, v in pruner.masks.items()}
    final = pruner.finalize()
    out["weights"] = job.full_model_state(final) if mode.startswith("fsdp2") else final.state_dict()
    return out


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    job.init(rank, job.WORLD, f"file://{init_file}")
    per_rank = job.GLOBAL_BATCH // job.WORLD
    result = {}
    for mode in MODES:
        r = run(mode, slice(rank * per_rank, (rank + 1) * per_rank))
        for key in ("loss", "parts"):  # the ranks' mean: the loss on the global batch
            dist.all_reduce(r[key])
            r[key] /= job.WORLD
        result[mode] = r
    refusals = {}
    for name, make in {"sharded_student": lambda: Distiller(job.shard(job.mlp())),
                       "ddp_wrapper": lambda: Distiller(nn.parallel.DistributedDataParallel(job.mlp()))}.items():
        try:
            make()
            refusals[name] = "accepted"
        except (TypeError, ValueError) as e:
            refusals[name] = str(e)
    result["refusals"] = refusals
    torch.save(result, f"{out_dir}/{rank}.pt")
    finish()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    mp.start_processes(_rank_main, args=(str(tmp / "init"), str(tmp)), nprocs=job.WORLD, join=True,
                       start_method="spawn")
    return [torch.load(tmp / f"{r}.pt", weights_only=True) for r in range(job.WORLD)]


@pytest.fixture(scope="module")
def single():
    return run("single", slice(None))


@pytest.mark.parametrize("mode", MODES)
def test_distributed_distillation_equals_one_process(ranks, single, mode):
    for rank in ranks:
        got = rank[mode]
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["parts"], single["parts"], rtol=1e-5, atol=1e-6)
        assert got["masks"].keys() == single["masks"].keys()
        for k, m in single["masks"].items():
            assert torch.equal(got["masks"][k], m), k
        for k, w in single["weights"].items():
            torch.testing.assert_close(got["weights"][k], w, rtol=1e-5, atol=1e-6)
    assert single["parts"][-1, 1] > 0 and single["parts"][-1, 2] > 0  # the teacher terms were live
    assert (single["masks"]["0"] == 0).float().mean() == pytest.approx(0.7, abs=0.02)


def test_distributed_orders_that_cannot_work_are_refused(ranks):
    for rank in ranks:
        assert "build the Distiller before fully_shard" in rank["refusals"]["sharded_student"]
        assert "student=ddp_model" in rank["refusals"]["ddp_wrapper"]
