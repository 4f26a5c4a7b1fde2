"""Recipes: a pruning run's settings as data, read from and written to YAML or TOML files.

A recipe holds the settings of a :class:`~prune.Pruner` (all but the model and ``process_group``), of a
one-shot run, or both:

- ``schedule`` (required unless ``oneshot`` is given): a table with ``kind``, a name in :data:`prune.schedules.SCHEDULES`, and that
  schedule's arguments (``final`` required; ``initial``, ``begin_step``, ``end_step``, ``every`` where the
  kind takes them);
- ``criterion``: a name in :data:`prune.criteria.CRITERIA`; ``pattern``: ``"unstructured"`` or ``"N:M"``;
  ``scope``: one of :data:`prune.masks.SCOPES`; ``max_layer_sparsity`` (with ``scope: global``);
- ``types``: module type names (:func:`module_types`; default: ``Linear`` and transformers' ``Conv1D``);
  ``include``, ``exclude``: module name patterns (``prune.targets``), a string or a list;
- ``distill`` (optional): a table of :class:`~prune.Distiller` settings, the teacher's losses to train with
  (``temperature``, ``logits_weight``, ``hidden``: a table of student to teacher module names or a list of
  names, ``hidden_loss``, ``hidden_weight``, ``task_weight``; ``Distiller.from_recipe``);
- ``oneshot`` (optional): a table of one-shot settings, the fields of
  :class:`~prune.one_shot.config.OneShotConfig` by name (``method``, ``sparsity``, ``pattern``, ``samples`` ...;
  :func:`oneshot_config`), which ``prune.oneshot(model, calibration, recipe.oneshot)`` and
  ``prune oneshot --recipe FILE`` take.

Unknown keys, unknown names and bad values raise ``ValueError`` naming the key, the value and what is allowed.
Files are read with ``yaml.safe_load`` (PyYAML; duplicate keys refused) or ``tomllib``; a recipe compares
equal to another with the same settings, so ``pruner.to_recipe() == load_recipe(path)`` checks a run.

Example:
    >>> recipe = Recipe.from_dict({"criterion": "movement", "exclude": ["classifier"],
    ...     "schedule": {"kind": "CubicRamp", "final": 0.9, "begin_step": 10, "end_step": 100, "every": 10}})
    >>> recipe.schedule
    CubicRamp(initial=0.0, final=0.9, begin_step=10, end_step=100, every=10)
    >>> Recipe.from_dict(recipe.to_dict()) == recipe
    True
    >>> Recipe.from_dict({"oneshot": {"method": "wanda", "pattern": "2:4"}}).oneshot.resolved()
    (NMPattern(n=2, m=4), 0.5, 'row')
    >>> Recipe.from_dict({"schedule": {"kind": "Cubic2", "final": 0.5}})
    Traceback (most recent call last):
    ...
    sparse_ops.errors.UserValueError: recipe key 'schedule.kind': unknown value 'Cubic2'; allowed: ['Constant', 'CubicRamp', ...]
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

from torch import nn

from prune import criteria as _criteria
from prune import distill_settings as _distill_mod
from prune import masks as _masks
from prune.one_shot.config import OneShotConfig
from prune.schedules import SCHEDULES, Schedule
from prune.targets import INPUT_DIM
from sparse_ops.errors import UserValueError

HF_CONV1D = "Conv1D"  # transformers' GPT-2 linear layer, imported only when a recipe names it
SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}


def module_types() -> list[str]:
    """The names a recipe's ``types`` may use: the module types ``prune.targets`` knows, and ``Conv1D``.

    >>> module_types()
    ['Bilinear', 'Conv1D', 'Conv1d', 'Conv2d', 'Conv3d', 'Embedding', 'Linear']
    """
    return sorted([*(cls.__name__ for cls in INPUT_DIM), HF_CONV1D])


def _module_type(name: str) -> type[nn.Module]:
    if name == HF_CONV1D:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    return next(cls for cls in INPUT_DIM if cls.__name__ == name)


def _type_name(cls: type) -> str:
    """Inverse of ``_module_type``; ValueError for a type a recipe cannot name."""
    if cls.__name__ == HF_CONV1D and cls.__module__.startswith("transformers"):
        return HF_CONV1D
    if cls in INPUT_DIM:
        return cls.__name__
    raise UserValueError(f"module type {cls.__module__}.{cls.__qualname__} has no name in recipes; "
                     f"allowed: {module_types()}")


def _bad(key: str, value: object, allowed: object) -> UserValueError:
    return UserValueError(f"recipe key {key!r}: unknown value {value!r}; allowed: {allowed}")


def _check_choice(key: str, value: object, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise _bad(key, value, list(allowed))


def _names(key: str, value: object, none_ok: bool) -> tuple[str, ...] | None:
    """A string or a list of non-empty strings (``None`` where allowed), as a tuple."""
    if value is None and none_ok:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) and v for v in items):
        what = ("a string, a list of non-empty strings or null" if none_ok
                else "a string or a list of non-empty strings")
        raise UserValueError(f"recipe key {key!r}: expected {what}, got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class Recipe:
    """A pruning run's settings; defaults are :class:`~prune.Pruner`'s. Lists are kept as tuples.

    Example: see the module docstring.
    """

    schedule: Schedule | None = None
    criterion: str = "magnitude"
    pattern: str = "unstructured"
    scope: str = "layer"
    types: tuple[str, ...] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    max_layer_sparsity: float | None = None
    distill: dict[str, object] | None = None
    oneshot: OneShotConfig | None = None

    def __post_init__(self) -> None:
        if self.schedule is None and self.oneshot is None:
            raise UserValueError(_MISSING_SCHEDULE)
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise UserValueError(f"recipe key 'schedule': expected a prune.schedules.Schedule, "
                             f"got {self.schedule!r}")
        _check_choice("criterion", self.criterion, sorted(_criteria.CRITERIA))
        if not isinstance(self.pattern, str):  # YAML 1.1 reads an unquoted 2:4 as the number 124
            raise UserValueError(f"recipe key 'pattern': expected a string, 'unstructured' or 'N:M' (quote it in "
                             f"YAML: unquoted, 2:4 is the number 124), got {self.pattern!r}")
        try:
            nm = _masks.parse_pattern(self.pattern)
        except ValueError as e:
            raise UserValueError(f"recipe key 'pattern': {e}") from None
        object.__setattr__(self, "pattern", str(nm) if nm else "unstructured")
        _check_choice("scope", self.scope, _masks.SCOPES)
        object.__setattr__(self, "types", _names("types", self.types, none_ok=True))
        for name in self.types or ():
            _check_choice("types", name, module_types())
        object.__setattr__(self, "include", _names("include", self.include, none_ok=True))
        object.__setattr__(self, "exclude", _names("exclude", self.exclude, none_ok=False))
        mls = self.max_layer_sparsity
        if mls is not None and (isinstance(mls, bool) or not isinstance(mls, (int, float))):
            raise UserValueError(f"recipe key 'max_layer_sparsity': expected a number in (0, 1] or null, "
                             f"got {mls!r}")
        try:
            _masks.check_scope(self.scope, nm, mls)
        except ValueError as e:
            raise UserValueError(f"recipe keys 'scope', 'pattern', 'max_layer_sparsity': {e}") from None
        if self.distill is not None:
            object.__setattr__(self, "distill", _distill(self.distill))
        if self.oneshot is not None:
            object.__setattr__(self, "oneshot", oneshot_config(self.oneshot))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Recipe:
        """A recipe from parsed YAML/TOML (or any mapping); strict: see the module docstring."""
        if not isinstance(data, Mapping):
            raise UserValueError(f"a recipe is a mapping of settings, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise UserValueError(f"unknown recipe key {unknown[0]!r}; allowed keys: {allowed}")
        if data.get("schedule") is None and data.get("oneshot") is None:  # None: as to_dict writes it
            raise UserValueError(_MISSING_SCHEDULE)
        schedule = None if data.get("schedule") is None else _schedule(data["schedule"])
        return cls(**{**data, "schedule": schedule})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Plain data (lists, numbers, strings, None), the inverse of :meth:`from_dict`."""
        return {"criterion": self.criterion, "schedule": None if self.schedule is None else self.schedule.to_dict(),
                "pattern": self.pattern,
                "scope": self.scope, "types": _list(self.types), "include": _list(self.include),
                "exclude": list(self.exclude), "max_layer_sparsity": self.max_layer_sparsity,
                "distill": None if self.distill is None else {**self.distill, "hidden": dict(self.distill["hidden"])},
                "oneshot": None if self.oneshot is None else oneshot_table(self.oneshot)}

    def pruner_kwargs(self) -> dict[str, object]:
        """The keyword arguments of ``Pruner(model, **kwargs)`` (``types`` as classes); UserValueError for a
        recipe without a ``schedule`` (one-shot settings only)."""
        if self.schedule is None:
            raise UserValueError("this recipe has no 'schedule', only one-shot settings ('oneshot'); a Pruner "
                                 "needs a schedule table")
        types = None if self.types is None else tuple(_module_type(n) for n in self.types)
        return {"sparsity": self.schedule, "criterion": self.criterion, "pattern": self.pattern,
                "scope": self.scope, "types": types, "include": _list(self.include),
                "exclude": list(self.exclude), "max_layer_sparsity": self.max_layer_sparsity}

    def save(self, path: str | os.PathLike) -> None:
        """Write the recipe as YAML (``.yaml``/``.yml``) or TOML (``.toml``), atomically; unset (None) keys
        are left out."""
        path = Path(path)
        text = (_to_yaml if _format(path) == "yaml" else _to_toml)(
            {k: v for k, v in self.to_dict().items() if v is not None})
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


_MISSING_SCHEDULE = (f"recipe key 'schedule' is missing: a table with 'kind' (one of {sorted(SCHEDULES)}) and the "
                     "schedule's arguments (or give a 'oneshot' table for one-shot settings only)")


def oneshot_config(spec: object) -> OneShotConfig:
    """A recipe's ``oneshot`` table as a :class:`~prune.one_shot.config.OneShotConfig`: its keys are the config's
    field names (lists become tuples); an unknown key or a bad value raises UserValueError naming the key and
    what is allowed. A config is returned as it is.

    >>> oneshot_config({"method": "wanda", "sparsity": 0.6, "exclude": ["lm_head"]}).exclude
    ('lm_head',)
    >>> oneshot_config({"method": "wanda", "samples_per_batch": 4})
    Traceback (most recent call last):
    ...
    sparse_ops.errors.UserValueError: recipe key 'oneshot.samples_per_batch': not a one-shot setting; allowed: ['method', ...]
    """
    if isinstance(spec, OneShotConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise UserValueError(f"recipe key 'oneshot': expected a table of one-shot settings, got {spec!r}")
    allowed = [f.name for f in fields(OneShotConfig)]
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise UserValueError(f"recipe key 'oneshot.{unknown[0]}': not a one-shot setting; allowed: {allowed}")
    if "pattern" in spec and not isinstance(spec["pattern"], str):  # YAML 1.1 reads an unquoted 2:4 as 124
        raise UserValueError(f"recipe key 'oneshot.pattern': expected a string, 'unstructured' or 'N:M' (quote "
                             f"it in YAML), got {spec['pattern']!r}")
    try:
        return OneShotConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    except (TypeError, ValueError) as e:
        raise UserValueError(f"recipe key 'oneshot': {e}") from None


def oneshot_table(config: OneShotConfig) -> dict[str, object]:
    """The inverse of :func:`oneshot_config`: plain data (tuples as lists), unset (None) fields left out.

    >>> oneshot_config(oneshot_table(OneShotConfig(method="wanda", include=("mlp",)))) == OneShotConfig(
    ...     method="wanda", include=("mlp",))
    True
    """
    plain = {f.name: getattr(config, f.name) for f in fields(OneShotConfig)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in plain.items() if v is not None}


def _list(names: tuple[str, ...] | None) -> list[str] | None:
    return None if names is None else list(names)


RecipeSource = Union[str, os.PathLike, Recipe, Mapping]  # what Pruner.from_recipe takes


def _schedule(spec: object) -> Schedule:
    """A schedule from ``{"kind": name, **arguments}``, its arguments checked against the kind's signature."""
    if not isinstance(spec, Mapping):
        raise UserValueError(f"recipe key 'schedule': expected a table with 'kind' and arguments, got {spec!r}")
    args = dict(spec)
    kind = args.pop("kind", None)
    _check_choice("schedule.kind", kind, sorted(SCHEDULES))
    params = list(inspect.signature(SCHEDULES[kind]).parameters)
    unknown = [k for k in args if k not in params]
    if unknown:
        raise UserValueError(f"recipe key 'schedule.{unknown[0]}': not an argument of {kind}; allowed: {params}")
    if "final" not in args:
        raise UserValueError(f"recipe key 'schedule.final' is missing: the final sparsity of the {kind} schedule")
    try:
        return SCHEDULES[kind](**args)
    except (TypeError, ValueError) as e:
        raise UserValueError(f"recipe key 'schedule' ({kind}): {e}") from None


def _distill(spec: object) -> dict[str, object]:
    """The ``distill`` table checked against the Distiller's settings (all of them, defaults filled in)."""
    if not isinstance(spec, Mapping):
        raise UserValueError(f"recipe key 'distill': expected a table of Distiller settings, got {spec!r}")
    unknown = [k for k in spec if k not in _distill_mod.SETTINGS]
    if unknown:
        raise UserValueError(f"recipe key 'distill.{unknown[0]}': not a Distiller setting; allowed: "
                         f"{list(_distill_mod.SETTINGS)}")
    try:
        return _distill_mod.check_settings(**spec)
    except ValueError as e:
        raise UserValueError(f"recipe key 'distill': {e}") from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe file (``.yaml``, ``.yml`` or ``.toml``); errors name the file and the key.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "run.toml"
    >>> _ = path.write_text('[schedule]\\nkind = "LinearRamp"\\nfinal = 0.5\\nend_step = 10\\n')
    >>> load_recipe(path).schedule
    LinearRamp(initial=0.0, final=0.5, begin_step=0, end_step=10, every=1)
    """
    path = Path(path)
    fmt = _format(path)
    text = path.read_text()
    try:
        data = _parse_yaml(text) if fmt == "yaml" else _parse_toml(text)
        return Recipe.from_dict(data)
    except ValueError as e:
        raise UserValueError(f"{path}: {e}") from None


def as_recipe(source: RecipeSource) -> Recipe:
    """A :class:`Recipe` itself, one from a mapping, or one read from a file path."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return Recipe.from_dict(source)
    return load_recipe(source)


def recipe_of(schedule: Schedule, criterion: _criteria.Criterion, pattern: str, scope: str,
              types: tuple[type, ...] | None, include: tuple[str, ...] | str | None,
              exclude: tuple[str, ...] | str | None, max_layer_sparsity: float | None,
              distill: Mapping[str, object] | None = None) -> Recipe:
    """The recipe of a pruner built with these settings (``Pruner.to_recipe``); ValueError for settings a
    recipe cannot name (a criterion instance that is not registered, a module type outside
    :func:`module_types`)."""
    if _criteria.CRITERIA.get(criterion.name) != criterion:  # a registered one, same settings
        raise UserValueError(f"criterion {criterion!r} is not registered in prune.criteria, so a recipe "
                         f"cannot name it; registered: {sorted(_criteria.CRITERIA)}")
    return Recipe(schedule=schedule, criterion=criterion.name, pattern=pattern, scope=scope,
                  types=None if types is None else tuple(_type_name(t) for t in types),
                  include=include, exclude=exclude, max_layer_sparsity=max_layer_sparsity, distill=distill)


def _format(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise UserValueError(f"recipe file {str(path)!r}: unknown suffix {path.suffix!r}; "
                         f"allowed: {sorted(SUFFIXES)}")
    return SUFFIXES[path.suffix]


def _parse_yaml(text: str) -> object:
    import yaml  # a dependency of the package

    class StrictLoader(yaml.SafeLoader):  # safe_load's loader, refusing duplicate keys
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise UserValueError(f"recipe key {dup!r} appears twice")
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise UserValueError(f"not valid YAML: {e}") from None


def _parse_toml(text: str) -> object:
    try:
        import tomllib
    except ImportError:  # Python 3.10: tomli, a dependency there
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserValueError(f"not valid TOML: {e}") from None


def _to_yaml(data: dict[str, object]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _toml_value(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # an inline table (distill.hidden)
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # strings (JSON escapes are TOML's), ints and finite floats read the same in TOML


def _to_toml(data: dict[str, object]) -> str:
    """TOML for a recipe's data: scalars and lists first, then each table (``[schedule]``)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for k, table in data.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{k}]", *(f"{kk} = {_toml_value(vv)}" for kk, vv in table.items())]
    return "\n".join(lines) + "\n"
