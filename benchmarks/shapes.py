"""Named linear-layer shapes, batches (tokens) and sparsities worth measuring (BENCHMARKING.md), as data.

Example:
    >>> [s.label for s in shapes(["square-4096"])]
    ['llama-7b attn 4096->4096']
    >>> shapes(["256x512"])[0].in_features
    512
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearShape:
    """A weight of shape (out_features, in_features) as used by ``F.linear``."""

    name: str
    in_features: int
    out_features: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.in_features}->{self.out_features}"


SHAPE_SETS: dict[str, tuple[LinearShape, ...]] = {
    "bert-base": (LinearShape("bert-base ffn-up", 768, 3072), LinearShape("bert-base ffn-down", 3072, 768),
                  LinearShape("bert-base attn", 768, 768)),
    "llama-7b": (LinearShape("llama-7b attn", 4096, 4096), LinearShape("llama-7b ffn-up", 4096, 11008),
                 LinearShape("llama-7b ffn-down", 11008, 4096)),
    "small": (LinearShape("small ffn-up", 384, 1536),),
    "square-4096": (LinearShape("llama-7b attn", 4096, 4096),),
}
BATCHES: tuple[int, ...] = (1, 8, 64, 256)  # tokens per call
SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def shapes(names: list[str]) -> list[LinearShape]:
    """Shapes from set names (``SHAPE_SETS``) or literal ``OUTxIN`` strings, in order, without repeats."""
    out: list[LinearShape] = []
    for name in names:
        if name in SHAPE_SETS:
            found = list(SHAPE_SETS[name])
        else:
            try:
                o, i = (int(v) for v in name.lower().split("x"))
            except ValueError:
                raise ValueError(f"unknown shape {name!r}: use OUTxIN or one of {', '.join(SHAPE_SETS)}") from None
            found = [LinearShape(name, i, o)]
        out += [s for s in found if s not in out]
    return out
