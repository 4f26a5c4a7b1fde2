"""Prune while the Hugging Face ``Trainer`` trains: a callback that steps the pruner, checkpoints and logs it.

:class:`PruningCallback` calls ``pruner.step()`` at every ``on_step_end``, which the Trainer calls after
``optimizer.step()``, the learning-rate scheduler and ``zero_grad()``, once per optimizer step (not per
micro-batch under gradient accumulation); movement scores accumulate during every backward through the
pruner's own autograd function, so they do not depend on where ``zero_grad`` runs (nor on gradient clipping,
which only changes ``.grad``).

At every checkpoint it writes :data:`STATE_FILE` into the checkpoint folder: the pruner's
:meth:`~prune.Pruner.state_dict` and the dense weights behind the masks
(``...parametrizations.weight.original``), which the folder's ``model.safetensors`` does not hold: the
pruner's ``save_pretrained`` writes the masked weights under their original keys there, so each checkpoint
folder, and the folder ``trainer.save_model()`` writes, is a plain pruned model that ``prune convert`` and
``from_pretrained`` read. ``trainer.train(resume_from_checkpoint=...)`` then restores the dense weights,
masks, scores and step from the file in ``<output_dir>/checkpoint-<step>`` (a callback does not see the path
given to ``train``; it checks that the Trainer loaded that folder). Every log gets ``sparsity`` (of the pruned
weights, measured) and ``target_sparsity`` (the schedule's).

Example:
    >>> import contextlib, io, tempfile, torch
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from prune import LinearRamp, Pruner
    >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                     intermediate_size=32, max_position_embeddings=16)
    >>> model = BertForSequenceClassification(config)
    >>> data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
    ...                          logging_steps=2, save_strategy="no", report_to="none", disable_tqdm=True)
    >>> pruner = Pruner(model, sparsity=LinearRamp(0.0, 0.5, begin_step=0, end_step=4, every=2))
    >>> trainer = Trainer(model=model, args=args, train_dataset=data)
    >>> callback = add_pruning(trainer, pruner)
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its logs
    ...     _ = trainer.train()
    >>> [(log["step"], log["target_sparsity"]) for log in trainer.state.log_history if "loss" in log]
    [(2, 0.25), (4, 0.5)]
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors import safe_open
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from prune.pruner import Pruner
from sparse_ops.errors import MissingPathError, MisuseError, UserTypeError, UserValueError

STATE_FILE = "pruner.pt"  # in each checkpoint folder; read back with weights_only=True
STATE_VERSION = 1
_DENSE = ".parametrizations."  # the state-dict keys of the dense weights behind the masks


class PruningCallback(TrainerCallback):
    """Steps, checkpoints, restores and logs a :class:`~prune.Pruner` inside ``Trainer.train()``.

    Build the pruner on the model before the ``Trainer``; pass ``callbacks=[PruningCallback(pruner)]`` or
    call :func:`add_pruning` (which also puts ``sparsity`` in front of the loggers of ``report_to``).
    Example: see the module docstring.
    """

    def __init__(self, pruner: Pruner) -> None:
        if not isinstance(pruner, Pruner):
            raise UserTypeError(f"PruningCallback takes a prune.Pruner, got {type(pruner).__name__}")
        self.pruner = pruner

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        _check_model(self.pruner, kwargs.get("model", self.pruner.model))
        if state.is_hyper_param_search:
            raise UserValueError("PruningCallback does not support hyperparameter search (each trial needs its "
                             "own model and pruner)")
        if state.global_step == self.pruner.step_count:
            return  # a fresh run, or a pruner the caller already restored
        if state.global_step == 0:
            raise MisuseError(f"the pruner has taken {self.pruner.step_count} steps but training starts at "
                               "step 0; build a new Pruner for a new run, or resume from a checkpoint")
        folder = checkpoint_folder(args, state.global_step)
        if not os.path.isdir(folder):
            raise MissingPathError(f"resuming at step {state.global_step}: the pruner's state is read "
                                    f"from {folder}, which does not exist; resume from a checkpoint in the "
                                    "Trainer's output_dir")
        _check_same_checkpoint(folder, self.pruner.model)
        load_pruner_state(self.pruner, folder)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.pruner.step()
        if self.pruner.step_count != state.global_step:
            raise MisuseError(f"the pruner is at step {self.pruner.step_count} after Trainer step "
                               f"{state.global_step}: was it stepped elsewhere too, or added twice? Step it "
                               "only through this callback")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.should_save:
            save_pruner_state(self.pruner, checkpoint_folder(args, state.global_step))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None,
               **kwargs):
        values = {"sparsity": self.pruner.report().sparsity, "target_sparsity": self.pruner.target_sparsity}
        if logs is not None:
            logs.update(values)
        # the Trainer appended a copy of these logs to its history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            load_pruner_state(self.pruner, state.best_model_checkpoint)  # the Trainer just loaded its weights


def add_pruning(trainer: Trainer, pruner: Pruner) -> PruningCallback:
    """Add a :class:`PruningCallback` for ``pruner`` to ``trainer`` and return it.

    It goes first in the Trainer's list of callbacks (the ``Trainer`` puts the loggers of ``report_to`` before
    the ``callbacks=`` it is given), so TensorBoard, W&B and the others log ``sparsity`` and
    ``target_sparsity`` too. Example: see the module docstring.
    """
    _check_model(pruner, trainer.model)
    callback = PruningCallback(pruner)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def checkpoint_folder(args: TrainingArguments, step: int) -> str:
    """Where the Trainer writes the checkpoint of ``step``: ``<output_dir>/checkpoint-<step>``."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def save_pruner_state(pruner: Pruner, folder: str | os.PathLike) -> str:
    """Write ``folder/pruner.pt`` atomically: the pruner's state and the dense weights behind its masks.

    Returns the file's path. The file holds only tensors and plain data (read with ``weights_only=True``).
    """
    if not os.path.isdir(folder):
        raise MissingPathError(f"checkpoint folder {os.fspath(folder)!r} does not exist")
    state = {"version": STATE_VERSION, "pruner": pruner.state_dict(),
             "dense": {k: v for k, v in pruner.model.state_dict().items() if _DENSE in k}}
    path = os.path.join(folder, STATE_FILE)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_pruner_state(pruner: Pruner, folder: str | os.PathLike) -> None:
    """Restore what :func:`save_pruner_state` wrote into ``folder`` (dense weights, masks, scores, step)."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise MissingPathError(f"{path} does not exist: the checkpoint was not written with a "
                                "PruningCallback (resume from a checkpoint the callback saved)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UserValueError(f"{path}: not a pruner state of version {STATE_VERSION}")
    dense = state["dense"]
    expected = sorted(k for k in pruner.model.state_dict() if _DENSE in k)
    if sorted(dense) != expected:
        raise UserValueError(f"{path} holds dense weights for {sorted(dense)[:4]}..., this pruner's model has "
                         f"{expected[:4]}...: not a checkpoint of this model and pruner")
    pruner.load_state_dict(state["pruner"])  # checks settings, names and shapes first
    pruner.model.load_state_dict(dense, strict=False)


def _check_model(pruner: Pruner, model: nn.Module) -> None:
    if model is not pruner.model:
        raise UserValueError("the pruner was built on another model than trainer.model; build it on the model "
                         "you pass to the Trainer")


def _check_same_checkpoint(folder: str, model: nn.Module) -> None:
    """The Trainer loaded the model from the checkpoint it resumes; check it is ``folder`` (which the callback
    found from ``output_dir`` and the step) by comparing the smallest tensor both hold."""
    path = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return  # a sharded or non-safetensors checkpoint: nothing cheap to compare
    live = model.state_dict()
    with safe_open(path, framework="pt") as f:
        # weights the pruner does not mask (biases, norms), which change as the model trains
        shared = [k for k in f.keys() if k in live and live[k].is_floating_point()]
        if not shared:
            return
        key = min(shared, key=lambda k: live[k].numel())
        if not torch.equal(f.get_tensor(key).to(live[key]), live[key]):  # as the Trainer loaded it
            raise MisuseError(f"the Trainer resumed from another checkpoint than {folder} ({key} differs), "
                               "where the callback finds the pruner's state: resume from a checkpoint in the "
                               "Trainer's output_dir")
