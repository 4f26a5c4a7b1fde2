"""Integrations with training frameworks; each module imports its framework only when it is used.

- :class:`PruningCallback` and :func:`add_pruning` (``prune.integrations.trainer``): prune while the Hugging
  Face ``Trainer`` trains, with the pruner's state in every checkpoint folder.

``accelerate`` needs no adapter: build the :class:`~prune.Pruner` before ``Accelerator.prepare`` and call
``pruner.step()`` when ``accelerator.sync_gradients`` (README, "Inside an accelerate loop").

Example:
    >>> from prune.integrations import PruningCallback
    >>> PruningCallback.__mro__[1].__name__
    'TrainerCallback'
"""
import importlib

# public name -> the module that defines it, imported on first use (importing this package loads no framework)
_EXPORTS = {"PruningCallback": "prune.integrations.trainer", "add_pruning": "prune.integrations.trainer",
            "STATE_FILE": "prune.integrations.trainer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
