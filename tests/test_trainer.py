"""Hugging Face Trainer + PruningCallback on a tiny BERT (synthetic data, CPU): target reached with exact
zeros, sparsity in the logs, resume bit-identical to an uninterrupted run, the saved model converts and
loads, the best checkpoint's pruner state comes back with its weights."""
import contextlib
import io
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from prune import CubicRamp, Pruner
from prune.integrations import STATE_FILE, PruningCallback, add_pruning
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.pretrained import from_pretrained

STEPS, SAVE_EVERY, FINAL = 10, 3, 0.75
SCHEDULE = CubicRamp(0.0, FINAL, begin_step=2, end_step=8, every=2)
VOCAB, SEQ = 64, 16


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=2))  # dropout as configured (0.1): resume restores the RNG


def dataset(n=48):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = (ids[:, :4].float().mean(1) > VOCAB / 2).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


class Recorder(TrainerCallback):
    """Stands in for a logger: what its on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def make_trainer(out, criterion="movement", eval_dataset=None, **overrides):
    model = tiny_bert()
    pruner = Pruner(model, sparsity=SCHEDULE, criterion=criterion, exclude="classifier")
    # 48 samples, 4 per micro-batch, 2 micro-batches per step: 6 steps per epoch, so checkpoint-3 is mid-epoch
    args = TrainingArguments(
        str(out), max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=2e-3, weight_decay=0.01, save_steps=SAVE_EVERY, logging_steps=1, seed=0, use_cpu=True,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, **overrides)
    recorder = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=eval_dataset,
                      callbacks=[recorder])
    add_pruning(trainer, pruner)
    return trainer, pruner, recorder


def train(trainer, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # PrinterCallback prints every log
        return trainer.train(**kwargs)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer, pruner, recorder = make_trainer(out)
    train(trainer)
    return trainer, pruner, recorder, out


def test_target_reached_with_exact_zeros_and_logged(full_run):
    trainer, pruner, recorder, _ = full_run
    assert pruner.step_count == trainer.state.global_step == STEPS
    assert len(pruner.targets) == 13  # 2 layers x (q, k, v, attention out, intermediate, output) + pooler
    for t in pruner.targets:
        w, m = t.module.weight, pruner.masks[t.name]
        assert (w[~m] == 0).all() and int((~m).sum()) == round(FINAL * m.numel())
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == list(range(1, STEPS + 1))
    for log in train_logs:  # measured sparsity equals the schedule's target at every step
        assert log["target_sparsity"] == SCHEDULE(log["step"])
        assert log["sparsity"] == pytest.approx(log["target_sparsity"], abs=1e-3)
    logged = [log["sparsity"] for log in recorder.logs if "loss" in log]  # a callback after it sees them too
    assert logged == [log["sparsity"] for log in train_logs]


def test_each_checkpoint_is_a_pruned_model_plus_the_pruner_state(full_run):
    _, _, _, out = full_run
    for step in (3, 6, 9, 10):
        folder = out / f"checkpoint-{step}"
        weights = load_file(folder / "model.safetensors")
        assert not [k for k in weights if "parametrizations" in k]
        state = torch.load(folder / STATE_FILE, weights_only=True)
        assert state["pruner"]["step"] == step
        for name, mask in state["pruner"]["masks"].items():
            assert (weights[f"{name}.weight"][~mask] == 0).all()
            dense = state["dense"][f"{name}.parametrizations.weight.original"]
            assert torch.equal(weights[f"{name}.weight"], torch.where(mask, dense, 0))


@pytest.mark.parametrize("checkpoint", [3, 6])  # mid-epoch (skips batches) and at an epoch boundary
def test_resume_is_bit_identical_to_the_uninterrupted_run(full_run, tmp_path, checkpoint):
    trainer_a, pruner_a, _, out_a = full_run
    shutil.copytree(out_a / f"checkpoint-{checkpoint}", tmp_path / f"checkpoint-{checkpoint}")
    trainer_b, pruner_b, _ = make_trainer(tmp_path)
    train(trainer_b, resume_from_checkpoint=True)
    assert pruner_b.step_count == STEPS
    a, b = trainer_a.model.state_dict(), trainer_b.model.state_dict()  # dense weights, behind the masks too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = pruner_a.state_dict(), pruner_b.state_dict()
    for part in ("masks", "scores"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])
    losses = lambda t: [log["loss"] for log in t.state.log_history if "loss" in log]  # noqa: E731
    assert losses(trainer_b) == losses(trainer_a)  # the history up to the checkpoint comes from it


def test_save_model_writes_the_pruned_model_which_converts_and_loads(full_run, tmp_path):
    trainer, pruner, _, _ = full_run
    trainer.save_model(str(tmp_path / "pruned"))
    saved = load_file(tmp_path / "pruned" / "model.safetensors")
    masked = pruner.masked_state_dict()
    assert saved.keys() == tiny_bert().state_dict().keys()  # the original keys, nothing of the pruner's
    assert all(torch.equal(saved[k], masked[k]) for k in saved)
    summary = convert_checkpoint(tmp_path / "pruned", tmp_path / "sparse", format="csr")
    assert summary.converted == len(pruner.targets)
    sparse = from_pretrained(tmp_path / "sparse")
    model = trainer.model.eval()
    ids = torch.randint(0, VOCAB, (3, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_best_model_at_end_restores_the_pruner_of_that_checkpoint(tmp_path):
    trainer, pruner, _ = make_trainer(tmp_path, criterion="magnitude", eval_dataset=dataset(8),
                                      eval_strategy="steps", eval_steps=SAVE_EVERY,
                                      load_best_model_at_end=True, metric_for_best_model="loss",
                                      greater_is_better=True)  # the eval loss falls: an early checkpoint wins
    train(trainer)
    best = trainer.state.best_model_checkpoint
    state = torch.load(f"{best}/{STATE_FILE}", weights_only=True)
    assert pruner.step_count == state["pruner"]["step"] < STEPS
    assert all(torch.equal(pruner.masks[k], m) for k, m in state["pruner"]["masks"].items())
    saved = load_file(f"{best}/model.safetensors")
    assert all(torch.equal(t.module.weight, saved[f"{t.name}.weight"]) for t in pruner.targets)


def test_misuse_is_a_clear_error(full_run, tmp_path):
    trainer, _, _ = make_trainer(tmp_path / "a")
    with pytest.raises(ValueError, match="another model than trainer.model"):
        add_pruning(trainer, Pruner(tiny_bert(), sparsity=0.5))
    with pytest.raises(TypeError, match="takes a prune.Pruner"):
        PruningCallback(trainer.model)
    add_pruning(trainer, trainer.callback_handler.callbacks[0].pruner)  # the same pruner twice
    with pytest.raises(RuntimeError, match="at step 2 after Trainer step 1: was it stepped elsewhere too"):
        train(trainer)
    _, _, _, out = full_run  # a checkpoint without the pruner's file
    shutil.copytree(out / "checkpoint-3", tmp_path / "b" / "checkpoint-3",
                    ignore=shutil.ignore_patterns(STATE_FILE))
    trainer, _, _ = make_trainer(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not written with a PruningCallback"):
        train(trainer, resume_from_checkpoint=True)


def test_resuming_from_outside_output_dir_is_refused_when_output_dir_holds_another_run(full_run, tmp_path):
    _, _, _, out = full_run
    other = tmp_path / "checkpoint-6"  # "another run" at the same step: its unpruned tensors differ
    shutil.copytree(out / "checkpoint-6", other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 1 if "bias" in k else v for k, v in weights.items()}, other / "model.safetensors")
    trainer, _, _ = make_trainer(tmp_path)
    with pytest.raises(RuntimeError, match="resumed from another checkpoint than"):
        train(trainer, resume_from_checkpoint=str(out / "checkpoint-6"))


# ---- DistillationTrainer: the teacher is the dense model, copied before the pruner masks it ----------------

def make_distilling_trainer(out, **overrides):
    from prune import Distiller
    from prune.integrations import DistillationTrainer

    model = tiny_bert()
    distiller = Distiller(model, temperature=2.0, hidden={"bert.encoder.layer.1": "bert.encoder.layer.1"})
    pruner = Pruner(model, sparsity=SCHEDULE, criterion="movement", exclude="classifier")
    settings = dict(max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    learning_rate=2e-3, save_steps=SAVE_EVERY, logging_steps=1, seed=0, use_cpu=True,
                    report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    args = TrainingArguments(str(out), **{**settings, **overrides})
    trainer = DistillationTrainer(distiller, model=model, args=args, train_dataset=dataset())
    add_pruning(trainer, pruner)
    return trainer, pruner


def test_distillation_logs_its_terms_and_resumes_bit_identically(tmp_path):
    trainer_a, pruner_a = make_distilling_trainer(tmp_path / "a")
    train(trainer_a)
    logs = [log for log in trainer_a.state.log_history if "loss" in log]
    assert len(logs) == STEPS and all({"distill/task", "distill/logits", "distill/hidden"} <= set(log) for log in logs)
    assert logs[0]["distill/logits"] == pytest.approx(0.0, abs=1e-3)  # still the teacher at step 1 (dropout aside)
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    trainer_b, pruner_b = make_distilling_trainer(tmp_path / "b")
    train(trainer_b, resume_from_checkpoint=True)
    a, b = trainer_a.model.state_dict(), trainer_b.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(pruner_a.state_dict()["masks"][k], m) for k, m in pruner_b.state_dict()["masks"].items())


def test_distillation_under_gradient_accumulation_steps_on_the_mean_over_micro_batches(tmp_path):
    """Two micro-batches of 4 take the same SGD step as one batch of 8 (no dropout: the same forward)."""
    weights = []
    for batch, accumulate in ((8, 1), (4, 2)):
        trainer, _ = make_distilling_trainer(tmp_path / f"b{batch}", max_steps=1, per_device_train_batch_size=batch,
                                             gradient_accumulation_steps=accumulate, optim="sgd", learning_rate=0.5,
                                             save_strategy="no")
        trainer.model.config.hidden_dropout_prob = trainer.model.config.attention_probs_dropout_prob = 0.0
        for module in trainer.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        train(trainer)
        weights.append(trainer.model.state_dict())
    one, two = weights
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-6) for k in one)
    assert not torch.equal(one["classifier.bias"], tiny_bert().classifier.bias)  # the step moved the weights
