"""The :class:`~prune.Distiller`'s settings, checked in one place: by the Distiller itself and by a recipe's
``distill`` table (:mod:`prune.recipe`), neither of which needs the other to do so.

Example:
    >>> SETTINGS
    ('temperature', 'logits_weight', 'hidden', 'hidden_loss', 'hidden_weight', 'task_weight')
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

from sparse_ops.errors import UserValueError

HIDDEN_LOSSES = ("mse", "cosine")


def check_settings(*, temperature: float = 2.0, logits_weight: float = 1.0,
                   hidden: Mapping[str, str] | Sequence[str] | None = None, hidden_loss: str = "mse",
                   hidden_weight: float = 1.0, task_weight: float = 1.0) -> dict[str, object]:
    """The Distiller's settings checked and normalised (numbers as floats; ``hidden`` as {student: teacher},
    a list of names meaning the same module in both); ValueError naming a bad value.

    >>> check_settings(hidden=["encoder.layer.0"], temperature=4)["hidden"]
    {'encoder.layer.0': 'encoder.layer.0'}
    """
    for name, value in (("temperature", temperature), ("logits_weight", logits_weight),
                        ("hidden_weight", hidden_weight), ("task_weight", task_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserValueError(f"{name} must be a number, got {value!r}")
    if not temperature > 0:
        raise UserValueError(f"temperature must be positive, got {temperature!r}")
    for name, w in (("logits_weight", logits_weight), ("hidden_weight", hidden_weight),
                    ("task_weight", task_weight)):
        if not w >= 0:
            raise UserValueError(f"{name} must be >= 0, got {w!r}")
    if hidden_loss not in HIDDEN_LOSSES:
        raise UserValueError(f"unknown hidden_loss {hidden_loss!r}; allowed: {', '.join(HIDDEN_LOSSES)}")
    if hidden is None:
        pairs = {}
    elif isinstance(hidden, Mapping):
        pairs = dict(hidden)
    elif isinstance(hidden, Sequence) and not isinstance(hidden, str):
        pairs = {n: n for n in hidden}
    else:
        raise UserValueError(f"hidden must be a mapping of student to teacher module names or a list of names, "
                         f"got {hidden!r}")
    if not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in pairs.items()):
        raise UserValueError(f"hidden names modules by non-empty strings, got {hidden!r}")
    return {"temperature": float(temperature), "logits_weight": float(logits_weight), "hidden": pairs,
            "hidden_loss": hidden_loss, "hidden_weight": float(hidden_weight), "task_weight": float(task_weight)}


SETTINGS = tuple(inspect.signature(check_settings).parameters)  # what a recipe's distill table may set
