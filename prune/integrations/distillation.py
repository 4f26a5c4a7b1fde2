"""Distillation inside the Hugging Face ``Trainer``: its loss is a :class:`~prune.Distiller`'s mix.

:class:`DistillationTrainer` is a ``Trainer`` whose ``compute_loss`` runs the distiller on each micro-batch:
the teacher without gradients, then the student, and returns the weighted mix of the task loss, the KL on
logits and the hidden-state distances. Under gradient accumulation each micro-batch's loss is a mean, which
the Trainer divides by the number of micro-batches, so a step's gradient is the mean over its micro-batches
whatever the model's own loss arguments. Each log also gets the mean of every term over the micro-batches
since the last log (``distill/task``, ``distill/logits``, ``distill/hidden``).

Under DDP (``torchrun``) the Trainer wraps the student, and the loss runs the wrapper, so gradients are
synchronised; under FSDP2 the student is sharded in place. The teacher stays replicated on every rank (see
:mod:`prune.distill`).

The teacher is not part of the Trainer's model: checkpoints hold the student alone. A frozen teacher has no
state that training changes, so resuming (with :class:`~prune.integrations.PruningCallback` for the pruner)
is bit-identical to an uninterrupted run when the teacher is built the same way (``tests/test_trainer.py``).

Example:
    >>> import contextlib, io, tempfile, torch
    >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    >>> from prune import Constant, Distiller, Pruner
    >>> from prune.integrations import add_pruning
    >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                     intermediate_size=32, max_position_embeddings=16)
    >>> model = BertForSequenceClassification(config)
    >>> distiller = Distiller(model, temperature=2.0)  # the teacher: the dense model, copied before pruning
    >>> data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
    ...                          logging_steps=2, save_strategy="no", report_to="none", disable_tqdm=True)
    >>> trainer = DistillationTrainer(distiller, model=model, args=args, train_dataset=data)
    >>> _ = add_pruning(trainer, Pruner(model, sparsity=Constant(0.5)))
    >>> with contextlib.redirect_stdout(io.StringIO()):
    ...     _ = trainer.train()
    >>> sorted(k for k in trainer.state.log_history[0] if k.startswith("distill/"))
    ['distill/logits', 'distill/task']
"""
from __future__ import annotations

from transformers import Trainer

from prune.distill import Distiller
from sparse_ops.errors import UserTypeError, UserValueError


class DistillationTrainer(Trainer):
    """A ``Trainer`` training its model with ``distiller``'s loss (see the module docstring); every other
    argument as ``Trainer``'s. The distiller's student must be the Trainer's model."""

    def __init__(self, distiller: Distiller, *args, **kwargs):
        if not isinstance(distiller, Distiller):
            raise UserTypeError(f"DistillationTrainer takes a prune.Distiller, got {type(distiller).__name__}")
        super().__init__(*args, **kwargs)
        if self.model is not distiller.student:
            raise UserValueError("the distiller's student is another model than the Trainer's; build the Distiller on "
                             "the model you pass to the Trainer")
        self.distiller = distiller
        distiller.teacher.to(next(distiller.student.parameters()).device)  # where the Trainer put the model
        self.loss_is_scaled_for_ga = False  # each micro-batch's loss is a mean: the Trainer averages them
        self._parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.distiller(inputs, student=model)  # model: the student or the Trainer's DDP wrapper of it
        if model.training:
            for name, value in out.parts.items():
                self._parts.setdefault(name, []).append(float(value))
        return (out.loss, out.output) if return_outputs else out.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: the terms since the last one
            logs.update({f"distill/{k}": sum(v) / len(v) for k, v in self._parts.items() if v})
            self._parts = {}
        super().log(logs, *args, **kwargs)
