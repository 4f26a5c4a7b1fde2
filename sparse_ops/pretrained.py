"""Load a converted Hugging Face model folder without building its architecture by hand.

``prune convert hf_dir -o sparse_dir`` writes the sparse weights and copies ``config.json`` (and the tokenizer
files) beside them; ``from_pretrained(sparse_dir)`` builds the class named in the config (weights left
uninitialised: every one is then read from the folder) and loads it with ``sparse_ops.loading.sparsify``.

Example:
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparse_ops.checkpoint import convert_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                  vocab_size=100)
    >>> dense = BertModel(cfg).eval()
    >>> with torch.no_grad():  # a pruned model: 90% of each linear weight zero
    ...     for m in dense.modules():
    ...         if isinstance(m, torch.nn.Linear):
    ...             _ = m.weight.masked_fill_(torch.rand(m.weight.shape) < 0.9, 0.0)
    >>> dense.save_pretrained(f"{d}/dense")
    >>> convert_checkpoint(f"{d}/dense", f"{d}/sparse").copied
    ('config.json',)
    >>> model = from_pretrained(f"{d}/sparse")
    >>> type(model).__name__, model.training
    ('BertModel', False)
    >>> ids = torch.tensor([[5, 17, 42, 3]])
    >>> with torch.no_grad():
    ...     torch.allclose(model(ids).last_hidden_state, dense(ids).last_hidden_state, atol=1e-5)
    True
"""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from types import ModuleType

from torch import nn

from sparse_ops.errors import MissingPackageError, MissingPathError, NotAFolderError, UserValueError
from sparse_ops.loading import sparsify

CONFIG = "config.json"


def from_pretrained(path: str | os.PathLike, *, device: str = "cpu", kernel: str = "auto", fuse: bool = True,
                    **sparsify_kwargs) -> nn.Module:
    """The model of a (converted) Hugging Face folder, loaded by ``sparsify`` and in eval mode, ready to run.

    ``fuse=True`` (the default) runs every proven fusion (``sparse_ops.fusion.fuse``): activations, feed-forward
    pairs, residual add + LayerNorm into our kernels, and attention into ours where it is faster than SDPA;
    outputs equal the unfused model's within float rounding. ``fuse=False`` keeps the module tree and state dict
    keys exactly as stored (an FFN pair's keys move under its second layer once fused): use it to fine-tune,
    inspect or save the model, at a cost in speed (each fusion saves passes over the activations; ``benchmarks/ffn.py``
    measures the FFN pair).

    Reads ``config.json`` with ``transformers.AutoConfig`` (local files only), builds
    ``transformers.<config.architectures[0]>`` (``AutoModel`` when the config names none) in torch's default
    dtype without running its random initialisation (every weight is then loaded from the folder; a missing one
    is an error), ties its tied weights, and loads ``path`` with
    ``sparsify(model, path, device, kernel=kernel, fuse=fuse, **sparsify_kwargs)``: each linear layer stored
    sparse becomes a ``SparseLinear``. A dense Hugging Face folder loads too (dense).

    Errors: ``path`` missing (FileNotFoundError) or a file (NotADirectoryError), no ``config.json``
    (FileNotFoundError), transformers not installed (ImportError), a config transformers cannot read or an
    architecture it does not have (ValueError); each names the path or the value.
    """
    folder = _model_folder(path)
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise UserValueError(f"cannot read {folder / CONFIG} with transformers {transformers.__version__}: "
                         f"{_first_line(e)}") from e
    model = _build(transformers, config, folder)
    return sparsify(model, folder, device, kernel=kernel, fuse=fuse, **sparsify_kwargs).eval()


def _model_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise MissingPathError(f"no such model folder: {folder}")
    if not folder.is_dir():
        raise NotAFolderError(f"from_pretrained needs a model folder (config.json beside the weights), got the "
                                 f"file {folder}; load a file into a model you build with "
                                 f"sparse_ops.loading.sparsify(model, {str(folder)!r})")
    if not (folder / CONFIG).is_file():
        raise MissingPathError(f"{folder} has no {CONFIG}: from_pretrained builds the model from it; convert the "
                                f"Hugging Face folder to a folder (prune convert HF_DIR -o OUT_DIR copies it), or "
                                f"build the model yourself and call sparsify(model, {str(folder)!r})")
    return folder


def import_transformers(needed_by: str = "from_pretrained") -> ModuleType:
    """The ``transformers`` package, its per-file progress bars off; ``MissingPackageError`` naming ``needed_by``
    where it is not installed."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise MissingPackageError(f"{needed_by} needs the transformers package (pip install transformers)") from None
    transformers.utils.logging.disable_progress_bar()  # its per-file bars: ours show the work
    return transformers


def _build(transformers: ModuleType, config, folder: Path) -> nn.Module:
    """An instance of the config's architecture, its weights uninitialised but tied."""
    names = getattr(config, "architectures", None) or []
    with _no_init_weights():
        if not names:
            try:
                model = transformers.AutoModel.from_config(config)
            except ValueError as e:
                raise UserValueError(f"unknown architecture: {folder / CONFIG} names no architectures and "
                                 f"transformers {transformers.__version__} has no AutoModel for model_type "
                                 f"{getattr(config, 'model_type', None)!r} ({_first_line(e)})") from e
        else:
            model = model_class(transformers, names[0], folder)(config)
    model.tie_weights()  # init_weights, skipped above, is where transformers ties them
    return model


def model_class(transformers: ModuleType, name: object, folder: Path) -> type:
    """The transformers model class named ``name`` (``architectures[0]`` of ``folder``'s config); ValueError
    naming it and what is allowed otherwise."""
    try:
        cls = getattr(transformers, name) if isinstance(name, str) else None
    except (AttributeError, ImportError, RuntimeError):  # a lazy module whose dependencies are missing
        cls = None
    if not _is_model_class(cls, transformers):
        raise UserValueError(f"unknown architecture {name!r} (architectures[0] of {folder / CONFIG}): not a model "
                         f"class of transformers {transformers.__version__}; allowed: a transformers model class "
                         f"such as BertModel or GPT2LMHeadModel (a custom model: build it and call sparsify)")
    return cls


def _is_model_class(cls: object, transformers: ModuleType) -> bool:
    return isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)


def _no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' own switch that skips weight initialisation while a model is built (its from_pretrained
    does the same); a no-op where this version has none."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(where).no_init_weights()
    return contextlib.nullcontext()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
