"""The errors that mean "you passed something we cannot use": every one is a :class:`UserError`.

The ``prune`` command prints a ``UserError`` as one line and exits with status 2; anything else is a bug (ours or
a library's) and keeps its traceback. Each class also derives from the built-in error a Python user expects
(``except ValueError`` still catches a bad value), and names it: what was bad, and what is allowed.

Example:
    >>> try:
    ...     raise UserValueError("sparsity must be in [0, 1), got 1.5")
    ... except ValueError as e:
    ...     isinstance(e, UserError)
    True
"""
from __future__ import annotations


class UserError(Exception):
    """Base of the errors caused by what the user passed (a value, a path, a call order, an environment)."""


class UserValueError(UserError, ValueError):
    """A value out of its allowed range or set."""


class UserTypeError(UserError, TypeError):
    """An argument of the wrong kind."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NotAFolderError(UserError, NotADirectoryError):
    """A path that should be a folder is a file."""


class MissingPackageError(UserError, ImportError):
    """An optional package this call needs is not installed."""


class UnavailableError(UserError, RuntimeError):
    """This machine or process lacks what the call needs (a compiler, CUDA, triton, the native kernels)."""


class MisuseError(UserError, RuntimeError):
    """A call out of order (``step()`` after ``finalize()``) or on data that cannot serve it."""


class UnsupportedError(UserError, NotImplementedError):
    """A combination the library does not implement (a format on a device, a dtype for a kernel)."""


class OutputExistsError(UserError, FileExistsError, ValueError):
    """An output that exists and may not be replaced (no ``overwrite``), or was claimed by another writer."""
