"""prune: prune PyTorch models while they train (the upper layer; formats, kernels and loading are in sparse_ops).

The public API (``__all__``): :class:`Pruner` (wrap a model, ``step()`` after each optimizer step,
``finalize()``); the sparsity schedules :class:`Constant` (one-shot), :class:`LinearRamp`, :class:`CubicRamp`
(Zhu & Gupta) and :class:`ExponentialRamp`, all :class:`Schedule`; :func:`find_targets` (which weights a pruner
takes, from include/exclude module name patterns); :func:`sparsity_report` (any model's per-layer sparsity);
:func:`oneshot` (prune a pretrained model from calibration data: SparseGPT, Wanda, magnitude, OWL; returns the
model and a :class:`OneShotReport`); :func:`perplexity` (a causal LM's perplexity on token ids, in windows);
:class:`Recipe` and :func:`load_recipe` (a run's settings in a YAML or TOML file: ``Pruner.from_recipe``);
:class:`Distiller` (learn from a teacher while pruning: KL on logits at a temperature, hidden-state distances,
mixed with the task loss).
The Hugging Face ``Trainer`` callback is in :mod:`prune.integrations`.

Example:
    >>> from torch import nn
    >>> from prune import Pruner, CubicRamp
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.5, begin_step=0, end_step=10, every=5))
"""
__version__ = "0.2.0"

from sparse_ops.lazy import lazy_exports

# public name -> the module that defines it, imported on first use (`prune --version` does not load torch)
_EXPORTS = {"Pruner": "prune.pruner", "Schedule": "prune.schedules", "Constant": "prune.schedules",
            "LinearRamp": "prune.schedules", "CubicRamp": "prune.schedules", "ExponentialRamp": "prune.schedules",
            "find_targets": "prune.targets", "Target": "prune.targets", "sparsity_report": "prune.report",
            "SparsityReport": "prune.report", "oneshot": "prune.one_shot.run", "OneShotReport": "prune.one_shot.run",
            "OneShotConfig": "prune.one_shot.config",
            "perplexity": "prune.evaluate", "Recipe": "prune.recipe", "load_recipe": "prune.recipe",
            "Distiller": "prune.distill"}
__all__ = [*_EXPORTS, "__version__"]


def _renamed(name: str) -> object:  # prune.Linear / Cubic / Exponential: renamed, with a warning
    from prune.schedules import deprecated_name

    return deprecated_name(__name__, name)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), fallback=_renamed)
