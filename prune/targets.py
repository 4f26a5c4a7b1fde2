"""Which weights a `Pruner` prunes: module types, then include/exclude patterns on module names.

A pattern is a glob (``fnmatch``, case-sensitive) matched against a module's qualified name or any dotted suffix
of it, and it covers that module's whole subtree, the way llm-compressor's ``ignore=`` and PEFT's
``target_modules`` read: ``"pooler"`` covers ``bert.pooler.dense``, ``"attention"`` every projection under each
``...attention`` module, ``"encoder.*"`` everything below ``encoder``, ``"classifier"`` the ``bert.classifier``
layer. A single string is one pattern (not a list of characters).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    >>> model.add_module("head", nn.Linear(4, 2))
    >>> [t.name for t in find_targets(model, exclude="head")]
    ['encoder.0', 'encoder.1']
    >>> [t.name for t in find_targets(model, include=["encoder"], exclude=["1"])]
    ['encoder.0']
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from sparse_ops.errors import UserTypeError, UserValueError

# Which dimension of each module type's weight is its input dimension (N:M groups run along it).
INPUT_DIM: dict[type[nn.Module], int] = {
    nn.Linear: 1, nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1, nn.Embedding: 1, nn.Bilinear: 2,
}
_EXAMPLES = 6  # prunable module names an error message shows


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def input_dim(module: nn.Module) -> int:
    """Index of the input dimension of ``module.weight`` (0 for transformers' transposed ``Conv1D``)."""
    if is_hf_conv1d(module):
        return 0
    for cls in type(module).__mro__:
        if cls in INPUT_DIM:
            return INPUT_DIM[cls]
    return 1 if module.weight.dim() > 1 else 0


def _default_type(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def matches(name: str, pattern: str) -> bool:
    """``pattern`` against the module name or any dotted suffix ("classifier" matches "bert.classifier").

    >>> matches("bert.classifier", "classifier"), matches("bert.classifier", "class")
    (True, False)
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def covers(name: str, pattern: str) -> bool:
    """``pattern`` matches the module ``name`` or one of its ancestors (a pattern covers a subtree).

    >>> covers("bert.pooler.dense", "pooler"), covers("bert.encoder.layer.0", "pooler")
    (True, False)
    """
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _patterns(kind: str, patterns: str | Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise UserTypeError(f"{kind} must be a module name pattern or a list of them (non-empty strings), got {bad!r}")
    return patterns


@dataclass(frozen=True)
class Target:
    """One pruned weight: the module's qualified name, the module, and its weight's input dimension."""

    name: str
    module: nn.Module
    in_dim: int


def find_targets(
    model: nn.Module,
    types: Sequence[type[nn.Module]] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] = (),
) -> list[Target]:
    """Modules whose ``weight`` will be pruned: by type (default: ``nn.Linear`` and transformers' ``Conv1D``),
    then kept when some ``include`` pattern covers them (all when None) and no ``exclude`` pattern does.

    An include pattern that covers no module is an error, an exclude pattern that covers none a warning. Weights
    shared with another module (an output layer tied to the embeddings) are skipped with a warning.
    """
    include, exclude = _patterns("include", include), _patterns("exclude", exclude) or []
    is_type = _default_type if types is None else (lambda m: isinstance(m, tuple(types)))
    prunable = [(n, m) for n, m in model.named_modules()
                if n and is_type(m) and isinstance(getattr(m, "weight", None), nn.Parameter)]
    names = [n for n, _ in model.named_modules() if n]
    for kind, pats in (("include", include or ()), ("exclude", exclude)):
        for pat in pats:
            if not any(matches(n, pat) for n in names):
                msg = f"{kind} pattern {pat!r} matches no module name{_hint(prunable)}"
                if kind == "include":
                    raise UserValueError(msg)
                warnings.warn(msg, stacklevel=3)
    named = [(n, m) for n, m in prunable if include is None or any(covers(n, p) for p in include)]
    named = [(n, m) for n, m in named if not any(covers(n, p) for p in exclude)]
    owners: dict[int, set[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for pn, p in m.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), set()).add(f"{n}.{pn}" if n else pn)
    targets = []
    for n, m in named:
        sharers = owners.get(id(m.weight), set())
        if len(sharers) > 1:
            warnings.warn(f"not pruning {n}.weight: it is shared with {sorted(sharers - {n + '.weight'})}",
                          stacklevel=3)
            continue
        targets.append(Target(n, m, input_dim(m)))
    if not targets:
        kinds = "nn.Linear / transformers Conv1D" if types is None else ", ".join(t.__name__ for t in types)
        raise UserValueError(f"no weight to prune: no {kinds} module is covered by include={include!r} and not by "
                         f"exclude={exclude!r}{_hint(prunable)}")
    return targets


def _hint(prunable: list[tuple[str, nn.Module]]) -> str:
    """How patterns read, with a few of the model's prunable module names."""
    if not prunable:
        return "; the model has no module of the types to prune"
    shown = ", ".join(n for n, _ in prunable[:_EXAMPLES])
    more = f", ... ({len(prunable)} in all)" if len(prunable) > _EXAMPLES else ""
    return (f". A pattern matches a module name or its dotted suffix and covers the module's subtree (e.g. "
            f"'encoder', 'layer.*.attention', 'classifier'); prunable modules: {shown}{more}")
