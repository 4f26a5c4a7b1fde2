"""The Pruner on real architectures (MLP, CNN, tiny BERT and GPT-2 from configs) and resume across processes."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from prune import CubicRamp, LinearRamp, Pruner

transformers = pytest.importorskip("transformers")


def train(model, pruner, make_batch, loss_fn, steps, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, make_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pruner.step()
        opt.zero_grad()
        losses.append(loss.item())
        for t in pruner.targets:  # masks hold throughout
            assert (t.module.weight[~pruner.masks[t.name]] == 0).all()
    return losses


def check_finalize(model, pruner, forward, sparsity):
    with torch.no_grad():
        before = forward(model)
    report = pruner.report()
    pruner.finalize()
    with torch.no_grad():
        assert torch.equal(forward(model), before)
    assert report.sparsity == pytest.approx(sparsity, abs=1e-3)


def test_small_cnn_with_conv_targets_and_nm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    keys = list(model.state_dict())
    pruner = Pruner(model, sparsity=LinearRamp(0.0, 0.5, begin_step=0, end_step=6, every=2), pattern="2:4",
                    types=(nn.Conv2d, nn.Linear), include=["2", "5"])
    x = torch.randn(16, 4, 6, 6)
    y = torch.randint(0, 5, (16,))
    losses = train(model, pruner, lambda s: (x, y),
                   lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), steps=20, lr=1e-2)
    assert losses[-1] < losses[0]
    conv = model[2].weight.detach()  # (out, in, kh, kw): 2:4 along input channels
    groups = (conv.permute(0, 2, 3, 1) != 0).reshape(-1, 4)
    assert (groups.sum(1) <= 2).all() and int((conv == 0).sum()) == conv.numel() // 2
    assert (model[0].weight != 0).all()  # not included
    check_finalize(model, pruner, lambda m: m(x), 0.5)
    assert list(model.state_dict()) == keys


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).train()


def test_bert_movement_global():
    model = tiny_bert()
    keys = list(model.state_dict())
    pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.9, begin_step=2, end_step=12, every=2), criterion="movement",
                    scope="global", max_layer_sparsity=0.98, exclude=["classifier", "pooler.*"])
    names = [t.name for t in pruner.targets]
    assert len(names) == 12 and all(n.startswith("bert.encoder.layer.") for n in names)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (8, 16), generator=gen)
    labels = torch.randint(0, 3, (8,), generator=gen)
    losses = train(model, pruner, lambda s: (ids, labels),
                   lambda m, b: m(input_ids=b[0], labels=b[1]).loss, steps=20, lr=3e-3)
    assert losses[-1] < losses[0]
    assert (model.classifier.weight != 0).all() and (model.bert.embeddings.word_embeddings.weight[1:] != 0).all()  # row 0: padding
    model.eval()
    check_finalize(model, pruner, lambda m: m(input_ids=ids).logits, 0.9)
    assert list(model.state_dict()) == keys


def test_gpt2_conv1d_magnitude_layer_scope():
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="not pruning lm_head.weight: it is shared"):
        pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.75, begin_step=0, end_step=8, every=2))
    assert len(pruner.targets) == 8 and all(isinstance(t.module, transformers.pytorch_utils.Conv1D) for t in pruner.targets)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 16), generator=gen)
    losses = train(model, pruner, lambda s: ids, lambda m, b: m(input_ids=b, labels=b).loss, steps=15, lr=3e-3)
    assert losses[-1] < losses[0]
    for t in pruner.targets:
        assert int((t.module.weight == 0).sum()) == round(0.75 * t.module.weight.numel())
    model.eval()
    check_finalize(model, pruner, lambda m: m(input_ids=ids).logits, 0.75)
    assert list(model.state_dict()) == keys
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives


def test_gpt2_two_four_along_input_dim():
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.warns(UserWarning):
        Pruner(model, sparsity=0.5, pattern="2:4").finalize()
    w = model.transformer.h[0].attn.c_attn.weight.detach()  # Conv1D: (in, out), input is dim 0
    assert ((w.t() != 0).reshape(-1, 4).sum(1) <= 2).all()


JOB = os.path.join(os.path.dirname(__file__), "_train_job.py")


def run_job(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, JOB, *args], check=True, env=env, timeout=300)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    ref, part, resumed = tmp_path / "ref", tmp_path / "part", tmp_path / "resumed"
    for d in (ref, part):
        d.mkdir()
    run_job("--steps", "40", "--ckpt-dir", str(ref), "--out", str(ref / "final.pt"))
    # stop at step 18 (saved at step 18: between two mask updates of the cubic schedule), resume, finish
    run_job("--steps", "18", "--ckpt-dir", str(part), "--save-every", "6", "--out", str(part / "stopped.pt"))
    run_job("--steps", "40", "--ckpt-dir", str(part), "--resume", "--out", str(resumed))
    a = torch.load(ref / "final.pt", weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["pruner"]["masks"].items():
        assert torch.equal(v, b["pruner"]["masks"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert a["pruner"]["step"] == b["pruner"]["step"] == 40
