"""Package attributes imported on first use, so that importing a package stays light (no torch, no framework).

Example:
    >>> __getattr__, __dir__ = lazy_exports("mypkg", {"sqrt": "math"}, globals_={})
    >>> __getattr__("sqrt")(9.0)
    3.0
"""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], globals_: dict[str, object],
                 fallback: Callable[[str], object] | None = None
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's ``(__getattr__, __dir__)``: ``exports`` maps a public name to the module that defines it;
    once loaded, a name becomes a plain attribute in ``globals_``. Other names go to ``fallback`` (say, a
    deprecation shim), else raise AttributeError listing the public names."""

    def __getattr__(name: str) -> object:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            globals_[name] = value
            return value
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}; public names: {', '.join(exports)}")

    def __dir__() -> list[str]:
        return sorted(set(globals_) | set(exports))

    return __getattr__, __dir__
