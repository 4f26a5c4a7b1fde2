"""The plan's memory: each measured choice, keyed by this machine and the layer, in a JSON file, so that the same
model on the same machine makes the same choices in every later process with no measuring.

A key's machine half (``machine_key``) is what a measurement depends on besides the layer: the processor, the
kernels' ISA, the threads, torch's (and on CUDA Triton's) version and the plan's own rule version
(``PLAN_VERSION``); its layer half (``layer_key``) the format, shape, dtype, sparsity to 1%, device and
bucket. ``$SPARSE_OPS_PLANS`` names another file than ``<kernel cache dir>/plans.json``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import torch

from sparse_ops.kernels import cpp

log = logging.getLogger(__name__)

PLAN_VERSION = 5  # of the choice rule and paths (5: worst cases, busy marks): older cached choices are measured again


def machine_key(device: torch.device) -> str:
    """What a measurement depends on besides the layer: the processor, the kernels' ISA and the threads."""
    rule = f"plan {PLAN_VERSION}|torch {torch.__version__}"
    if device.type == "cuda":
        from sparse_ops.kernels import triton_sparse  # our CUDA kernels are Triton's: its version matters

        triton_version = getattr(triton_sparse.triton, "__version__", "none")
        return f"{torch.cuda.get_device_name(device)}|cuda {torch.version.cuda}|triton {triton_version}|{rule}"
    isa = cpp.isa() if cpp.available() else "torch-only"
    return f"{cpp.cpu_model()}|{isa}|abi {cpp.ABI_VERSION}|threads {torch.get_num_threads()}|{rule}"


def layer_key(fmt: str, shape: tuple[int, int], dtype: torch.dtype, sparsity: float, device: torch.device,
              batch: int) -> str:
    """The layer half of a cache key (sparsity to 1%: layers that close share a measurement).

    >>> layer_key("csr", (8, 4), torch.float32, 0.904, torch.device("cpu"), 64)
    'csr 8x4 float32 s0.90 cpu n64'
    """
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{fmt} {shape[0]}x{shape[1]} {dtype_name} s{sparsity:.2f} {device.type} n{batch}"


class PlanCache:
    """Measured choices, ``{machine key: {layer key: {"choice": path, "speedup": {path: dense time / time}}}}``,
    in a JSON file (``path=None``: in this process only). Written to a temporary file and renamed; entries other
    processes added meanwhile are kept."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, dict[str, dict]] = {}
        self._lock = threading.Lock()
        self._read = False
        self._warned = False  # a cache that cannot be written is said once

    def __deepcopy__(self, memo: dict) -> PlanCache:  # a copied model shares its cache (and the file)
        return self

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _load_file(self) -> dict[str, dict[str, dict]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # a damaged cache is only a cache: measure again
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, machine: str, layer: str) -> dict | None:
        with self._lock:
            if not self._read:
                self._entries, self._read = self._load_file(), True
            entry = self._entries.get(machine, {}).get(layer)
        return entry if isinstance(entry, dict) and isinstance(entry.get("choice"), str) else None

    def put(self, machine: str, layer: str, entry: dict) -> None:
        with self._lock:
            self._entries.setdefault(machine, {})[layer] = entry
            if self.path is None:
                return
            merged = self._load_file()
            for m, layers in self._entries.items():
                merged.setdefault(m, {}).update(layers)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".json", dir=self.path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as e:  # a read-only $SPARSE_OPS_PLANS: the choices hold for this process only
                if not self._warned:
                    log.warning("sparse_ops: could not write the plan cache %s (%s); choices are not kept",
                                self.path, e)
                self._warned = True


_DEFAULT_CACHES: dict[Path, PlanCache] = {}


def default_cache() -> PlanCache:
    """The on-disk cache of this user's plans, one object per path: ``$SPARSE_OPS_PLANS`` if set, else
    ``<kernel cache dir>/plans.json``."""
    path = Path(os.environ.get("SPARSE_OPS_PLANS") or cpp.cache_dir() / "plans.json")
    return _DEFAULT_CACHES.setdefault(path, PlanCache(path))
