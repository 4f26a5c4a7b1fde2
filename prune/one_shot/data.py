"""Calibration data for one-shot pruning: a user's own text, tokenized and cut into random windows.

SparseGPT and Wanda calibrate on windows of ``seq_len`` tokens drawn at random from a text corpus (C4);
:func:`calibration_batches` does the same with any text: a ``.txt`` file (one stream of text), a ``.jsonl``
file (a ``"text"`` field, or a bare JSON string, per line; see :func:`read_texts`), a list of strings, or
token ids already made. Texts become one token stream (:func:`token_stream`, the tokenizer's eos token between
them), the windows are drawn with a seeded generator (the same seed, the same windows), and they come back in
batches of ``(<= batch_size, seq_len)`` int64 tensors.

Example:
    >>> import torch
    >>> batches = calibration_batches(torch.arange(100), samples=4, seq_len=10, batch_size=3)
    >>> [tuple(b.shape) for b in batches]
    [(3, 10), (1, 10)]
    >>> all(b[:, 0].remainder(10).eq(0).all() for b in batches)  # disjoint windows, as 100 >= 4 * 10 tokens
    True
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sparse_ops.errors import MissingPathError, UserTypeError, UserValueError

SUFFIXES = (".txt", ".jsonl")


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a file, read as UTF-8: a ``.txt`` file is one text (the whole file, one stream); a
    ``.jsonl`` file has one JSON object with a ``"text"`` string per line (or a bare JSON string), blank lines
    skipped. Raises ValueError for another suffix, a bad line (naming the file and line number) or no text."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserValueError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; text must be a .txt "
                         f"file (one stream of text) or a .jsonl file (one {{\"text\": ...}} per line)")
    if suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    else:
        texts = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if isinstance(item, dict):
                    item = item.get("text")
                if not isinstance(item, str):
                    raise UserValueError(f'{path}:{lineno}: expected an object with a "text" string field '
                                     f"or a JSON string")
                texts.append(item)
    if not any(t.strip() for t in texts):
        raise UserValueError(f"{path}: no text in the file")
    return texts


def as_texts(texts: Sequence[str] | str | os.PathLike) -> list[str]:
    """Texts from a path (a ``str`` or path object, read with :func:`read_texts`) or a sequence of strings."""
    if isinstance(texts, (str, os.PathLike)):
        if Path(texts).is_dir():
            raise UserValueError(f"{os.fspath(texts)!r} is a folder; name a .txt or .jsonl file of text")
        if not Path(texts).is_file():
            raise MissingPathError(f"no such file: {os.fspath(texts)!r} (to pass text itself, pass a list "
                                   f"of strings)")
        return read_texts(texts)
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UserTypeError("texts must be a non-empty sequence of strings, a path, or a Tensor of token ids")
    return texts


def token_stream(texts: Sequence[str], tokenizer) -> Tensor:
    """One 1-D int64 stream of the texts' token ids (a Hugging Face tokenizer, no special tokens added inside
    texts), with the tokenizer's eos token id between consecutive texts when it has one."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for i, part in enumerate(ids):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(part)
    return torch.tensor(stream, dtype=torch.int64)


def _check_ids(ids: Tensor) -> Tensor:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UserTypeError(f"token ids must be an integer tensor, got {ids.dtype}")
    return ids.detach().to("cpu", torch.int64)


def max_positions(model: object) -> int | None:
    """The longest window ``model`` was built for (its config's ``max_position_embeddings`` or ``n_positions``),
    or None when its config does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(model: object, seq_len: int) -> None:
    """UserValueError when windows of ``seq_len`` tokens are longer than ``model``'s positions: an absolute
    position table would index out of range, and a rotary model would be scored beyond what it was trained on."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise UserValueError(f"seq_len {seq_len} is longer than the {limit} positions the model was built for "
                             f"(its config's max_position_embeddings); use a seq_len of at most {limit}")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_activation_memory(windows: int, seq_len: int, hidden: int, itemsize: int) -> None:
    """UserValueError, before any work, when the activations one-shot pruning keeps between blocks (the inputs
    and outputs of a block for every calibration window) would not fit in the memory available."""
    need = 2 * windows * seq_len * hidden * itemsize
    available = available_memory()
    if available is not None and need > 0.8 * available:
        fit = max(int(0.8 * available) // (2 * seq_len * hidden * itemsize), 0)
        raise UserValueError(f"{windows} calibration windows of {seq_len} tokens keep {need / 2**30:.1f} GiB of "
                             f"activations between blocks, more than the {available / 2**30:.1f} GiB available; "
                             f"use at most {fit} samples (or a shorter seq_len)")


def calibration_batches(texts: Sequence[str] | Tensor | str | os.PathLike, tokenizer=None, *,
                        samples: int = 128, seq_len: int = 512, seed: int = 0,
                        batch_size: int = 8) -> list[Tensor]:
    """``samples`` random windows of ``seq_len`` tokens from ``texts``, in batches of ``(<= batch_size,
    seq_len)`` int64 tensors (on the CPU).

    ``texts``: a path (``.txt``/``.jsonl``, see :func:`read_texts`) or a sequence of strings, tokenized with
    ``tokenizer`` into one stream (:func:`token_stream`); or token ids: a 1-D tensor is a stream to cut, a 2-D
    ``(n, seq)`` tensor is windows already (its first ``samples`` rows, as they are; ``seq_len`` unused).

    Window starts come from a ``torch.Generator`` seeded with ``seed``. When the stream holds at least
    ``samples * seq_len`` tokens the windows do not overlap (a random choice of the stream's consecutive
    windows from its start); otherwise they start anywhere and may overlap. A stream shorter than ``seq_len``
    is a ValueError.
    """
    if samples < 1:
        raise UserValueError(f"samples must be >= 1, got {samples}")
    if seq_len < 2:
        raise UserValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise UserValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(texts, Tensor):
        stream = _check_ids(texts)
        if stream.ndim == 2:
            return list(stream[:samples].split(batch_size))
        if stream.ndim != 1:
            raise UserValueError(f"token ids must be a 1-D stream or 2-D (n, seq) windows, got shape "
                             f"{tuple(stream.shape)}")
    else:
        if tokenizer is None:
            raise UserTypeError("calibration_batches needs a tokenizer to tokenize texts (or pass token ids as a "
                            "Tensor)")
        stream = token_stream(as_texts(texts), tokenizer)
    n = stream.numel()
    if n < seq_len:
        raise UserValueError(f"the calibration data has {n} tokens, fewer than one window of seq_len={seq_len} "
                         f"needs; give more text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    if n >= samples * seq_len:
        whole = n // seq_len
        windows = stream[:whole * seq_len].view(whole, seq_len)[torch.randperm(whole, generator=g)[:samples]]
    else:
        starts = torch.randint(0, n - seq_len + 1, (samples,), generator=g)
        windows = stream.unfold(0, seq_len, 1)[starts]
    return list(windows.split(batch_size))
