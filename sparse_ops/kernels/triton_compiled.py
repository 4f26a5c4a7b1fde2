"""The Triton kernels compiled for NVIDIA targets without a GPU, and the facts read off their compiled code.

Triton lowers a ``@triton.jit`` function to PTX and cubin for any ``GPUTarget`` on a machine with no GPU
(ptxas and cuobjdump ship with triton's NVIDIA backend). This module compiles each kernel of
``triton_sparse`` / ``triton_two_four`` / ``triton_moe`` (``CASES``) for sm_80 and sm_90 and reports:

- ``regs``: registers per thread and ``local_bytes`` (local memory per thread, where spills go; Triton's
  ``n_spills`` is that size / 4), both from ``cuobjdump -res-usage`` on the cubin;
- ``ptx_local``: ``.local`` / ``ld.local`` / ``st.local`` occurrences in the PTX;
- ``mma``: tensor-core instructions (``mma.sync`` / ``wgmma.mma_async``) in the PTX;
- ``weight_loads``: the global-memory instructions (``ld.global*`` / ``cp.async*``) that load the weight's
  *values*, attributed through the PTX's ``.loc`` line info to the kernel's ``tl.load(<values pointer> ...``
  call; and ``global_loads``, every global load of the kernel.

Specialisation: the compile gets what a launch on Llama-like shapes gets from Triton's JIT: pointers 16-byte
aligned (torch allocations) and the shape / stride integers marked divisible by 16 (``DIVISIBLE``); the token
count and split counts stay generic. ``num_warps`` / ``num_stages``: 4 / 3, the autotune list's middle config.

It needs a process that has not run Triton's interpreter (the interpreter's patches break an in-process
compile) and ``TRITON_INTERPRET`` unset: the tests run ``python -m sparse_ops.kernels.triton_compiled`` in a
subprocess, which prints the facts of every case as JSON; ``benchmarks/gpu_model.py`` calls ``facts``.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = (80, 90)  # A100 (sm_80), H100 / H200 (sm_90)
NUM_WARPS, NUM_STAGES = 4, 3
THREADS_PER_BLOCK = NUM_WARPS * 32
REGISTERS_PER_SM = 65536  # sm_80 and sm_90: 64K 32-bit registers per SM
# integer arguments that are multiples of 16 at Llama shapes (4096, 11008, their products): Triton's JIT marks
# such a value divisible by 16 at launch, which is what lets it vectorise loads along them
DIVISIBLE = frozenset({"OUT", "IN", "stride_xn", "stride_yn", "H", "D", "stride_we", "stride_wh"})
INTS = DIVISIBLE | {"N", "N_BUCKET", "SPLITS", "TILES_PER_SPLIT"}


@dataclass(frozen=True)
class Case:
    """One compile: a kernel with its pointer types and constexprs; ``weight`` names the pointer of the
    weight's values (None: the kernel reads no weight); ``dot``: the kernel multiplies with ``tl.dot``."""

    name: str
    kernel: str  # "tiled" | "two_four" | "moe"
    types: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    weight: str | None
    dot: bool


def _tiled(dtype: str, block_n: int = 16, *, partial: bool = False, act: str | None = None, wide: bool = False,
           gemv: bool = False, int8: bool = False, block_v: int = 2048, step: int = 1) -> Case:
    """A compile of the tiled-bitmap kernel: fp16 / bf16 values (or int8 ones with row scales), plain or split-K
    (``partial``), an epilogue activation, int64 offsets (``wide``), the one-token ``gemv`` path; ``block_v``
    and ``step``: a sparser layer's smaller value block and tiles per iteration (2048 and 1: a dense tile)."""
    from sparse_ops.activations import CODES
    from sparse_ops.bitmap import DEFAULT_TILE

    if gemv:
        name = f"tiled-gemv-{dtype}"
    elif int8:
        name = f"tiled-int8-{dtype}-n{block_n}"
    else:
        name = f"tiled-{dtype}-n{block_n}-{'splitk' if partial else 'plain'}" + (f"-{act}" if act else "")
    if step > 1:
        name += f"-v{block_v}-s{step}"
    types = {"x_ptr": "*" + dtype, "values": "*i8" if int8 else "*" + dtype, "bias_ptr": "*" + dtype,
             "y_ptr": "*" + dtype, "partial": "*fp32", "scales_ptr": "*" + dtype}
    constexprs = {"TILE_OUT": DEFAULT_TILE[0], "TILE_K": DEFAULT_TILE[1], "HAS_SCALES": int8, "HAS_BIAS": True,
                  "ACT": CODES[act], "PARTIAL": partial, "DOT_FP32": False, "PRECISION": "ieee", "HW_POPC": True,
                  "ALIGN": 16 if int8 else 8, "GEMV": gemv, "WIDE": wide, "BLOCK_V": block_v, "STEP": step,
                  "BLOCK_N": block_n}
    return Case(name + ("-wide" if wide else ""), "tiled", types, constexprs, "values", not gemv)


def _two_four(dtype: str, block_n: int, partial: bool = False) -> Case:
    return Case(f"two_four-{dtype}-n{block_n}{'-splitk' if partial else ''}", "two_four",
                {"x_ptr": "*" + dtype, "values": "*" + dtype, "metadata": "*u8", "bias_ptr": "*" + dtype,
                 "y_ptr": "*" + dtype, "partial": "*fp32"},
                {"TILE_OUT": 32, "TILE_K": 64, "HAS_BIAS": True, "PARTIAL": partial, "DOT_FP32": False,
                 "PRECISION": "ieee", "BLOCK_N": block_n, "ACT": 0, "WIDE": False}, "values", True)


def _moe(dtype: str) -> Case:
    # BLOCK_H / BLOCK_K: what grouped_linear launches on CUDA for H > 64
    return Case(f"moe-{dtype}", "moe",
                {"x_ptr": "*" + dtype, "w_ptr": "*" + dtype, "b_ptr": "*" + dtype, "y_ptr": "*" + dtype},
                {"HAS_BIAS": True, "DOT_FP32": False, "PRECISION": "ieee", "WIDE": False, "BLOCK_M": 16,
                 "BLOCK_H": 128, "BLOCK_K": 64}, "w_ptr", True)


CASES: tuple[Case, ...] = (
    *(_tiled(d, n, partial=p) for d in ("fp16", "bf16") for n in (16, 64) for p in (False, True)),
    _tiled("fp16", act="gelu"), _tiled("fp16", partial=True, act="silu", wide=True),
    _tiled("fp16", int8=True), _tiled("fp16", partial=True, gemv=True),
    # sparser layers, as random weights give them: 70% (a 1024-value block, 2 tiles per iteration), 90% (256 or
    # 512, 4)
    _tiled("fp16", partial=True, block_v=1024, step=2), _tiled("fp16", partial=True, block_v=512, step=4),
    _tiled("fp16", partial=True, block_v=256, step=4),
    _tiled("fp16", 64, block_v=512, step=4), _tiled("fp16", partial=True, gemv=True, block_v=512, step=4),
    *(_two_four(d, n) for d in ("fp16", "bf16") for n in (16, 64)), _two_four("fp16", 16, partial=True),
    _moe("fp16"), _moe("bf16"),
)
CASE_NAMES = tuple(c.name for c in CASES)


def _kernel(name: str):
    """The kernel's ``JITFunction`` (decorating the module's kernels as a compiled product would)."""
    from sparse_ops.kernels import triton_moe, triton_sparse, triton_two_four

    if name == "tiled":
        fn = triton_sparse._build().tiled.autotuned.fn
    elif name == "two_four":
        fn = triton_two_four._build().autotuned.fn
    else:
        fn, _ = triton_moe._build()
    if triton_sparse._build().interpret or not hasattr(fn, "params"):
        raise RuntimeError("compiling needs TRITON_INTERPRET unset in a process that never interpreted")
    return fn


def compile_for(fn, arch: int, types: dict, constexprs: dict, *, num_warps: int = NUM_WARPS,
                num_stages: int = NUM_STAGES):
    """``triton.compile`` of the JITFunction ``fn`` for ``sm_<arch>``: pointers typed by ``types`` (``*i32``
    where not named), integers ``i32`` (16-divisible where named in ``DIVISIBLE``), pointers 16-byte aligned."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        signature[p.name] = "i32" if p.name in INTS else types.get(p.name, "*i32")
        if p.name in DIVISIBLE or signature[p.name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_GLOBAL_LOAD = re.compile(r"\b(ld\.global[a-z0-9_.]*|cp\.async\.c[ag]\.shared\.global[a-z0-9_.]*)")
_MMA = re.compile(r"\b(mma\.sync|wgmma\.mma_async)\b")
_ATOM = re.compile(r"\batom\.global[a-z0-9_.]*")
_STORE = re.compile(r"\bst\.global")
_BARRIER = re.compile(r"\b(bar\.sync|barrier\.sync)\b")
_LOCAL = re.compile(r"\.local\b")


def _load_sites(fn, pointer: str) -> set[tuple[str, int, int]]:
    """(file, line, column) of each ``tl.load(<pointer> ...`` call in the source of ``fn`` (a kernel or a
    device function it calls), as PTX's .loc."""
    lines, first = inspect.getsourcelines(fn.fn)
    path = str(Path(inspect.getsourcefile(fn.fn)).resolve())
    sites = set()
    for offset, text in enumerate(lines):
        for m in re.finditer(r"tl\.load\(\s*" + re.escape(pointer) + r"\b", text):
            sites.add((path, first + offset, m.start() + 1))
    if not sites:
        raise ValueError(f"no tl.load({pointer} ...) in {fn.fn.__name__}")
    return sites


def _load_bytes(instruction: str, text: str) -> int:
    """Bytes one thread moves with a global-load instruction: a cp.async's size operand, else vector x width."""
    if instruction.startswith("cp.async"):
        m = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)", text)
        return int(m.group(1), 0) if m else 0
    vec = re.search(r"\.v(\d+)\b", instruction)
    bits = re.search(r"\.[busf](\d+)$", instruction)
    return (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 0)


def ptx_global_loads(ptx: str, sites: set[tuple[str, int, int]] | None = None) -> dict[str, int]:
    """Count of each global-load instruction in ``ptx`` (``ld.global*``, ``cp.async*``), keyed
    ``"<instruction>/<bytes per thread>"``; with ``sites``, only those whose ``.loc`` is one of them.

    A masked vector load is an inline-asm block (one ``mov`` per register, then the load) whose ``.loc`` lines
    count up by one per line, so the load itself carries a line 3 past its ``tl.load`` for a ``.v4``: inside a
    block, the block's first ``.loc`` is the load's."""
    files = {m.group(1): str(Path(m.group(2)).resolve()) for m in map(_FILE.match, ptx.splitlines()) if m}
    counts: dict[str, int] = {}
    loc, in_asm, asm_loc = None, False, None
    for line in ptx.splitlines():
        if "begin inline asm" in line:
            in_asm, asm_loc = True, None
        elif "end inline asm" in line:
            in_asm = False
        m = _LOC.match(line)
        if m:
            loc = (files.get(m.group(1), ""), int(m.group(2)), int(m.group(3)))
            if in_asm:
                asm_loc = asm_loc or loc
            continue
        code = line.split("//")[0]
        for ins in _GLOBAL_LOAD.findall(code):
            if sites is None or (asm_loc if in_asm and asm_loc else loc) in sites:
                key = f"{ins}/{_load_bytes(ins, code)}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def arrivals(ptx: str) -> list[dict]:
    """Each global atomic in ``ptx`` (split-K's arrival on its tile's counter): its instruction, and whether a
    CTA barrier separates it from the global stores before it (``fenced``: every thread's partial sums stored
    before the one thread that arrives releases them)."""
    found, last_store, last_barrier = [], None, None
    for i, line in enumerate(ptx.splitlines()):
        code = line.split("//")[0]
        if _STORE.search(code):
            last_store = i
        if _BARRIER.search(code):
            last_barrier = i
        m = _ATOM.search(code)
        if m:
            fenced = last_store is not None and last_barrier is not None and last_barrier > last_store
            found.append({"instruction": m.group(0), "fenced": fenced})
    return found


def wide_load(key: str, min_bytes: int = 8) -> bool:
    """A ``ptx_global_loads`` key that moves at least ``min_bytes`` per thread: from 8 bytes a vector
    (``.v2`` / ``.v4``) or a ``cp.async``; a 2-byte ``ld.global.b16`` (one fp16 value: a gather) never is."""
    return int(key.rpartition("/")[2]) >= min_bytes


def _resources(cubin: bytes) -> dict[str, int]:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def facts(case: Case, arch: int) -> dict:
    """What the compiled code of ``case`` for ``sm_<arch>`` shows (see the module docstring)."""
    fn = _kernel(case.kernel)
    c = compile_for(fn, arch, case.types, case.constexprs)
    ptx = c.asm["ptx"]
    res = _resources(c.asm["cubin"])
    out = {"case": case.name, "arch": arch, **res, "n_spills": res["local_bytes"] // 4,
           "shared_bytes": c.metadata.shared, "threads": c.metadata.num_warps * 32,
           "ptx_local": len(_LOCAL.findall(ptx)), "mma": len(_MMA.findall(ptx)),
           "global_loads": ptx_global_loads(ptx), "weight_loads": None}
    if case.weight is not None:
        out["weight_loads"] = ptx_global_loads(ptx, _load_sites(fn, case.weight))
    if case.constexprs.get("PARTIAL"):  # split-K: the arrival and the last program's loads of the partials
        from sparse_ops.kernels import triton_sparse

        out["arrivals"] = arrivals(ptx)
        out["partial_loads"] = ptx_global_loads(ptx, _load_sites(triton_sparse._finish, "partial"))
    return out


def blocks_per_sm(regs: int, threads: int = THREADS_PER_BLOCK) -> int:
    """Blocks that fit an SM's register file (``REGISTERS_PER_SM / (regs x threads)``, rounded down)."""
    return REGISTERS_PER_SM // (regs * threads)


@functools.cache
def case(name: str) -> Case:
    """The case named ``name`` in ``CASES``."""
    return next(c for c in CASES if c.name == name)


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line: the facts of the chosen cases (default all) for the chosen targets."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", choices=TARGETS)
    p.add_argument("--case", action="append", choices=CASE_NAMES)
    a = p.parse_args(argv)
    found = [facts(case(n), arch) for arch in a.arch or TARGETS for n in a.case or CASE_NAMES]
    print(json.dumps(found))


if __name__ == "__main__":
    main()
