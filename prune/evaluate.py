"""Perplexity of a causal language model on a user's own text (how much pruning cost, in the usual measure).

:func:`perplexity` scores a 1-D token stream; :func:`text_perplexity` tokenizes texts or a ``.txt``/``.jsonl``
file first (as :mod:`prune.one_shot.data` reads them). By default the stream is cut into non-overlapping
windows of ``seq_len`` tokens and every token but the first of each window is predicted: the WikiText-2
evaluation of SparseGPT and Wanda. With ``stride < seq_len`` the windows slide by ``stride`` and each scores
only the tokens the previous did not (the Hugging Face recipe), so every token after the first is scored
exactly once, with up to ``seq_len`` tokens of context. The negative log-likelihood is computed in float32
from the model's logits and summed over all scored tokens; the perplexity is ``exp(total NLL / tokens)``.

Example (a model with uniform logits over 50 tokens has perplexity 50):
    >>> import torch
    >>> class Uniform(torch.nn.Module):
    ...     def forward(self, input_ids):
    ...         return torch.zeros(*input_ids.shape, 50)
    >>> result = perplexity(Uniform(), torch.arange(10), seq_len=4)  # windows [0:4], [4:8], [8:10]
    >>> round(result.perplexity, 4), result.tokens, result.windows
    (50.0, 7, 3)
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from prune.distill import logits_of
from prune.one_shot.data import _check_ids, as_texts, check_window, token_stream
from sparse_ops.errors import MissingPathError, UserValueError


@dataclass(frozen=True)
class Perplexity:
    """The result of an evaluation: ``perplexity = exp(nll)``."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4f} (nll {self.nll:.4f} nats/token over {self.tokens} tokens, "
                f"{self.windows} windows of <= {self.seq_len})")


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)``: window ``ids[begin:end]`` scores the tokens ``first..end-1`` of the stream."""
    out, begin, done = [], 0, 1  # tokens before `done` are scored already (or are the unpredictable first)
    while done < n:
        end = min(begin + seq_len, n)
        first = max(done, begin + 1)
        if end > first:
            out.append((begin, end, first))
        done, begin = end, begin + stride
    return out


def perplexity(model: nn.Module, ids: Tensor, *, seq_len: int = 512, stride: int | None = None,
               batch_size: int = 1, device: torch.device | str | None = None,
               progress: bool = False) -> Perplexity:
    """The perplexity of ``model`` (``model(input_ids=...)`` returns logits, or an output with ``.logits``) on
    the 1-D token stream ``ids``.

    ``stride`` None (or ``seq_len``): non-overlapping windows of ``seq_len`` (a shorter final window is kept
    if it predicts anything), each predicting all its tokens but the first. ``stride < seq_len``: windows
    start every ``stride`` tokens and each scores only its tokens not scored before (``len(ids) - 1`` in all).
    Windows of equal length run ``batch_size`` at a time. Inputs go to ``device``, by default the device of
    the model's first parameter (the model is not moved). Runs in eval mode without gradients and restores
    every module's training flag; ``progress`` shows a tqdm bar over windows.
    """
    if not isinstance(ids, Tensor) or ids.ndim != 1 or ids.numel() < 2:
        raise UserValueError(f"ids must be a 1-D tensor of at least 2 token ids, got "
                         f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
    ids = _check_ids(ids)
    if seq_len < 2:
        raise UserValueError(f"seq_len must be >= 2, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise UserValueError(f"stride must be between 1 and seq_len={seq_len}, got {stride}")
    if batch_size < 1:
        raise UserValueError(f"batch_size must be >= 1, got {batch_size}")
    check_window(model, seq_len)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    windows = _windows(ids.numel(), seq_len, stride)
    batches: list[list[tuple[int, int, int]]] = []  # consecutive windows of a length (the last may be short)
    for w in windows:
        last = batches[-1] if batches else []
        if 0 < len(last) < batch_size and last[-1][1] - last[-1][0] == w[1] - w[0]:
            last.append(w)
        else:
            batches.append([w])
    modes = {m: m.training for m in model.modules()}
    total, tokens = 0.0, 0
    try:
        model.eval()
        with torch.no_grad(), tqdm(total=len(windows), desc="perplexity", unit="window",
                                   disable=not progress) as bar:
            for batch in batches:
                x = torch.stack([ids[b:e] for b, e, _ in batch])
                labels = x.clone()
                for row, (b, _, first) in zip(labels, batch):
                    row[:first - b] = -100  # context only
                logits = logits_of(model(input_ids=x.to(device)))[:, :-1].float()
                targets = labels[:, 1:].to(logits.device)
                losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=-100, reduction="none")  # float32, 0 where ignored
                total += losses.double().sum().item()  # summed in float64
                tokens += int(targets.ne(-100).sum())
                bar.update(len(batch))
    finally:
        for m, mode in modes.items():
            m.training = mode
    nll = total / tokens
    return Perplexity(perplexity=math.exp(nll) if nll < 709.0 else math.inf, nll=nll, tokens=tokens,
                      windows=len(windows), seq_len=seq_len)


def text_perplexity(model: nn.Module, tokenizer, text_or_path: Sequence[str] | str | os.PathLike,
                    **kwargs) -> Perplexity:
    """:func:`perplexity` of ``model`` on texts (a sequence of strings) or a ``.txt``/``.jsonl`` file (a
    ``str`` or path object, read by :func:`prune.one_shot.data.read_texts`), tokenized by ``tokenizer`` into
    one stream with its eos token between texts. ``kwargs`` go to :func:`perplexity`."""
    return perplexity(model, token_stream(as_texts(text_or_path), tokenizer), **kwargs)


def folder_perplexity(model_dir: str | os.PathLike, text: str | os.PathLike, **options) -> Perplexity:
    """Perplexity of a dense or converted sparse model folder (``sparse_ops.from_pretrained``: sparse layers run
    our kernels) on a .txt / .jsonl file: what ``prune eval`` runs (``options``: :func:`perplexity`'s)."""
    from sparse_ops.pretrained import from_pretrained, import_transformers

    tf = import_transformers("prune eval")
    if not Path(model_dir).is_dir():
        raise MissingPathError(f"no such model folder: {model_dir}")
    texts = as_texts(text)  # read (and refused when missing or malformed) before the model loads
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserValueError(f"{model_dir} has no tokenizer that transformers can load: {e}") from e
    return text_perplexity(from_pretrained(model_dir), tokenizer, texts, **options)
