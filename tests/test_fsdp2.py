"""Pruner under FSDP2 (``fully_shard``; 2 processes, gloo, CPU): masks equal to a single process with the same
global batch (bit for bit), exact zeros in every forward, masks and scores held as 1/world shards, sharded mask
math equal to ``prune.masks`` on ties, refusals with their reasons, and resume (distributed checkpoint; full
state dicts after a kill) ending bit-identical."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from prune.sharding import ORDER
from tests import _fsdp_job as job

JOB = os.path.join(os.path.dirname(__file__), "_fsdp_job.py")
RESUME_STEPS = 18


def spawn(mode, config, tmp_path):
    mp.start_processes(job.rank_main, args=(mode, config, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=job.WORLD, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(job.WORLD)]


@pytest.mark.parametrize("config", sorted(job.CONFIGS))
def test_fsdp2_masks_match_single_process(config, tmp_path):
    ranks = spawn("train", config, tmp_path)
    single = job.train(config, False, slice(None))
    assert len(single["masks"]) >= 3
    for r in ranks:
        assert len(r["masks"]) == len(single["masks"])
        for update, expected in enumerate(single["masks"]):
            for name, mask in expected.items():
                assert torch.equal(r["masks"][update][name], mask), (update, name)
        assert r["zeros_exact"] and all(r["zeros_exact"])  # the all-gathered weights: exact zeros where pruned
        for got, want in zip(r["eval"], single["eval"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert r["pruner"]["step"] == single["pruner"]["step"] == job.STEPS
        for name, score in single["pruner"].get("scores", {}).items():
            torch.testing.assert_close(r["pruner"]["scores"][name], score, rtol=1e-4, atol=1e-6)
        assert r["report_sparsity"] == pytest.approx(single["report_sparsity"], abs=0)
        assert sorted(r["state_dict"]) == sorted(single["state_dict"])  # original keys
        for k, v in single["state_dict"].items():
            torch.testing.assert_close(r["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    final_masks = single["masks"][-1]
    for name, mask in final_masks.items():  # finalize + full state dict: exact zeros where the mask prunes
        assert bool((ranks[0]["state_dict"][f"{name}.weight"][~mask] == 0).all())
    # masks (and movement scores) live as shards: each rank holds half, up to one row per weight
    per_entry = 5 if "scores" in single["pruner"] else 1  # bool mask, + float32 score
    one_row = sum(m.shape[1] for m in final_masks.values()) * per_entry
    assert sum(r["local_bytes"] for r in ranks) == single["local_bytes"]
    assert max(r["local_bytes"] for r in ranks) <= single["local_bytes"] / job.WORLD + one_row


def test_fsdp2_finalized_state_dict_converts_like_single_process(tmp_path):
    from safetensors.torch import save_file

    from sparse_ops.checkpoint.convert import convert_checkpoint
    from sparse_ops.checkpoint.schema import load_sparse_state_dict

    ranks = spawn("train", "magnitude-2:4", tmp_path)
    single = job.train("magnitude-2:4", False, slice(None))
    for name, state in (("fsdp", ranks[0]["state_dict"]), ("single", single["state_dict"])):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
        convert_checkpoint(tmp_path / f"{name}.safetensors", tmp_path / f"{name}-sparse.safetensors", format="2:4")
    fsdp = load_sparse_state_dict(tmp_path / "fsdp-sparse.safetensors", dense=True)
    ref = load_sparse_state_dict(tmp_path / "single-sparse.safetensors", dense=True)
    assert sorted(fsdp) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(fsdp[k] == 0, v == 0), k
        torch.testing.assert_close(fsdp[k], v, rtol=1e-5, atol=1e-6)


def test_fsdp2_sharded_mask_math_and_refusals(tmp_path):
    ranks = spawn("checks", "", tmp_path)
    for r in ranks:
        assert r["math"] and all(r["math"])  # sharded top-k / global threshold == prune.masks, ties included
        errors = r["errors"]
        assert errors["before_fully_shard"].startswith("MisuseError") and ORDER in errors["before_fully_shard"]
        assert "Conv1D" in errors["conv1d_nm"] and "2:4" in errors["conv1d_nm"]
        assert "Conv1D" in errors["conv1d_row"] and "scope='row'" in errors["conv1d_row"]
        assert "'wanda'" in errors["wanda"] and "'magnitude' or 'movement'" in errors["wanda"]
        assert "'obert'" in errors["obert"] and "'taylor'" in errors["obert"]
        assert "1-D mesh" in errors["hsdp"]
        assert "process_group=None" in errors["process_group"]
    from prune import Pruner

    for scope, masks in ranks[0]["conv1d"].items():  # (in, out) weights, unstructured: same masks as one process
        single = Pruner(job._conv1d(False), sparsity=0.6, scope=scope).masks
        for name, mask in single.items():
            assert torch.equal(masks[name], mask), (scope, name)


def test_fsdp2_resume_from_distributed_checkpoint_is_bit_identical(tmp_path):
    ranks = spawn("dcp", "movement-global", tmp_path)
    for r in ranks:
        assert r["resumed_step"] == 5
        (ref_pruner, ref_model), (pruner, model) = r["ref"], r["resumed"]
        assert pruner["step"] == ref_pruner["step"] == job.STEPS
        for section in ("masks", "scores"):
            for k, v in ref_pruner[section].items():
                assert torch.equal(pruner[section][k], v), (section, k)
        for k, v in ref_model.items():
            assert torch.equal(model[k], v), k


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


def _launch(tmp_path, run, *extra):
    init = tmp_path / f"init-{run}-{time.monotonic_ns()}"
    return [subprocess.Popen([sys.executable, JOB, "--rank", str(r), "--world", "2", "--init", f"file://{init}",
                              "--steps", str(RESUME_STEPS), "--ckpt-dir", str(tmp_path / run), *extra], env=_env())
            for r in range(2)]


def _wait(procs, timeout=120):
    for p in procs:
        assert p.wait(timeout=timeout) == 0


def _saved_step(path):
    try:
        return torch.load(path, weights_only=True)["pruner"]["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def test_fsdp2_killed_run_resumes_bit_identical(tmp_path):
    for run in ("ref", "run"):
        (tmp_path / run).mkdir()
    ref = _launch(tmp_path, "ref", "--out", str(tmp_path / "ref" / "final.pt"))
    _wait(ref)
    procs = _launch(tmp_path, "run", "--save-every", "3", "--step-delay", "0.05",
                    "--out", str(tmp_path / "run" / "never.pt"))
    latest = tmp_path / "run" / "latest.pt"
    deadline = time.time() + 120
    while _saved_step(latest) < 6 and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    for p in procs:  # may land in the middle of a save: "latest" must stay intact
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    assert not (tmp_path / "run" / "never.pt").exists()
    stopped_at = _saved_step(latest)
    assert 6 <= stopped_at < RESUME_STEPS and stopped_at % 3 == 0
    _wait(_launch(tmp_path, "run", "--resume", "--out", str(tmp_path / "run" / "final.pt")))
    a = torch.load(tmp_path / "ref" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert a["pruner"]["step"] == b["pruner"]["step"] == RESUME_STEPS
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for section in ("masks", "scores"):
        for k, v in a["pruner"][section].items():
            assert torch.equal(v, b["pruner"][section][k]), (section, k)
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])), (i, k)
    _, single, _ = job.resumable_build(sharded=False)  # a full state dict also loads into one process
    single.load_state_dict(a["pruner"])
    assert single.step_count == RESUME_STEPS
    for name, mask in single.masks.items():
        assert torch.equal(mask, a["pruner"]["masks"][name]), name


@pytest.mark.cuda
def test_fsdp1_is_refused(tmp_path):  # FSDP1 needs an accelerator: skipped on CPU-only machines
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from prune import Pruner

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = FullyShardedDataParallel(job.mlp().cuda())
        with pytest.raises(ValueError, match="FSDP1"):
            Pruner(model, sparsity=0.5)
    finally:
        dist.destroy_process_group()
