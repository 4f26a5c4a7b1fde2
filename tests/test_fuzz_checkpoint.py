"""Fuzzing the sparse-checkpoint reader: thousands of mutated files (headers, metadata, index arrays, byte
flips, truncations), each either read correctly or refused with our ``ValueError`` naming the file.

The loop runs in a child process under a 2 GiB data limit and a timeout, so a crash, a hang or a
gigabyte allocation fails the test (with the case number to replay) instead of taking pytest down.
Cases are seeded: case ``i`` always makes the same file (``python -m tests.test_fuzz_checkpoint I``).
"""
from __future__ import annotations

import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.checkpoint.inspect import inspect_checkpoint
from sparse_ops.checkpoint.schema import TENSORS_KEY, load_sparse_state_dict
from sparse_ops.formats import CSR
from sparse_ops.tensorio import BadFileError

SEED = 7
N_CASES = 3000
DATA_LIMIT = 2 << 30  # bytes of heap/anonymous memory the fuzz process may hold (torch itself: ~0.8 GiB)
ROOT = Path(__file__).resolve().parents[1]


def base_checkpoint(d: Path) -> bytes:
    """A small sparse file with every kind of entry: csr with int16 and int32 columns, 2:4, dense, scalar."""
    g = torch.Generator().manual_seed(SEED)
    a = torch.randn(12, 20, generator=g).masked_fill(torch.rand(12, 20, generator=g) < 0.8, 0.0)
    wide = torch.zeros(2, 40000, dtype=torch.float16)  # > 32767 columns: int32 col_indices
    wide[0, 39999], wide[1, 5] = 1.0, -2.0
    b = torch.randn(6, 16, generator=g).reshape(6, 4, 4)
    b[..., 1:3] = 0.0  # 2:4
    sd = {"a.weight": a, "a.bias": torch.randn(12, generator=g), "wide.weight": wide,
          "b.weight": b.reshape(6, 16).bfloat16(), "step": torch.tensor(5)}
    torch.save(sd, d / "base.pt")
    convert_checkpoint(d / "base.pt", d / "base.safetensors", format="auto", min_sparsity=0.5)
    return (d / "base.safetensors").read_bytes()


# --- the file as (header, data), and back ---

def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# Values a hostile header or metadata record may hold in any field.
EVIL = [None, True, -1, 0, 1, 2**31, 2**40, 2**63, 2**64, 10**30, 1.5, float("nan"), "", "x" * 300, "F32",
        [], [-1], [0], [1, 2, 3], [2**40], [2**40, 4], [4, 2**40], [2**31, 2**31], [0, 2**62, 2**62],
        [1.0, 2], ["1"], [[1]], {}, {"a": 1}]


# --- mutators: (rng, base bytes) -> mutated bytes ---

def flip_bytes(rng: random.Random, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    return bytes(out)


def truncate(rng: random.Random, raw: bytes) -> bytes:
    return raw[:rng.randrange(len(raw))]


def header_length(rng: random.Random, raw: bytes) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(raw), 2**31, 2**40, 2**64 - 1])
    return struct.pack("<Q", value % 2**64) + raw[8:]


def header_field(rng: random.Random, raw: bytes) -> bytes:
    """A tensor's dtype, shape or data_offsets set to a hostile value, or the field deleted."""
    header, data = split(raw)
    info = header[rng.choice(tensor_names(header))]
    key = rng.choice(["dtype", "shape", "data_offsets"])
    if rng.random() < 0.1:
        del info[key]
    else:
        info[key] = rng.choice(EVIL + ["I8", "BOOL", "F64", "U8", "C64"])
    return join(header, data)


def same_size_dtype(rng: random.Random, raw: bytes) -> bytes:
    """Reinterpret a tensor's bytes as another dtype of the same width (offsets stay consistent)."""
    header, data = split(raw)
    info = header[rng.choice(tensor_names(header))]
    widths = {"F32": ["I32"], "I32": ["F32"], "F16": ["I16", "BF16"], "BF16": ["F16", "I16"],
              "I16": ["F16", "BF16"], "U8": ["I8", "BOOL"], "I64": ["F64"], "F64": ["I64"]}
    info["dtype"] = rng.choice(widths.get(info["dtype"], ["U8"]))
    return join(header, data)


def reshape(rng: random.Random, raw: bytes) -> bytes:
    """Give a tensor another shape with the same number of entries (offsets stay consistent)."""
    header, data = split(raw)
    info = header[rng.choice(tensor_names(header))]
    numel = 1
    for s in info["shape"]:
        numel *= s
    info["shape"] = rng.choice([[numel], [1, numel], [numel, 1], list(reversed(info["shape"])),
                                [numel, 1, 1]])
    return join(header, data)


def metadata_record(rng: random.Random, raw: bytes) -> bytes:
    """A sparse_ops record's format, shape, dtype or parts set to a hostile value (or another tensor's)."""
    header, data = split(raw)
    records = json.loads(header["__metadata__"][TENSORS_KEY])
    name = rng.choice(sorted(records))
    key = rng.choice(["format", "shape", "dtype", "parts"])
    pool = EVIL + ["csr", "2:4", "dense", "float32", "bfloat16", "int64"] + [r[key] for r in records.values()]
    if rng.random() < 0.1:
        del records[name][key]
    else:
        records[name][key] = rng.choice(pool)
    header["__metadata__"][TENSORS_KEY] = json.dumps(records)
    return join(header, data)


def metadata_text(rng: random.Random, raw: bytes) -> bytes:
    """The metadata JSON string itself cut, replaced or of the wrong version."""
    header, data = split(raw)
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta))
    text = meta[key]
    meta[key] = rng.choice([text[:rng.randrange(len(text) + 1)], "", "[]", "null", "2", "{}", "[" * 5000])
    return join(header, data)


def index_array(rng: random.Random, raw: bytes) -> bytes:
    """Overwrite entries of a stored part (row pointers, columns, 2:4 codes, values) with hostile numbers."""
    header, data = split(raw)
    sizes = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in tensor_names(header)}
    name = rng.choice([k for k, n in sizes.items() if n > 0])
    info = header[name]
    fmt = {"I32": "<i", "I16": "<h", "U8": "<B", "F32": "<f", "F16": "<e", "I64": "<q"}.get(info["dtype"])
    begin, end = info["data_offsets"]
    out = bytearray(data)
    if fmt is None:  # bf16: raw bytes
        out[begin + rng.randrange(end - begin)] = rng.randrange(256)
        return join(header, bytes(out))
    width = struct.calcsize(fmt)
    lo, hi = {"<i": (-2**31, 2**31 - 1), "<h": (-2**15, 2**15 - 1), "<B": (0, 255), "<q": (-2**63, 2**63 - 1)
              }.get(fmt, (0, 0))
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange((end - begin) // width)
        if fmt in ("<f", "<e"):
            value = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45])
        else:
            value = rng.choice([lo, hi, -1, 0, 1, 2, 19, 20, 39999, 40000, rng.randint(lo, hi)])
            value = min(max(value, lo), hi)
        struct.pack_into(fmt, out, begin + i * width, value)
    return join(header, bytes(out))


MUTATORS = [flip_bytes, truncate, header_length, header_field, same_size_dtype, reshape, metadata_record,
            metadata_text, index_array]


def read_everything(path: Path, out: Path) -> None:
    """What a user does with a file: load it, list it, densify every tensor, convert it."""
    for name, t in load_sparse_state_dict(path).items():
        if isinstance(t, CSR):
            t.to_torch()  # only after validate: torch itself does not check
        _ = t if isinstance(t, torch.Tensor) else t.to_dense()
    list(inspect_checkpoint(path))
    convert_checkpoint(path, out, format="auto", overwrite=True, allow_dense=True)  # every case, to one out


def run_case(i: int, base: bytes, d: Path) -> tuple[str, str]:
    """(mutator name, outcome) for case ``i``: outcome "ok", "refused", or "BUG: <exception>"."""
    rng = random.Random(SEED * 1_000_003 + i)
    mutate = MUTATORS[i % len(MUTATORS)]
    (d / "case.safetensors").write_bytes(mutate(rng, base))
    try:
        read_everything(d / "case.safetensors", d / "out.safetensors")
    except BadFileError as e:
        ok = str(e).startswith(f"cannot read {d / 'case.safetensors'}")
        return mutate.__name__, "refused" if ok else f"BUG: message does not name the file: {e}"
    except ValueError as e:  # the converter's own refusals (e.g. a weight too dense for 2:4) are fine too
        return mutate.__name__, "refused" if "case.safetensors" not in str(e) else f"BUG: {e!r}"
    except Exception as e:  # noqa: BLE001 - anything else is what we are looking for
        return mutate.__name__, f"BUG: {type(e).__name__}: {str(e)[:300]}"
    return mutate.__name__, "ok"


def fuzz(cases: range, progress: Path | None = None) -> dict:
    """Run ``cases`` under the data limit; returns outcome counts per mutator and the failing cases."""
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds wake-ups on a shared machine
    counts: Counter = Counter()
    bugs = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = base_checkpoint(d)
        for i in cases:
            if progress is not None:
                progress.write_text(str(i))  # the case a crash or a hang stopped at
            name, outcome = run_case(i, base, d)
            counts[f"{name}:{outcome if not outcome.startswith('BUG') else 'bug'}"] += 1
            if outcome.startswith("BUG"):
                bugs.append(f"case {i} ({name}): {outcome}")
    return {"counts": dict(counts), "bugs": bugs}


def test_fuzzed_files_are_read_or_refused_cleanly(tmp_path):
    progress = tmp_path / "progress"
    code = (f"import json, sys; from tests.test_fuzz_checkpoint import fuzz; from pathlib import Path; "
            f"print(json.dumps(fuzz(range({N_CASES}), Path(sys.argv[1]))))")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(progress)], cwd=ROOT, capture_output=True,
                              text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzz loop hung at case {progress.read_text()}")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"fuzz process died ({proc.returncode}) at case {progress.read_text()}: " \
                                 f"{proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["bugs"] == [], "\n".join(result["bugs"][:20])
    counts = result["counts"]
    assert sum(counts.values()) == N_CASES
    for m in MUTATORS:  # every mutator reached the reader's checks, not only the happy path
        assert counts.get(f"{m.__name__}:refused", 0) > 0, (m.__name__, counts)
    print(f"{N_CASES} fuzz cases in {seconds:.1f} s: {counts}")


# --- named cases: each weakness the issue lists, with the message it gets ---

def _patch(header_change=None, data_change=None):
    def mutate(raw):
        header, data = split(raw)
        if header_change:
            header_change(header)
        data = bytearray(data)
        if data_change:
            data_change(header, data)
        return join(header, bytes(data))
    return mutate


def _records(change):
    def header_change(header):
        records = json.loads(header["__metadata__"][TENSORS_KEY])
        change(records)
        header["__metadata__"][TENSORS_KEY] = json.dumps(records)
    return header_change


def _put(part, fmt, index, value):
    def data_change(header, data):
        struct.pack_into(fmt, data, header[part]["data_offsets"][0] + index * struct.calcsize(fmt), value)
    return data_change


NAMED = {
    "column index out of range": (_patch(data_change=_put("a.weight/col_indices", "<h", 0, 20)),
                                  r"'a.weight': csr col_indices must lie in \[0, 20\), got \[\d+, 20\]"),
    "negative column index": (_patch(data_change=_put("wide.weight/col_indices", "<i", 1, -5)),
                              r"col_indices must lie in \[0, 40000\), got \[-5,"),
    "row pointers not monotone": (_patch(data_change=_put("a.weight/crow_indices", "<i", 3, 2**30)),
                                  "crow_indices must be non-decreasing"),
    "row pointers past nnz": (_patch(data_change=_put("a.weight/crow_indices", "<i", 12, 10**6)),
                              "crow_indices must start at 0 and end at nnz"),
    "wrong length": (_patch(_records(lambda r: r["a.weight"].update(shape=[11, 20]))),
                     r"crow_indices must have shape \(12,\), got \(13,\)"),
    "wrong dtype in header": (_patch(lambda h: h["a.weight/crow_indices"].update(dtype="F32")),
                              "crow_indices must have dtype int32, got torch.float32"),
    "wrong dtype in metadata": (_patch(_records(lambda r: r["a.weight"].update(dtype="float16"))),
                                "has torch.float32 values, metadata says torch.float16"),
    "huge declared columns": (_patch(_records(lambda r: r["a.weight"].update(shape=[12, 2**40]))),
                              r"in_features must be at most 2147483647"),
    "shape inflated past int16 columns": (_patch(_records(lambda r: r["a.weight"].update(shape=[12, 40000]))),
                                          "col_indices must have dtype int32, got torch.int16"),
    "huge header shape": (_patch(lambda h: h["a.bias"].update(shape=[2**40, 2**20])),
                          r"needs 4611686018427387904 bytes, data_offsets hold 48"),
    "offsets past the end": (_patch(lambda h: h["step"].update(data_offsets=[0, 2**40])),
                             "data_offsets must be two ints|lie beyond the"),
    "bad 2:4 code": (_patch(data_change=_put("b.weight/metadata", "<B", 0, 0xFF)),
                     r"2:4 metadata holds \d+ invalid position codes"),
    "header length past the file": (lambda raw: struct.pack("<Q", 2**40) + raw[8:],
                                    "header length 1099511627776 exceeds the file"),
    "truncated data": (lambda raw: raw[:-3], "lie beyond the .* data bytes \\(a truncated file\\?\\)"),
    "header not JSON": (lambda raw: raw[:8] + b"[" * 16 + raw[24:], "header is not JSON"),
    "bool bytes other than 0/1": (_patch(lambda h: h["step"].update(dtype="BOOL", shape=[8])),
                                  "bool tensor holds bytes other than 0 and 1"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_checkpoint(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("case", sorted(NAMED))
def test_named_corruption_gets_a_clear_error(tmp_path, base, case):
    mutate, message = NAMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mutate(base))
    with pytest.raises(BadFileError, match=f"cannot read {path}: .*(?:{message})"):
        read_everything(path, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]  # no output, no temporary file


def test_nan_and_inf_values_are_data_and_round_trip(tmp_path, base):
    """A file is not corrupt for holding NaN/inf weights: the formats keep them bit for bit (pruning has its
    own rule for them), so the reader loads them unchanged."""
    nan, inf = _put("a.weight/values", "<f", 0, float("nan")), _put("a.weight/values", "<f", 1, -float("inf"))
    path = tmp_path / "special.safetensors"
    path.write_bytes(_patch(data_change=lambda h, d: (nan(h, d), inf(h, d)))(base))
    w = load_sparse_state_dict(path)["a.weight"]
    assert w.values[0].isnan() and w.values[1] == -float("inf")
    convert_checkpoint(path, tmp_path / "again.safetensors")
    again = load_sparse_state_dict(tmp_path / "again.safetensors", dense=True)["a.weight"]
    assert torch.equal(again.view(torch.int32), w.to_dense().view(torch.int32))


if __name__ == "__main__":  # replay cases: python -m tests.test_fuzz_checkpoint 17 [18 ...]
    with tempfile.TemporaryDirectory() as tmp:
        base_bytes = base_checkpoint(Path(tmp))
        for arg in sys.argv[1:]:
            print(arg, *run_case(int(arg), base_bytes, Path(tmp)))
