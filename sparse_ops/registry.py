"""The one table of weight formats, name -> container class: every list of formats (conversion, layers, the
plan, benchmarks) derives from it. Lossless formats (``sparse_ops.formats``) and the int8 ones
(``sparse_ops.quantized``, ``QUANTIZED``: stored only when asked for).

Example:
    >>> list(FORMATS)
    ['csr', '2:4', 'dense-int8', 'csr-int8', 'bitmap-int8']
    >>> LOSSLESS, QUANTIZED
    (('csr', '2:4'), ('dense-int8', 'csr-int8', 'bitmap-int8'))
"""
from __future__ import annotations

from sparse_ops.errors import UserValueError
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.quantized import BitmapInt8, CSRInt8, DenseInt8

FORMATS: dict[str, type] = {c.format: c for c in (CSR, TwoFour, DenseInt8, CSRInt8, BitmapInt8)}
LOSSLESS: tuple[str, ...] = tuple(name for name, c in FORMATS.items() if not c.QUANTIZED)
AUTO = "auto"  # a format argument meaning: per tensor, whichever format stores it smallest
QUANTIZED: tuple[str, ...] = tuple(name for name, c in FORMATS.items() if c.QUANTIZED)


def format_class(name: str) -> type:
    """The container class for a format name; ValueError listing the known names otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UserValueError(f"unknown sparse format {name!r}; known: {', '.join(FORMATS)}") from None
