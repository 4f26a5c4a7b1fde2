"""Hugging Face model folders in and out: what ``prune oneshot`` and ``prune recover`` share.

:func:`load_folder` reads a dense folder's model (its own dtype) and tokenizer with transformers (local files
only); :func:`check_output` checks where the result may go before any work; :func:`write_model_folder` writes
the result -- weights (``save_pretrained``), config, tokenizer and report files -- beside the output under a
temporary name and renames it once complete, so no partial output is ever left and an existing one is replaced
only with ``overwrite``.

Example:
    >>> import json, tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> out = check_output(Path(tempfile.mkdtemp()) / "out", [], overwrite=False)
    >>> write_model_folder(out, model, None, {"report.json": json.dumps({"steps": 0})}, overwrite=False)
    >>> sorted(p.name for p in out.iterdir())
    ['config.json', 'generation_config.json', 'model.safetensors', 'report.json']
    >>> type(load_folder(out)[0]).__name__
    'LlamaForCausalLM'
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from sparse_ops.checkpoint.output import replace_folder
from sparse_ops.errors import MissingPathError, OutputExistsError, UserValueError
from sparse_ops.pretrained import import_transformers, model_class


def load_folder(model_dir: str | os.PathLike, *,
                tokenizer_for: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a dense Hugging Face folder, in the dtype it was saved in, eval mode; the tokenizer
    is None when the folder has none, which ``tokenizer_for`` (what it is needed for, e.g. ``"training on
    text"``) refuses with a UserValueError."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise MissingPathError(f"no such model folder: {folder}")
    if not (folder / "config.json").is_file():
        raise MissingPathError(f"{folder} is not a Hugging Face model folder (no config.json)")
    tf = import_transformers("one-shot pruning of a model folder")
    config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    names = getattr(config, "architectures", None) or []
    if not names:
        raise UserValueError(f"{folder}/config.json names no model class (\"architectures\" is empty): add the "
                             "class its weights were saved from, e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    cls = model_class(tf, names[0], folder)
    model = cls.from_pretrained(str(folder), local_files_only=True, dtype="auto").eval()
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is None and tokenizer_for is not None:
        raise UserValueError(f"{model_dir} has no tokenizer, which {tokenizer_for} needs")
    return model, tokenizer


def check_output(out_dir: str | os.PathLike, sources: list[str | os.PathLike], overwrite: bool) -> Path:
    """``out_dir`` resolved, once it is known that writing it may go ahead: it overlaps none of the ``sources``
    folders, exists only with ``overwrite``, and its parent exists (errors name the folder and what to do)."""
    dst = Path(out_dir).resolve()
    for source in sources:
        src = Path(source).resolve()
        if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
            raise UserValueError(f"output {out_dir} and model folder {source} overlap; choose an output elsewhere")
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"output {out_dir} exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        raise MissingPathError(f"output folder's parent does not exist: {dst.parent}")
    return dst


def write_model_folder(out_dir: Path, model: nn.Module, tokenizer: Any, files: Mapping[str, str], *,
                       overwrite: bool, convert: Callable[[Path, Path], None] | None = None) -> None:
    """Write ``model`` (``save_pretrained``: config and safetensors weights), ``tokenizer`` (unless None) and
    ``files`` (file name -> text, e.g. a JSON report) as the folder ``out_dir``, atomically: built beside it
    under a temporary name, then renamed (``sparse_ops.checkpoint.output.replace_folder``; an existing
    ``out_dir`` is replaced only with ``overwrite``). ``convert(saved, converted)``, when given, writes another
    folder from the saved one (e.g. ``convert_checkpoint``'s), and that one becomes ``out_dir``. Example: the module docstring."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        folder = tmp / "saved"
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for name, text in files.items():
            (folder / name).write_text(text)
        if convert is not None:
            convert(folder, tmp / "converted")
            folder = tmp / "converted"
        replace_folder(folder, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
