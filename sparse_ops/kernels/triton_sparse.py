"""Triton kernels for unstructured sparse weights: "load as sparse, compute as dense", ``y = x @ W^T + b``.

Why: inference at 1-256 tokens (decode, small batches) is memory-bound: the time is the time to stream the
weight from HBM, so a weight stored in fewer bytes is a faster product, but only if the kernel still runs at
tensor-core speed. cuSPARSE's CSR SpMM only beats cuBLAS above ~95% sparsity (its per-entry column indices
cost 2-4 bytes next to a 2-byte value, and its gathers do not feed tensor cores). Flash-LLM (tiled-CSL) and
SpInfer (bitmaps) instead store the weight in tiles, each compressed, and expand every tile into a dense tile
on chip before a dense MMA. ``TiledBitmap`` is that layout; ``_tiled_kernel`` its Triton kernel.

Layout (``TiledBitmap``), for an (out, in) weight in tiles of TILE_OUT x TILE_K (default 32 x 64)::

    weight (out, in), padded with zeros to whole tiles      per tile row r (TILE_OUT output rows):
    +--------+--------+--------+--------+                   tile_ptr[r] .. tile_ptr[r+1]: its nonempty tiles
    | t0     | (zero) | t1     | t2     |  tile row 0       tile_cols[t]: the tile's column of tiles
    +--------+--------+--------+--------+                   bitmaps[t]: (TILE_OUT, TILE_K / 32) int32 words,
    | (zero) | t3     | (zero) | (zero) |  tile row 1           bit b of word (i, j): entry (i, 32 j + b)
    +--------+--------+--------+--------+                   value_offsets[t] .. value_offsets[t+1]: its
                                                             nonzeros in values, row-major within the tile
    tile_ptr      (tile_rows + 1,) int32    like CSR's crow, over tiles
    tile_cols     (T,) int32                T = nonempty tiles, in (tile row, tile column) order
    value_offsets (T + 1,) int32            prefix sums of the tiles' nonzero counts
    bitmaps       (T, TILE_OUT, TILE_K // 32) int32
    values        (nnz,) fp32 / fp16 / bf16 (the weight's dtype)

All-zero tiles are not listed (a block-CSR over tiles): they cost no bitmap, no values and no work, and
split-K divides each tile row's *nonempty* tiles, so structured zeros (pruned heads or neurons) balance well.
With unstructured pruning nearly every tile is nonempty (a 32 x 64 tile at 90% sparsity is empty with
probability 0.9^2048), and the cost per stored tile is 8 bytes of indices plus 1 bit per entry: at 50%
sparsity in fp16 the layout is 9/16 of dense (CSR with int16 columns: 2x the values, i.e. dense's size), at
90% 0.16 of dense. A fully dense tile needs no special case: its bitmap is all ones and its values are the
tile, read contiguously.

Kernel: grid (tile rows, token blocks, splits). A program owns TILE_OUT output rows x BLOCK_N tokens and loops
over its share of the tile row's nonempty tiles. Per tile it loads the TILE_K / 32 bitmap words of each row,
popcounts them (the hardware's popc compiled, SWAR bit tricks on int32 under the interpreter, which lacks
libdevice) and takes an exclusive cumsum over the TILE_OUT rows (a scan of TILE_OUT counts, not of the tile's
entries). The rank of entry (i, k) among the tile's nonzeros is then row_prefix[i] + popcounts of the earlier
words of row i + popcount(word & ((1 << (k % 32)) - 1)). The tile's values come in as one block: the layer's
state (``AlignedTiles``, built by ``prepare``) starts each tile's values on a 16-byte boundary, so the kernel
loads ``values[starts[t] : starts[t] + BLOCK_V]`` (masked to the tile's padded count) with vector loads whose
address depends only on the loop index and the tile's start, which Triton pipelines through ``cp.async``
(``tests/test_triton_compiled.py`` checks the compiled loads); ``tl.gather`` by rank then expands the tile,
zeros where the bitmap has none, cast to x's dtype and fed to ``tl.dot(x_tile, w_tile^T)`` with an fp32
accumulator. BLOCK_V is the layer's largest padded tile rounded up to a power of two (2048 values at 50%
sparsity, 1024 at 70%, 256-512 at 90% for random weights), and a sparser layer takes STEP = dense tile /
BLOCK_V tiles per iteration (up to ``MAX_STEP``), each its own block: each iteration then loads about a dense
tile's bytes, so a 90%-sparse layer keeps as many loads in flight as a dense one (at one tile per iteration it
would have about a third of what full bandwidth needs: ``benchmarks/results/gpu/model.md``). Tails: padding
bits are zero, x columns >= in and tokens >= N are masked loads, rows >= out masked stores; the last
iteration's tiles past a split's end re-read its last tile and are zeroed.

Split-K (variant "splitk"): for skinny products (few tile rows, few tokens) the grid is too small to fill the
GPU, so each tile row's nonempty tiles are split over SPLITS programs, reduced within the one launch
(``_finish``): each program stores its fp32 partial tile into a (SPLITS, N, out) scratch, then arrives on its
output tile's counter (a CTA barrier, then one ``acq_rel`` atomic at GPU scope); the program that arrives last
reads the SPLITS partials back from L2 in split order (so the sum is the same whichever program is last),
adds the bias, applies the activation, casts, stores and zeroes the counter. The scratch is kept per device
and stream (``workspace``; fresh while a CUDA graph is captured), so a call allocates only its output, and the
zeroed counters make reruns (autotuning, graph replays) safe. Variant "plain" writes y directly. ``pick`` (the
default a plan does not override) takes split-K when tokens <= ``SPLITK_MAX_TOKENS`` and the tile rows are
fewer than ``target_programs`` (4 per SM).

Epilogue: bias, int8 scales and the activation (``activations.CODES``: relu, gelu, gelu_tanh, silu) are applied
to the fp32 sums before the one rounding to x's dtype; the post-op (``AddNorm``) runs after, with torch ops.
Offsets are int32 unless a buffer passes INT32_MAX elements (``wide_offsets``: long prefills, large expert
stacks), where the kernels are built with int64 offsets (``WIDE``) instead of wrapping.

Autotune: the tile shape is the layout's (fixed at load); ``triton.autotune`` chooses BLOCK_N (16..128 tokens,
pruned to configs no larger than the token count's power of two, 16 at least: ``tl.dot``'s minimum), num_warps
and num_stages, keyed on ``AUTOTUNE_KEY`` (token bucket, out, in, tile, splits, value block) and the dtypes;
after a key's first call ``Launcher`` launches the chosen config on the kernel directly, skipping the
autotuner's per-call work. Under ``TRITON_INTERPRET=1`` (or ``SPARSE_OPS_TRITON_AUTOTUNE=0``) there is one config (BLOCK_N=16),
so nothing is benchmarked. The kernels are decorated lazily, at the first product (``_build``), so whether
they run compiled or interpreted follows ``TRITON_INTERPRET`` at that moment, not at import (importing
``sparse_ops`` before setting it is fine).

Host cost: everything a call's arguments decide (checks, constexprs, autotune key, grid, scratch sizes) is
worked out at the first call of its signature and kept in the layer's state (``Launch``, ``remember``); a
repeated call costs a dict lookup, its output's allocation and the launch. Our Python per call before
Triton's own launcher: ``benchmarks/results/host_overhead/``.

Tested without a GPU: every path runs on CPU tensors under the interpreter (``tests/test_triton_sparse.py``,
``tests/test_triton_launch.py``), and the compiled kernels are built for sm_80 and sm_90 (TTIR to cubin: no
device needed), where fp16 / bf16 lower to tensor-core MMAs; a CUDA-marked test runs the same grid compiled
on a GPU.

Interpreter notes: the interpreter stores bf16 as uint16 and its ``tl.dot`` multiplies those integers, so
under the interpreter bf16 tiles are upcast to fp32 before the dot (``DOT_FP32``; compiled, bf16 goes to the
tensor cores as is). fp32 uses ``input_precision="ieee"`` unless ``torch.backends.cuda.matmul.allow_tf32``.

Dispatch: ``sparse_ops.dispatch`` lists this kernel first for ``("csr", "cuda")``, cuSPARSE after it as the
planned path ``"csr:torch"``; the plan times dense (cuBLAS), each variant here and cuSPARSE per batch bucket.
It also runs the int8 layouts ``bitmap-int8`` and ``csr-int8`` (``prepare_int8``): the same kernel on int8
tiles (16 values per aligned block), q widened to x's dtype in registers and each output row multiplied by its
scale once in the epilogue, so one int8 checkpoint serves the CPU's kernels and this one.

Still to do (needs a GPU): measurements on a real one (``benchmarks/gpu_check.sh``; the prediction they test:
``benchmarks/results/gpu/model.md``), which decide whether the one-token variant "gemv" (multiply and sum
in fp32, no 16-row ``tl.dot``; planned beside the others, not yet ``pick``'s default) should be the default.

Example:
    >>> import torch
    >>> w = torch.zeros(40, 100); w[3, 7] = 2.0; w[35, 90] = -1.0
    >>> tb = TiledBitmap.from_dense(w)
    >>> tb.num_tiles, tb.nnz, torch.equal(tb.to_dense(), w)
    (2, 2, True)
    >>> tb.reference_matmul(torch.ones(1, 100))[0, [3, 35]].tolist()
    [2.0, -1.0]
"""
import contextlib
import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparse_ops import activations
from sparse_ops.bitmap import DEFAULT_TILE, TILE_KS, TILE_OUTS, Int8Tiles, TiledBitmap  # noqa: F401 (the layout)
from sparse_ops.errors import UnavailableError, UserValueError
from sparse_ops.formats import CSR, INT32_MAX, VALUE_DTYPES
from sparse_ops.quantized import BitmapInt8, CSRInt8, quantize_input

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the layout and its reference still work; available() is False
    triton = tl = libdevice = None

VARIANTS = ("plain", "splitk")
SPLITK_MAX_TOKENS = 64  # pick: split-K only for skinny products
MAX_SPLITS = 16
MIN_TILES_PER_SPLIT = 2  # a split should stream at least this many tiles
# what autotune keys its choice on (besides the arguments' dtypes): token bucket, shape, layout tile, splits
AUTOTUNE_KEY = ("N_BUCKET", "OUT", "IN", "TILE_OUT", "TILE_K", "SPLITS", "BLOCK_V")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Triton is importable and there is a CUDA device or the interpreter is on."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def variants(n: int) -> tuple[str, ...]:
    """The kernel's paths for n tokens: "plain" always, "splitk" where split-K can pay (few tokens), "gemv" at one
    token (split like "splitk" where that fills the GPU).

    >>> variants(1), variants(8), variants(1024)
    (('plain', 'splitk', 'gemv'), ('plain', 'splitk'), ('plain',))
    """
    return (*VARIANTS, "gemv") if n == 1 else VARIANTS if n <= 256 else ("plain",)


# --- the kernels -------------------------------------------------------------------------------------------
# Plain functions here, decorated by _build at the first product: the interpreter resolves the helper
# ``_popc32`` through the module's globals, so the decorated functions replace these names.

if tl is not None:
    def _popc32(v, HW: tl.constexpr):
        # bits set in each int32 of v: the hardware's popc compiled (one instruction on NVIDIA and AMD); SWAR
        # bit tricks in the interpreter, which has no libdevice popc (every shift is masked, so arithmetic
        # shifts are fine)
        if HW:
            return libdevice.popc(v)
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F  # per byte, <= 8: no sign bit from here on
        v = v + (v >> 8)
        v = v + (v >> 16)
        return v & 0x3F

    def _tiled_kernel(x_ptr, tile_ptr, tile_cols, starts, bitmaps, values, scales_ptr, bias_ptr, y_ptr, partial,
                      counters, N, OUT, IN, N_BUCKET, stride_xn, stride_yn, SPLITS,
                      TILE_OUT: tl.constexpr, TILE_K: tl.constexpr, HAS_SCALES: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PARTIAL: tl.constexpr, DOT_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, HW_POPC: tl.constexpr, ALIGN: tl.constexpr, GEMV: tl.constexpr,
                      WIDE: tl.constexpr, BLOCK_V: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr):
        WORDS: tl.constexpr = TILE_K // 32
        c = tl.arange(0, BLOCK_V)  # positions in a tile's value block (BLOCK_V: the layer's largest, padded)
        pid_o, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(tile_ptr + pid_o)
        end = tl.load(tile_ptr + pid_o + 1)
        chunk = (end - start + SPLITS - 1) // SPLITS
        lo = start + pid_s * chunk
        hi = tl.minimum(lo + chunk, end)

        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # tokens
        if WIDE:  # offsets past INT32_MAX: token offsets (x, y, partials) and tile indices in int64
            n = n.to(tl.int64)
        i = tl.arange(0, TILE_OUT)  # rows within the tile
        k = tl.arange(0, TILE_K)  # columns within the tile
        kw = k // 32  # the column's word
        kb = k % 32  # its bit
        below = (tl.full((TILE_K,), 1, tl.int32) << kb) - 1  # bits before the column's (1 << 31 wraps: fine)
        n_ok = n < N
        acc = tl.zeros((BLOCK_N, TILE_OUT), dtype=tl.float32)
        acc1 = tl.zeros((TILE_OUT,), dtype=tl.float32)  # GEMV: the one token's sums
        # STEP tiles per iteration, each loaded as its own block: their loads are independent, so a sparse layer
        # (small blocks) keeps as many bytes in flight per iteration as a dense one
        for tile0 in range(lo, hi, STEP):
            for g in tl.static_range(STEP):
                tile = tile0 + g
                if STEP > 1:  # the last iteration's tiles past the split's end: the last tile again, zeroed
                    live = tile < hi
                    tile = tl.minimum(tile, hi - 1)
                t = tile
                if WIDE:
                    t = tl.cast(tile, tl.int64)
                base = t * (TILE_OUT * WORDS) + i * WORDS  # (TILE_OUT,) each row's first word
                row_nnz = tl.zeros((TILE_OUT,), dtype=tl.int32)
                word = tl.zeros((TILE_OUT, TILE_K), dtype=tl.int32)  # each entry's word
                earlier = tl.zeros((TILE_OUT, TILE_K), dtype=tl.int32)  # nonzeros in its row's earlier words
                for j in tl.static_range(WORDS):
                    wj = tl.load(bitmaps + base + j)  # (TILE_OUT,)
                    cj = _popc32(wj, HW_POPC)
                    row_nnz += cj
                    word = tl.where((kw == j)[None, :], wj[:, None], word)
                    earlier += tl.where((kw > j)[None, :], cj[:, None], 0)
                row_start = tl.cumsum(row_nnz, 0) - row_nnz  # exclusive prefix over the tile's rows
                rank = row_start[:, None] + earlier + _popc32(word & below[None, :], HW_POPC)
                if BLOCK_V < TILE_OUT * TILE_K:  # an absent entry past the block's last value: any index in it
                    rank = tl.minimum(rank, BLOCK_V - 1)
                present = ((word >> kb[None, :]) & 1) != 0
                if STEP > 1:
                    present = present & live
                # the tile's values as one aligned block (vector loads, pipelined), then each entry's by its rank
                first = tl.multiple_of(tl.load(starts + t), ALIGN)
                size = tl.multiple_of(tl.load(starts + t + 1) - first, ALIGN)
                block = tl.load(values + first + c, mask=c < size, other=0.0)  # (BLOCK_V,)
                w = tl.gather(block, tl.reshape(rank, (TILE_OUT * TILE_K,)), 0)
                w = tl.where(present, tl.reshape(w, (TILE_OUT, TILE_K)), 0.0)

                cols = tl.load(tile_cols + t) * TILE_K + k
                if GEMV:  # one token: multiply and sum the rows in fp32, no 16-token MMA padding or layout
                    xk = tl.load(x_ptr + cols, mask=cols < IN, other=0.0).to(tl.float32)
                    acc1 += tl.sum(w.to(tl.float32) * xk[None, :], 1)
                else:
                    xt = tl.load(x_ptr + n[:, None] * stride_xn + cols[None, :],
                                 mask=n_ok[:, None] & (cols < IN)[None, :], other=0.0)
                    acc = _dot_wt(acc, xt, w, DOT_FP32, PRECISION)
        if GEMV:
            acc += acc1[None, :]  # token 0's row (the others are masked at the store)

        _finish(acc, n, pid_o * TILE_OUT + i, N, OUT, scales_ptr, bias_ptr, y_ptr, stride_yn, partial, counters,
                SPLITS, HAS_SCALES, HAS_BIAS, ACT, PARTIAL)

    def _dot_wt(acc, x, w, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        # acc + x @ w^T for an (M, K) activation tile and an (N, K) weight tile, in x's dtype on the tensor cores;
        # in fp32 where the interpreter cannot multiply bf16 (DOT_FP32)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        return acc

    def _activate(v, ACT: tl.constexpr):
        # activations.CODES on fp32 values: 1 relu, 2 gelu (erf), 3 gelu (tanh), 4 silu
        if ACT == 1:
            v = tl.maximum(v, 0.0)
        elif ACT == 2:
            v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
        elif ACT == 3:  # 0.5 v (1 + tanh(u)) = v sigmoid(2u); 2u clamped where sigmoid is 0 or 1 in fp32 anyway
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            v = v * tl.sigmoid(tl.minimum(tl.maximum(2.0 * u, -80.0), 80.0))
        elif ACT == 4:
            v = v * tl.sigmoid(v)
        return v

    def _store_rows(acc, n, o, N, OUT, scales_ptr, bias_ptr, y_ptr, stride_yn, HAS_SCALES: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
        # y[n, o] = act(scales[o] * acc + bias[o]) in y's dtype (rows >= OUT and tokens >= N masked)
        o_ok = o < OUT
        if HAS_SCALES:  # int8 values: W = scales[:, None] * q, one multiply per output row (weight-only int8)
            acc *= tl.load(scales_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACT)
        tl.store(y_ptr + n[:, None] * stride_yn + o[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(n < N)[:, None] & o_ok[None, :])

    def _finish(acc, n, o, N, OUT, scales_ptr, bias_ptr, y_ptr, stride_yn, partial, counters, SPLITS,
                HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PARTIAL: tl.constexpr):
        # A program's (BLOCK_N, TILE_OUT) product: stored (plain), or, split-K, its fp32 partial stored and one
        # arrival counted on the output tile's counter; the program that arrives last sums the SPLITS partials
        # in split order (deterministic, whichever arrives last), finishes the rows and zeroes the counter.
        if PARTIAL:
            ok = (n < N)[:, None] & (o < OUT)[None, :]
            # partial is (SPLITS, N, OUT) fp32; int64 offsets where n is (WIDE)
            tl.store(partial + (tl.program_id(2) * N + n)[:, None] * OUT + o[None, :], acc, mask=ok,
                     cache_modifier=".cg")
            # every thread's stores precede the arrival, which releases them at GPU scope; the last program's
            # acquire orders its loads after all of them (.cg: from L2, never a stale L1 line)
            tl.debug_barrier()
            counter = counters + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                total = tl.zeros_like(acc)
                for s in range(SPLITS):
                    total += tl.load(partial + (s * N + n)[:, None] * OUT + o[None, :], mask=ok, other=0.0,
                                     cache_modifier=".cg")
                _store_rows(total, n, o, N, OUT, scales_ptr, bias_ptr, y_ptr, stride_yn, HAS_SCALES, HAS_BIAS, ACT)
                tl.store(counter, 0)  # ready for the next launch (and for a CUDA graph's next replay)
        else:
            _store_rows(acc, n, o, N, OUT, scales_ptr, bias_ptr, y_ptr, stride_yn, HAS_SCALES, HAS_BIAS, ACT)


def token_configs(interpret: bool) -> list:
    """One config under the interpreter or with ``SPARSE_OPS_TRITON_AUTOTUNE=0`` (autotune benchmarks nothing:
    the CUDA tests compile one kernel per case), else token blocks x warps x stages."""
    if interpret or os.environ.get("SPARSE_OPS_TRITON_AUTOTUNE") == "0":
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn in (16, 32, 64, 128) for w, s in ((4, 2), (4, 3), (8, 3))]


def prune_token_configs(configs, named_args, **kwargs):
    """Token blocks no larger than the token count's power of two (16 at least)."""
    largest = max(16, named_args["N_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_N"] <= largest] or configs[:1]


class Launcher:
    """An autotuned kernel launched through ``triton.autotune`` the first time a key is seen, and directly with
    the config it chose from then on: a repeated call skips the autotuner's per-call work (its argument dict,
    key, hooks and config merge). ``key`` must be at least as fine as the autotuner's own (its key's integers and
    every tensor argument's dtype); ``grid(BLOCK_N)`` gives the launch grid."""

    def __init__(self, autotuned) -> None:
        self.autotuned = autotuned
        self.chosen: dict[tuple, dict] = {}  # key -> the chosen config's launch keywords

    def __call__(self, key: tuple, grid, args: tuple, constexprs: dict) -> None:
        config = self.chosen.get(key)
        if config is None:
            self.autotuned[lambda meta: grid(meta["BLOCK_N"])](*args, **constexprs)
            self.chosen[key] = config = self.autotuned.best_config.all_kwargs()
            return
        self.autotuned.fn[grid(config["BLOCK_N"])](*args, **constexprs, **config)


@dataclass(frozen=True)
class Launch:
    """One product's launch, worked out once per layer and call signature (token count, dtypes, bias, split
    count, epilogue) and kept in the layer's state (``launches``): the kernel's trailing integer arguments, its
    constexprs, the autotune key, the grid as a function of BLOCK_N (None: nothing to compute) and split-K's
    scratch sizes (partial entries, counters; None without split-K). A repeated call then costs a dict lookup,
    its output's allocation and the launch."""

    ints: tuple
    constexprs: dict
    key: tuple
    grid: Callable[[int], tuple] | None
    scratch: tuple[int, int] | None


MAX_LAUNCHES = 256  # call signatures kept per layer (prefills of many lengths clear it, not grow it)


def remember(launches: dict, signature: tuple, make: Callable[[], Launch]) -> Launch:
    """``launches[signature]``, made (and checked: ``make`` raises on a bad call) the first time.

    >>> memo = {}
    >>> remember(memo, ("x", 3), lambda: "made"), remember(memo, ("x", 3), lambda: "not again")
    ('made', 'made')
    """
    launch = launches.get(signature)
    if launch is None:
        launch = make()
        if len(launches) >= MAX_LAUNCHES:
            launches.clear()
        launches[signature] = launch
    return launch


def signature(x: torch.Tensor, bias: torch.Tensor | None, *rest) -> tuple:
    """What decides a call's ``Launch``: x's shape, dtype and device, the bias's shape and dtype, whether fp32
    runs in TF32 (``torch.backends.cuda.matmul.allow_tf32``, read per call), and ``rest`` (splits, epilogue)."""
    return (x.shape, x.dtype, x.device, None if bias is None else (bias.shape, bias.dtype), precision(x), *rest)


def precision(x: torch.Tensor) -> str:
    """``tl.dot``'s input precision for x: "tf32" for fp32 where torch allows TF32 matmuls, else "ieee"."""
    return "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): the autotune key's token bucket.

    >>> pow2_at_least(1), pow2_at_least(16), pow2_at_least(17)
    (1, 16, 32)
    """
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class _Kernels:
    tiled: Launcher  # _tiled_kernel, autotuned
    interpret: bool


JIT_HELPERS = ("_popc32", "_dot_wt", "_activate", "_store_rows", "_finish")  # device functions the kernels call


@functools.cache
def _build() -> _Kernels:
    """Decorate the kernels (once per process): compiled or interpreted per ``TRITON_INTERPRET`` now."""
    if triton is None:
        raise UnavailableError("the Triton sparse kernels need triton")
    interpret = interpreting()
    g = globals()
    for name in (*JIT_HELPERS, "_tiled_kernel"):
        g[name] = triton.jit(getattr(g[name], "fn", g[name]))
    return _Kernels(autotuned(g["_tiled_kernel"], AUTOTUNE_KEY), interpret)


def autotuned(kernel, key: tuple[str, ...]) -> Launcher:
    """``kernel`` autotuned over ``token_configs`` (pruned by ``prune_token_configs``) on ``key``, behind a
    ``Launcher``. Where this Triton can, the choices persist in Triton's cache (``cache_results``), so a new
    process does not benchmark a shape again."""
    options = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return Launcher(triton.autotune(configs=token_configs(interpreting()), key=list(key),
                                    prune_configs_by={"early_config_prune": prune_token_configs}, **options)(kernel))


def wide_offsets(*sizes: int) -> bool:
    """Whether a launch over buffers of these element counts needs int64 offsets (the kernels' ``WIDE``): any
    past INT32_MAX. Long prefills get there first: 131,072 tokens x 16,384 features is past 2^31.

    >>> wide_offsets(4096 * 4096, 64 * 11008), wide_offsets(131072 * 16384)
    (False, True)
    """
    return max(sizes, default=0) > INT32_MAX


# split-K's scratch per (device, stream): fp32 partial sums and one arrival counter per output tile, which the
# kernel leaves at zero (the last program of each tile resets its own). Grown as needed, never shrunk.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K's (fp32 partial sums, int32 zeroed counters) holding at least ``partials`` / ``counters``
    entries: kept per device and stream (launches on one stream run in order, so layers share it), fresh while
    a CUDA graph is being captured (the graph keeps its own, zeroed by the captured fill on every replay).

    >>> partials, counters = workspace(torch.device("cpu"), 64, 4)
    >>> partials.dtype, partials.numel() >= 64, counters.dtype, int(counters.abs().sum())
    (torch.float32, True, torch.int32, 0)
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return (torch.empty(partials, dtype=torch.float32, device=device),
                torch.zeros(counters, dtype=torch.int32, device=device))
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
    have = _WORKSPACES.get(key)
    if have is None or have[0].numel() < partials or have[1].numel() < counters:
        grow = (0, 0) if have is None else (have[0].numel(), have[1].numel())
        have = (torch.empty(max(partials, grow[0]), dtype=torch.float32, device=device),
                torch.zeros(max(counters, grow[1]), dtype=torch.int32, device=device))
        _WORKSPACES[key] = have
    return have


def target_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM on CUDA; 8 elsewhere (the interpreter: only for the tests)."""
    if device.type != "cuda":
        return 8
    return _cuda_programs(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def _splits_to_fill(tb: TiledBitmap, n: int) -> int:
    """Programs per tile row that fill the GPU at n tokens (``target_programs``), within the row's tiles."""
    programs = tb.tile_rows * -(-n // 16)
    want = -(-target_programs(tb.device) // max(programs, 1))
    return min(want, -(-tb.max_row_tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS)


def pick(tb: TiledBitmap, n: int) -> str:
    """The variant for n tokens where no plan chose one: "splitk" for skinny products it fills, else "plain"."""
    if n > SPLITK_MAX_TOKENS or tb.max_row_tiles < 2:
        return "plain"
    return "splitk" if _splits_to_fill(tb, n) >= 2 else "plain"


def choose_splits(tb: TiledBitmap, n: int, variant: str) -> int:
    """Programs per tile row: 1 for "plain", at least 2 for "splitk", as many as fill the GPU for "gemv"."""
    if variant not in (*VARIANTS, "gemv") or (variant == "gemv" and n != 1):
        raise UserValueError(f"unknown variant {variant!r} for {n} tokens; allowed: {', '.join(VARIANTS)}, and "
                             f"gemv at one token")
    if variant == "gemv":
        return max(_splits_to_fill(tb, n), 1) if tb.max_row_tiles >= 2 else 1
    return 1 if variant == "plain" else max(_splits_to_fill(tb, n), 2)


VALUE_ALIGN_BYTES = 16  # each tile's value block starts on this boundary: one 16-byte vector per load
MIN_BLOCK_V = 16  # the smallest value block the kernel loads per tile
MAX_STEP = 4  # tiles per loop iteration, at most


@dataclass(frozen=True, eq=False)
class AlignedTiles:
    """A tiled bitmap as the GPU kernel streams it: the same tiles, bitmaps and values, except that tile t's values
    start at ``starts[t]``, a multiple of ``align`` elements (16 bytes), the gap after each tile zero. Each
    tile's values are then one aligned block the kernel loads as vectors (and Triton pipelines), whatever its
    popcount. The stored ``TiledBitmap`` keeps its offsets as the popcounts' prefix sums (its format, which the
    CPU reads too); ``prepare`` builds this copy once per layer and device (about ``align / 2`` more values per
    tile: under 2% of a 32 x 64 tile's values from 10% density up).

    >>> w = torch.eye(40); w[0, 1] = 1.0  # tiles of 33 and 8 values
    >>> a = AlignedTiles.from_tiled(TiledBitmap.from_dense(w))
    >>> a.align, a.starts.tolist(), a.values.numel()  # fp32: 4 values per 16 bytes
    (4, [0, 36, 44], 44)
    >>> a.block, a.step  # the largest tile (36 values) fits a block of 64: 4 tiles per iteration
    (64, 4)
    """

    tile_ptr: torch.Tensor  # (tile_rows + 1,) int32, as the TiledBitmap's
    tile_cols: torch.Tensor  # (T,) int32
    starts: torch.Tensor  # (T + 1,) int32 (int64 past INT32_MAX): tile t's values are
    # values[starts[t] : starts[t + 1]], zero-padded
    bitmaps: torch.Tensor  # (T, TILE_OUT, TILE_K // 32) int32
    values: torch.Tensor  # (starts[-1],)
    shape: tuple[int, int]
    tile_out: int
    tile_k: int
    max_row_tiles: int
    align: int  # elements per VALUE_ALIGN_BYTES
    block: int  # the kernel's value block: a power of two >= the largest tile's padded count (BLOCK_V)
    step: int  # tiles per loop iteration (STEP): as many blocks as fit a dense tile's, up to MAX_STEP
    scales: torch.Tensor | None = None  # int8 values: (out,) row scales in the compute dtype, W = scales * q
    input_bits: int | None = None  # int8 weights: x quantized per block first (quantized.quantize_input)
    launches: dict = field(default_factory=dict, init=False, repr=False)  # call signature -> Launch
    splits: dict = field(default_factory=dict, init=False, repr=False)  # (tokens, variant) -> programs per row

    @classmethod
    def from_tiled(cls, tb: TiledBitmap, max_step: int = MAX_STEP) -> "AlignedTiles":
        """The aligned copy of ``tb``. ``step``: as many tiles per iteration as their blocks fit a dense tile's,
        up to ``max_step``, so that a sparser layer still loads about a dense tile's bytes per iteration and keeps
        as many loads in flight."""
        align = max(1, VALUE_ALIGN_BYTES // tb.values.element_size())
        offsets = tb.value_offsets.to(torch.int64)
        counts = offsets[1:] - offsets[:-1]
        starts = torch.zeros_like(offsets)
        torch.cumsum((counts + align - 1) // align * align, 0, out=starts[1:])
        total = int(starts[-1]) if starts.numel() else 0
        values = torch.zeros(total, dtype=tb.values.dtype, device=tb.values.device)
        tile = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        values[torch.arange(tb.nnz, device=counts.device) - offsets[tile] + starts[tile]] = tb.values
        largest = int((starts[1:] - starts[:-1]).max()) if counts.numel() else 0
        block = min(max(pow2_at_least(largest), MIN_BLOCK_V), tb.tile_out * tb.tile_k)
        starts = starts if wide_offsets(total) else starts.to(torch.int32)  # int64 past INT32_MAX (WIDE)
        step = max(1, min(max_step, tb.tile_out * tb.tile_k // block))
        return cls(tb.tile_ptr, tb.tile_cols, starts, tb.bitmaps, values, tb.shape, tb.tile_out,
                   tb.tile_k, tb.max_row_tiles, align, block, step)

    @property
    def tile_rows(self) -> int:
        return -(-self.shape[0] // self.tile_out)


    @property
    def nbytes(self) -> int:
        """Bytes of the state's tensors: what the kernel streams (tile pointers, columns, starts, bitmaps,
        values, scales)."""
        parts = (self.tile_ptr, self.tile_cols, self.starts, self.bitmaps, self.values, self.scales)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    @functools.cached_property
    def launch_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tile_cols, starts, bitmaps, values) as the kernel takes them: an empty part (all tiles zero: never
        read) replaced by one zero, so every pointer is real; computed once per layer, not per call."""
        parts = [self.tile_cols, self.starts, self.bitmaps, self.values]
        return tuple(p if p.numel() else torch.zeros(1, dtype=p.dtype, device=p.device) for p in parts)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the product computes in: the values', or an int8 weight's scales'."""
        return self.values.dtype if self.scales is None else self.scales.dtype


def check_product(shape: tuple[int, int], device: torch.device, x: torch.Tensor, bias: torch.Tensor | None,
                  splits: int) -> None:
    """ValueError naming the bad argument of ``x @ W^T + bias`` for a weight of ``shape`` on ``device``;
    RuntimeError for CPU tensors outside the interpreter."""
    out, inp = shape
    if x.dim() != 2 or x.shape[1] != inp:
        raise UserValueError(f"x must have shape (N, {inp}), got {tuple(x.shape)}")
    if x.dtype not in VALUE_DTYPES:
        raise UserValueError(f"x must be fp32 / fp16 / bf16, got {x.dtype}")
    if x.device != device:
        raise UserValueError(f"x is on {x.device}, the weight on {device}")
    if bias is not None and bias.shape != (out,):
        raise UserValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")
    if splits < 1:
        raise UserValueError(f"splits must be >= 1, got {splits}")
    if x.device.type != "cuda" and not interpreting():
        raise UnavailableError("the Triton kernels run CPU tensors only under the interpreter: "
                           "TRITON_INTERPRET=1 before the first product")


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The current CUDA device set to x's for a launch (Triton launches on the current device, not the
    tensors'); nothing elsewhere."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def tiled_matmul(tb: AlignedTiles | TiledBitmap, x: torch.Tensor, bias: torch.Tensor | None = None, *,
                 splits: int = 1, gemv: bool = False, activation: str | None = None) -> torch.Tensor:
    """``act(x @ W^T + bias)`` for x (N, in) on the Triton kernel, in x's dtype, in one launch; ``splits`` > 1:
    split-K (the last program of each output tile sums the splits); ``gemv`` (one token only): sums in fp32
    without ``tl.dot``; ``activation``: one of ``activations.ACTIVATIONS``, applied in the kernel's epilogue.
    A ``TiledBitmap`` is aligned first (``AlignedTiles``: once per layer through ``prepare``, per call here)."""
    if isinstance(tb, TiledBitmap):
        tb = AlignedTiles.from_tiled(tb)
    launch = remember(tb.launches, signature(x, bias, splits, gemv, activation),
                      lambda: _tiled_launch(tb, x, bias, splits, gemv, activation))
    y = torch.empty(x.shape[0], tb.shape[0], dtype=x.dtype, device=x.device)
    if launch.grid is None:
        return y
    x = x.contiguous()
    partial, counters = workspace(x.device, *launch.scratch) if launch.scratch else (y, y)
    args = (x, tb.tile_ptr, *tb.launch_parts, x if tb.scales is None else tb.scales,
            x if bias is None else bias.contiguous(), y, partial, counters, *launch.ints)
    with on_device(x):
        _build().tiled(launch.key, launch.grid, args, launch.constexprs)
    return y


def _tiled_launch(tb: AlignedTiles, x: torch.Tensor, bias: torch.Tensor | None, splits: int, gemv: bool,
                  activation: str | None) -> Launch:
    """The ``Launch`` of a call like this one (checking its arguments)."""
    if gemv and x.shape[0] != 1:
        raise UserValueError(f"the gemv kernel takes one token, got {x.shape[0]}")
    check_product(tb.shape, tb.device, x, bias, splits)
    act = activations.CODES[activations.check(activation)]
    interpret = _build().interpret
    (out, inp), n = tb.shape, x.shape[0]
    bucket = pow2_at_least(n)
    constexprs = dict(
        TILE_OUT=tb.tile_out, TILE_K=tb.tile_k, HAS_SCALES=tb.scales is not None, HAS_BIAS=bias is not None,
        ACT=act, PARTIAL=splits > 1, PRECISION=precision(x), HW_POPC=not interpret,
        ALIGN=tb.align, GEMV=gemv, DOT_FP32=interpret and torch.bfloat16 in (x.dtype, tb.dtype),
        BLOCK_V=tb.block, STEP=tb.step,
        WIDE=wide_offsets(x.numel(), splits * n * out, tb.values.numel(), tb.bitmaps.numel()))
    # the autotuner's key (its integers, then every tensor argument's dtype) follows from these
    key = (bucket, out, inp, tb.tile_out, tb.tile_k, splits, tb.block, x.dtype, tb.starts.dtype, tb.values.dtype,
           None if tb.scales is None else tb.scales.dtype, None if bias is None else bias.dtype)
    rows = tb.tile_rows
    return Launch(
        ints=(n, out, inp, bucket, inp, out, splits), constexprs=constexprs, key=key,
        grid=None if n == 0 or out == 0 else lambda block_n: (rows, -(-n // block_n), splits),
        # split-K: partial sums, and one counter per output tile at the smallest token block (16)
        scratch=(splits * n * out, rows * -(-n // 16)) if splits > 1 else None)


# --- the registry's entry points ---------------------------------------------------------------------------

def prepare(w: CSR | TiledBitmap | AlignedTiles, tile: tuple[int, int] = DEFAULT_TILE) -> AlignedTiles:
    """The layer's state, once per layer and device: the tiled bitmap of a CSR weight, aligned, on its device."""
    if isinstance(w, AlignedTiles):
        return w
    return AlignedTiles.from_tiled(w if isinstance(w, TiledBitmap) else TiledBitmap.from_csr(w, tile))


def prepare_int8(w: BitmapInt8 | CSRInt8) -> AlignedTiles:
    """An int8 weight's state: its int8 tiles aligned (a CSR int8 weight tiled first), its scales, its
    ``input_bits``. The kernel widens q to x's dtype in registers and scales each output row once (weight-only
    int8: one checkpoint serves the CPU's int8 kernels and this one)."""
    tiles = w.q if isinstance(w.q, TiledBitmap) else Int8Tiles.from_dense(w.q.to_dense(), DEFAULT_TILE)
    return dataclasses.replace(AlignedTiles.from_tiled(tiles), scales=w.scales.contiguous(),
                               input_bits=w.input_bits)


def matmul(state: AlignedTiles, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None, *,
           post=None, variant: str = "plain") -> torch.Tensor:
    """The registry's signature (``sparse_ops.dispatch``): ``post(act(x @ W^T + bias))``; the activation in the
    kernel's epilogue, the post-op (``sparse_ops.post.AddNorm``) after it with torch ops. ``variant``: one of
    ``variants(N)``, "plain", "splitk" or at one token "gemv" (``pick`` gives the default)."""
    splits = state.splits.get((x.shape[0], variant))
    if splits is None:
        splits = state.splits[x.shape[0], variant] = choose_splits(state, x.shape[0], variant)
    x = x if state.input_bits is None else quantize_input(x)  # the CPU int8 kernels' numbers
    y = tiled_matmul(state, x, bias, splits=splits, gemv=variant == "gemv", activation=activation)
    return y if post is None else post.apply(y)
