"""One-shot pruning of Hugging Face model folders: what ``prune oneshot`` runs.

``oneshot_folder(model_dir, out_dir, calibration_file, ...)`` loads the folder's model (its own dtype) and
tokenizer with transformers (local files only), prunes it with :func:`prune.one_shot.run.oneshot`, and writes
a Hugging Face folder: config, tokenizer, safetensors weights with exact zeros under the original keys, and
``oneshot_report.json``; with ``bits=8``, the int8 checkpoint ``prune convert --quantize int8`` would write
(a sharded sparse folder), each pruned weight stored on the int8 grid the one-shot pass left it on. The folder
is written beside ``out_dir`` under a temporary name and renamed once
complete, so no partial ``out_dir`` is ever left; an existing one is replaced only with ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from prune.one_shot.config import OneShotConfig
from prune.one_shot.data import as_texts
from prune.one_shot.run import OneShotReport, oneshot
from sparse_ops.checkpoint import convert_checkpoint, replace_folder
from sparse_ops.errors import MissingPathError, OutputExistsError, UserValueError
from sparse_ops.pretrained import import_transformers, model_class

REPORT = "oneshot_report.json"


def load_folder(model_dir: str | os.PathLike):
    """(model, tokenizer) of a dense Hugging Face folder, in the dtype it was saved in, eval mode."""
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


def oneshot_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, calibration: str | os.PathLike,
                   config: OneShotConfig | None = None, *, overwrite: bool = False,
                   device: torch.device | str | None = None, **options: object) -> OneShotReport:
    """Prune a model folder in one shot into ``out_dir`` (see the module docstring) with ``config`` (its fields
    may be given as keyword ``options``, as to ``oneshot``). Returns its report."""
    config = OneShotConfig(**options) if config is None else dataclasses.replace(config, **options)
    src, dst = Path(model_dir).resolve(), check_output(out_dir, [model_dir], overwrite)
    texts = as_texts(calibration)  # read (and refused when empty or malformed) before the model loads
    model, tokenizer = load_folder(src)
    if tokenizer is None:
        raise UserValueError(f"{model_dir} has no tokenizer, which text calibration needs")
    _, report = oneshot(model, texts, config, tokenizer=tokenizer, device=device)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        folder = tmp / "dense"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / REPORT).write_text(json.dumps(report.to_dict(), indent=1))
        if config.bits:  # the int8 checkpoint: the pruned weights on their own grids, the rest absmax
            convert_checkpoint(folder, tmp / "int8", format="auto", quantize="int8", scales=report.scales)
            folder = tmp / "int8"
        replace_folder(folder, dst, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
