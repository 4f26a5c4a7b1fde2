"""prune.distill: the distillation losses against hand-computed values, the frozen teacher, the mix."""
import math

import pytest
import torch
from torch import nn

from prune import Constant, Distiller, Pruner
from prune.distill import hidden_distance, kl_logits, logits_of


def _kl_by_hand(s_row, t_row, temp):
    ps = [math.exp(v / temp) for v in s_row]
    pt = [math.exp(v / temp) for v in t_row]
    ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
    return sum(b * math.log(b / a) for a, b in zip(ps, pt)) * temp * temp


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_matches_the_formula_worked_by_hand_and_leaves_out_masked_rows(temp):
    s = torch.tensor([[[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, -3.0], [9.0, -9.0, 0.0]]])
    t = torch.tensor([[[1.5, 0.0, 0.0], [0.3, -0.2, 1.0]], [[0.0, 2.0, -1.0], [0.0, 0.0, 0.0]]])
    rows = [(i, j) for i in range(2) for j in range(2)]
    by_hand = [_kl_by_hand(s[i, j].tolist(), t[i, j].tolist(), temp) for i, j in rows]
    assert kl_logits(s, t, temp).item() == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    mask = torch.tensor([[1, 1], [1, 0]])  # the last token is padding
    assert kl_logits(s, t, temp, mask).item() == pytest.approx(sum(by_hand[:3]) / 3, rel=1e-5)
    assert kl_logits(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_distances_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert hidden_distance(a, b, "mse").item() == pytest.approx((1 + 1) / 4)
    assert hidden_distance(a, b, "cosine").item() == pytest.approx((0 + 1) / 2)
    with pytest.raises(ValueError, match="shape"):
        hidden_distance(a, b[:1], "mse")
    with pytest.raises(ValueError, match="unknown hidden_loss 'l1'; allowed: mse, cosine"):
        hidden_distance(a, b, "l1")


def _mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))


def test_the_default_teacher_is_a_frozen_copy_and_gets_no_gradients():
    student = _mlp()
    d = Distiller(student)
    assert d.teacher is not student and not d.teacher.training
    assert all(not p.requires_grad for p in d.teacher.parameters())
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    with torch.no_grad():
        student[0].weight.add_(1.0)
    out = d(torch.randn(4, 6))
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in before.items())


def test_the_loss_is_the_weighted_mix_of_its_parts():
    torch.manual_seed(1)
    student, teacher = _mlp(), _mlp()
    x, target = torch.randn(7, 6), torch.randint(0, 5, (7,))
    task = lambda out, inputs: nn.functional.cross_entropy(out, target)  # noqa: E731
    d = Distiller(student, teacher, temperature=3.0, logits_weight=0.5, hidden={"1": "1"}, hidden_loss="cosine",
                  hidden_weight=2.0, task_weight=0.25, task_loss=task)
    out = d(x)
    s_h, t_h = torch.relu(student[0](x)), torch.relu(teacher[0](x))
    expected = {"task": task(student(x), x), "logits": kl_logits(student(x), teacher(x), 3.0),
                "hidden": hidden_distance(s_h, t_h, "cosine")}
    assert set(out.parts) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(out.parts[k], v.detach(), rtol=0, atol=1e-6)
    mix = 0.25 * expected["task"] + 0.5 * expected["logits"] + 2.0 * expected["hidden"]
    torch.testing.assert_close(out.loss, mix, rtol=0, atol=1e-6)
    assert set(Distiller(student, teacher, hidden={"1": "1"}, hidden_weight=0.0)(x).parts) == {"logits"}


def test_a_transformers_model_gives_its_task_loss_and_padded_tokens_are_left_out():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    student = LlamaForCausalLM(cfg)
    d = Distiller(student, hidden={"model.layers.1": "model.layers.1"})
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    ids = torch.randint(0, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = d({"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert set(out.parts) == {"task", "logits", "hidden"}
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask).logits
        t = d.teacher(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out.parts["logits"], kl_logits(s, t, 2.0, mask), rtol=1e-5, atol=1e-6)
    assert out.parts["logits"] != kl_logits(s, t, 2.0)  # the padded tokens would count
    d.remove()
    assert not student.model.layers[1]._forward_hooks


def test_pruning_with_distillation_keeps_the_masks_and_learns():
    torch.manual_seed(0)
    student = _mlp()
    d = Distiller(student, hidden={"1": "1"})
    pruner = Pruner(student, sparsity=Constant(0.75))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = torch.randn(64, 6)
    first = None
    for _ in range(60):
        out = d(x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.9 * first  # the pruned student moves towards its dense teacher
    for layer in (student[0], student[2]):
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1 / layer.weight.numel())


def test_errors_name_the_bad_value():
    student = _mlp()
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        Distiller(student, temperature=0)
    with pytest.raises(ValueError, match="logits_weight must be >= 0, got -1"):
        Distiller(student, logits_weight=-1)
    with pytest.raises(ValueError, match="unknown hidden_loss 'kl'"):
        Distiller(student, hidden_loss="kl")
    with pytest.raises(ValueError, match="the student has no module 'encoder'"):
        Distiller(student, hidden={"encoder": "1"})
    with pytest.raises(ValueError, match="nothing to train on"):
        Distiller(student, logits_weight=0)(torch.randn(2, 6))
    with pytest.raises(TypeError, match="cannot find logits in a dict"):
        logits_of({"x": 1})
    with pytest.raises(ValueError, match="student= must be the Distiller's student or a wrapper of it"):
        Distiller(student)(torch.randn(2, 6), student=_mlp())
    Pruner(student, sparsity=Constant(0.5))
    with pytest.raises(ValueError, match="build the Distiller before the Pruner"):
        Distiller(student)
