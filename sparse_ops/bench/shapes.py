"""Named linear-layer shapes, batches (tokens) and sparsities worth measuring (BENCHMARKING.md), as data.

A shape is a weight (out, in) as ``F.linear`` takes it; on the command line ``OUTxIN`` (M x K: M outputs,
K inputs) or a set name from ``SHAPE_SETS``.

Example:
    >>> [s.label for s in shapes(["square-4096"])]
    ['llama-7b attn 4096->4096']
    >>> shapes(["256x512"])[0].in_features
    512
    >>> shapes(["bert"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparse_ops.errors.UserValueError: unknown shape 'bert': use OUTxIN (e.g. 4096x11008) or a set name: bert-base, llama-7b, ...
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sparse_ops.errors import UserValueError


@dataclass(frozen=True)
class LinearShape:
    """A weight of shape (out_features, in_features) as used by ``F.linear``."""

    name: str
    in_features: int
    out_features: int

    @property
    def label(self) -> str:
        """'bert-base attn 768->768' (in -> out); a literal OUTxIN shape has no name: '512->256'."""
        io = f"{self.in_features}->{self.out_features}"
        return f"{self.name} {io}" if self.name else io


SHAPE_SETS: dict[str, tuple[LinearShape, ...]] = {
    "bert-base": (LinearShape("bert-base ffn-up", 768, 3072), LinearShape("bert-base ffn-down", 3072, 768),
                  LinearShape("bert-base attn", 768, 768)),
    "llama-7b": (LinearShape("llama-7b attn", 4096, 4096), LinearShape("llama-7b ffn-up", 4096, 11008),
                 LinearShape("llama-7b ffn-down", 11008, 4096)),
    "llama-70b": (LinearShape("llama-70b attn", 8192, 8192), LinearShape("llama-70b kv", 8192, 1024),
                  LinearShape("llama-70b ffn-up", 8192, 28672), LinearShape("llama-70b ffn-down", 28672, 8192)),
    "small": (LinearShape("small ffn-up", 384, 1536),),
    "square-4096": (LinearShape("llama-7b attn", 4096, 4096),),
}
BATCHES: tuple[int, ...] = (1, 8, 64, 256)  # tokens per call (CPU)
GPU_BATCHES: tuple[int, ...] = (1, 16, 128, 2048)  # tokens per call (GPU: decode to prefill)
SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
_LITERAL = re.compile(r"(\d+)x(\d+)")


def shapes(names: list[str]) -> list[LinearShape]:
    """Shapes from set names (``SHAPE_SETS``) or literal ``OUTxIN`` strings, in order, without repeats."""
    out: list[LinearShape] = []
    for name in names:
        if name in SHAPE_SETS:
            found = list(SHAPE_SETS[name])
        else:
            m = _LITERAL.fullmatch(name.strip().lower())
            if m is None:
                raise UserValueError(f"unknown shape {name!r}: use OUTxIN (e.g. 4096x11008) or a set name: "
                                 f"{', '.join(SHAPE_SETS)}")
            o, i = int(m[1]), int(m[2])
            if o < 1 or i < 1:
                raise UserValueError(f"shape {name!r} must have positive sizes, got {o}x{i}")
            found = [LinearShape("", i, o)]
        out += [s for s in found if s not in out]
    return out
