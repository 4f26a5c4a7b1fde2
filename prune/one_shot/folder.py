"""One-shot pruning of Hugging Face model folders: what ``prune oneshot`` runs.

``oneshot_folder(model_dir, out_dir, calibration_file, ...)`` loads the folder's model (its own dtype) and
tokenizer with transformers (local files only), prunes it with :func:`prune.one_shot.run.oneshot`, and writes
a Hugging Face folder: config, tokenizer, safetensors weights with exact zeros under the original keys, and
``oneshot_report.json``; with ``bits=8``, the int8 checkpoint ``prune convert --quantize int8`` would write
(a sharded sparse folder), each pruned weight stored on the int8 grid the one-shot pass left it on. The folder
is written by :func:`prune.model_folder.write_model_folder`: beside ``out_dir`` under a temporary name and
renamed once complete, so no partial ``out_dir`` is ever left; an existing one is replaced only with
``overwrite``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from prune.model_folder import check_output, load_folder, write_model_folder
from prune.one_shot.config import OneShotConfig
from prune.one_shot.data import as_texts
from prune.one_shot.run import OneShotReport, oneshot
from sparse_ops.checkpoint.convert import convert_checkpoint

__all__ = ["REPORT", "check_output", "load_folder", "oneshot_folder"]

REPORT = "oneshot_report.json"


def oneshot_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, calibration: str | os.PathLike,
                   config: OneShotConfig | None = None, *, overwrite: bool = False,
                   device: torch.device | str | None = None, **options: object) -> OneShotReport:
    """Prune a model folder in one shot into ``out_dir`` (see the module docstring) with ``config`` (its fields
    may be given as keyword ``options``, as to ``oneshot``). Returns its report."""
    config = OneShotConfig(**options) if config is None else dataclasses.replace(config, **options)
    src, dst = Path(model_dir).resolve(), check_output(out_dir, [model_dir], overwrite)
    texts = as_texts(calibration)  # read (and refused when empty or malformed) before the model loads
    model, tokenizer = load_folder(src, tokenizer_for="text calibration")
    _, report = oneshot(model, texts, config, tokenizer=tokenizer, device=device)

    def to_int8(saved: Path, converted: Path) -> None:  # the pruned weights on their own grids, the rest absmax
        convert_checkpoint(saved, converted, format="auto", quantize="int8", scales=report.scales)

    write_model_folder(dst, model, tokenizer, {REPORT: json.dumps(report.to_dict(), indent=1)},
                       overwrite=overwrite, convert=to_int8 if config.bits else None)
    return report
