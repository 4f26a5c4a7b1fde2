"""A BERT-base-shaped checkpoint to try ``prune bench checkpoint`` on: random weights, every linear pruned.

A ``transformers`` BERT encoder (hidden 768, FFN 3072, ``--layers`` layers, random init: nothing downloaded)
whose linear weights are magnitude-pruned to ``--sparsity`` each (``prune.masks.layer_mask``), optionally to
2:4 first (``--two-four``), saved dense with exact zeros as ``.safetensors``. Embeddings and norms stay dense.

    python -m benchmarks.example_checkpoint --out /tmp/bert.safetensors --layers 2 --sparsity 0.9
    prune convert /tmp/bert.safetensors -o /tmp/bert-sparse.safetensors --format auto
    prune bench checkpoint /tmp/bert-sparse.safetensors --tokens 1,64 --threads 1 --out results/checkpoint
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from prune.masks import layer_mask, nm_mask


def pruned_linear_weight(w: torch.Tensor, sparsity: float, two_four: bool) -> torch.Tensor:
    """``w`` (out, in) with its smallest-magnitude weights zeroed: 2:4 first if asked, then to ``sparsity``."""
    keep = nm_mask(w.abs(), 2, 4) if two_four else torch.ones_like(w, dtype=torch.bool)
    scores = w.abs().masked_fill(~keep, -1.0)  # pruned by 2:4 -> lowest score, pruned first
    return w * layer_mask(scores, sparsity)


def bert_state(layers: int, sparsity: float, two_four: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(num_hidden_layers=layers)).eval()
    state = {}
    for name, t in model.state_dict().items():
        linear = t.dim() == 2 and "embeddings" not in name
        state[name] = (pruned_linear_weight(t, sparsity, two_four) if linear else t).contiguous()
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--layers", type=int, default=2, help="encoder layers (default: 2; BERT-base has 12)")
    p.add_argument("--sparsity", type=float, default=0.9, help="sparsity of every linear weight (default: 0.9)")
    p.add_argument("--two-four", action="store_true", help="prune to 2:4 first (sparsity >= 0.5)")
    a = p.parse_args(argv)
    if not 0.0 <= a.sparsity < 1.0 or (a.two_four and a.sparsity < 0.5):
        p.error(f"--sparsity must be in [0, 1) (>= 0.5 with --two-four), got {a.sparsity}")
    from safetensors.torch import save_file

    save_file(bert_state(a.layers, a.sparsity, a.two_four), str(a.out))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
