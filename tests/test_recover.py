"""prune.recover: training a one-shot pruned model towards its dense teacher keeps every zero exactly, lowers the
distillation loss, and ``prune recover`` writes a folder (or nothing, with a one-line error)."""
import json

import pytest
import torch
from torch import nn

from prune import oneshot
from prune.recover import hold_masks, recover
from tests.test_oneshot import CALIB, _run_cli, dense_folder_and_text, tiny_llama


def zeros_of(model):
    return {n: (p == 0).clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_hold_masks_keeps_each_layers_own_zeros_through_training():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():  # a different sparsity per layer and per row, as OWL and per-row methods leave
        model[0].weight[:, :3] = 0
        model[2].weight[1] = 0
    zeros = {i: model[i].weight == 0 for i in (0, 2)}
    pruner = hold_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    pruner.finalize()
    for i in (0, 2):
        assert torch.equal(model[i].weight == 0, zeros[i])


def test_recover_after_oneshot_keeps_the_masks_and_moves_towards_the_teacher():
    teacher = tiny_llama()
    model = tiny_llama()
    oneshot(model, CALIB, method="wanda", sparsity=0.8, progress=False)
    zeros = zeros_of(model)
    report = recover(model, teacher, list(CALIB.split(4)), steps=30, lr=3e-3, task_weight=0.0, progress=False)
    assert report.steps == 30 and len(report.losses) == 30 and set(report.parts) == {"logits"}
    first, last = sum(report.parts["logits"][:5]) / 5, sum(report.parts["logits"][-5:]) / 5
    assert last < 0.5 * first  # the KL to the dense teacher
    after = zeros_of(model)
    assert after.keys() == zeros.keys() and all(torch.equal(after[n], zeros[n]) for n in zeros)
    assert not model.training and not any("parametrizations" in k for k in model.state_dict())  # finalized
    assert "recovery: 30 steps, loss" in str(report)


@pytest.mark.parametrize("kwargs,match", [({"steps": 0}, "steps must be >= 1, got 0"),
                                          ({"lr": 0.0}, "lr must be positive, got 0.0"),
                                          ({"warmup": 1.0}, r"warmup must be in \[0, 1\), got 1.0")])
def test_recover_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recover(tiny_llama(), tiny_llama(), [CALIB], progress=False, **kwargs)
    with pytest.raises(ValueError, match="int64 token ids"):
        recover(tiny_llama(), tiny_llama(), [CALIB.float()], progress=False)


def test_cli_recover_writes_a_folder_with_the_same_zeros_or_one_line_errors(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prune.cli import main

    text = dense_folder_and_text(tmp_path)
    pruned, out = tmp_path / "pruned", tmp_path / "recovered"
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True)
    oneshot(before, CALIB % before.config.vocab_size, method="wanda", sparsity=0.5, progress=False)
    before.save_pretrained(pruned)
    AutoTokenizer.from_pretrained(tmp_path / "dense", local_files_only=True).save_pretrained(pruned)
    args = ["recover", pruned, "--teacher", tmp_path / "dense", "--text", text, "-o", out, "--steps", 6,
            "--samples", 4, "--seq-len", 32, "--batch-size", 2, "--lr", 1e-3]
    done = _run_cli(*args)  # the installed command, in its own process
    assert done.returncode == 0, done.stderr
    assert "recovery: 6 steps" in done.stdout
    assert len(json.loads((out / "recovery.json").read_text())["losses"]) == 6
    after = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    z0, z1 = zeros_of(before), zeros_of(after)
    assert all(torch.equal(z0[n], z1[n]) for n in z0)
    assert not all(torch.equal(p, after.state_dict()[n]) for n, p in before.state_dict().items())
    capsys.readouterr()
    for argv, expect in ((args, "exists; pass --overwrite"),
                         ([*args[:7], tmp_path / "other", *args[8:], "--seq-len", 100000], "exceeds the model's")):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "other").exists()
