"""Integrations with training frameworks; each module imports its framework only when it is used.

- :class:`PruningCallback` and :func:`add_pruning` (``prune.integrations.trainer``): prune while the Hugging
  Face ``Trainer`` trains, with the pruner's state in every checkpoint folder.
- :class:`DistillationTrainer` (``prune.integrations.distillation``): a ``Trainer`` whose loss is a
  :class:`~prune.Distiller`'s (the teacher's KL and hidden-state terms mixed with the task loss).

``accelerate`` needs no adapter: build the :class:`~prune.Pruner` before ``Accelerator.prepare`` and call
``pruner.step()`` when ``accelerator.sync_gradients`` (docs/guides/training.md, "Inside an accelerate loop").

Example:
    >>> from prune.integrations import PruningCallback
    >>> PruningCallback.__mro__[1].__name__
    'TrainerCallback'
"""
from sparse_ops.lazy import lazy_exports

# public name -> the module that defines it, imported on first use (importing this package loads no framework)
_EXPORTS = {"PruningCallback": "prune.integrations.trainer", "add_pruning": "prune.integrations.trainer",
            "STATE_FILE": "prune.integrations.trainer", "DistillationTrainer": "prune.integrations.distillation"}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
