"""Runs a script that compiles Triton kernels for NVIDIA targets (no GPU needed) in a fresh process, with
TRITON_INTERPRET unset and a private cache; returns the JSON its last line prints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_for_gpu(script: str, cache: Path) -> dict:
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)  # a fresh compile, outside the user's cache
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
