"""A Triton kernel for 2:4 weights at small batch: ``y = x @ W^T + b`` read straight from the stored ``TwoFour``.

Why: torch's semi-structured 2:4 (cuSPARSELt / CUTLASS) is tuned for large products; at decode batches it is
slower than dense (pytorch #111339: 0.11x at batch 1 on 4096 x 4096; it wins only above about 1,280 tokens,
pytorch/ao #1460). At 1-256 tokens the product is memory-bound, and a 2:4 weight is 9/16 of dense in fp16
(its values, half the entries, plus a 4-bit code per group of four: 1/16 of dense). So the kernel streams only
those bytes and expands each tile into a dense tile in registers before a dense ``tl.dot`` on tensor cores, as
the tiled-bitmap kernel does for unstructured weights (``triton_sparse``, whose split-K reduction and token-
block autotuning it shares).

Layout: the stored ``sparse_ops.formats.TwoFour`` itself, nothing derived at load: ``values`` (out, in/2),
the two kept entries of each group of four in column order, and ``metadata`` (out, ceil(in/8)) uint8, per
group the code ``p0 | p1 << 2`` (0 <= p0 < p1 <= 3), even group in the low nibble.

Kernel: grid (row tiles of TILE_OUT, token blocks of BLOCK_N, splits of the input). Per TILE_OUT x TILE_K tile
it loads the rows' TILE_K / 2 values and TILE_K / 8 code bytes as blocks (contiguous runs of each row: vector
loads, which Triton pipelines with ``cp.async``), then expands them in registers: group g's code (nibble g % 2
of byte g // 2) puts its first value at position p0 and its second at p1, zeros elsewhere (``tl.split`` of the
values into each group's pair, ``tl.where`` per position, ``tl.join`` back into columns), before a dense
``tl.dot`` on tensor cores. ``tests/test_triton_compiled.py`` checks the compiled loads stay vectors.
Tails: in is a multiple of 4 (the format's rule); columns >= in, tokens >= N and rows >= out are masked.

Split-K (variant "splitk"): the input dimension is cut into SPLITS ranges of whole tiles; each program writes
its fp32 partial product and the last to finish each output tile sums them in split order, adds the bias,
applies the activation and casts (``triton_sparse._finish``: one launch, deterministic).
``pick`` (the default a plan does not override): split-K when tokens <= ``triton_sparse.SPLITK_MAX_TOKENS`` and
the row tiles x token blocks are fewer than ``triton_sparse.target_programs`` (4 per SM).

Tested on CPU tensors under ``TRITON_INTERPRET=1`` (``tests/test_triton_two_four.py``) and compiled for sm_80
/ sm_90 without a device; on a GPU the CUDA-marked test runs the same grid compiled.

Example:
    >>> import torch
    >>> from sparse_ops.formats import TwoFour
    >>> w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    >>> wt = TwoFour.from_dense(w)
    >>> choose_splits(wt, 1, "plain"), choose_splits(wt, 1, "splitk")
    (1, 2)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from sparse_ops import activations
from sparse_ops.errors import UnavailableError, UserValueError
from sparse_ops.formats import TwoFour
from sparse_ops.kernels import triton_sparse as ts

triton, tl = ts.triton, ts.tl

TILE_OUT, TILE_K = 32, 64  # a tile: TILE_OUT rows x TILE_K input columns (16 groups of four)
AUTOTUNE_KEY = ("N_BUCKET", "OUT", "IN", "SPLITS")
VARIANTS = ts.VARIANTS
available = ts.available


def variants(n: int) -> tuple[str, ...]:
    """The kernel's paths for n tokens: "plain", and "splitk" where split-K can pay (few tokens)."""
    return VARIANTS if n <= 256 else ("plain",)


def _k_tiles(w: TwoFour | TwoFourState) -> int:
    return -(-w.shape[1] // TILE_K)


def _splits_to_fill(w: TwoFour | TwoFourState, n: int) -> int:
    """Input ranges per row tile that fill the GPU at n tokens, within the input's tiles."""
    programs = -(-w.shape[0] // TILE_OUT) * -(-n // 16)
    want = -(-ts.target_programs(w.values.device) // max(programs, 1))
    return min(want, -(-_k_tiles(w) // ts.MIN_TILES_PER_SPLIT), ts.MAX_SPLITS)


def pick(w: TwoFour | TwoFourState, n: int) -> str:
    """The variant for n tokens where no plan chose one: "splitk" for skinny products it fills, else "plain"."""
    if n > ts.SPLITK_MAX_TOKENS or _k_tiles(w) < 2:
        return "plain"
    return "splitk" if _splits_to_fill(w, n) >= 2 else "plain"


def choose_splits(w: TwoFour | TwoFourState, n: int, variant: str) -> int:
    """Input ranges per row tile: 1 for "plain", at least 2 for "splitk"."""
    if variant not in VARIANTS:
        raise UserValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    return 1 if variant == "plain" else max(_splits_to_fill(w, n), 2)


if tl is not None:
    def _two_four_kernel(x_ptr, values, metadata, bias_ptr, y_ptr, partial, counters, N, OUT, IN, N_BUCKET,
                         stride_xn, stride_yn, SPLITS, TILES_PER_SPLIT, TILE_OUT: tl.constexpr,
                         TILE_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PARTIAL: tl.constexpr,
                         DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        pid_o, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # tokens
        o = pid_o * TILE_OUT + tl.arange(0, TILE_OUT)  # output rows
        if WIDE:  # offsets past INT32_MAX: tokens (x, y, partials) and rows (values, codes) in int64
            n = n.to(tl.int64)
            o = o.to(tl.int64)
        k = tl.arange(0, TILE_K)  # columns within the tile
        n_ok, o_ok = n < N, o < OUT
        half, code_row = IN // 2, (IN + 7) // 8  # values and metadata row lengths
        kv = tl.arange(0, TILE_K // 2)  # the tile's stored values in a row: two per group
        kb = tl.arange(0, TILE_K // 8)  # the tile's code bytes in a row: two groups each
        acc = tl.zeros((BLOCK_N, TILE_OUT), dtype=tl.float32)
        k_lo = pid_s * TILES_PER_SPLIT * TILE_K
        k_hi = tl.minimum(k_lo + TILES_PER_SPLIT * TILE_K, IN)
        for k0 in range(k_lo, k_hi, TILE_K):
            cols = k0 + k
            # the tile's values and codes as blocks: contiguous runs of each row, loaded as vectors
            vcols, bcols = k0 // 2 + kv, k0 // 8 + kb
            v = tl.load(values + o[:, None] * half + vcols[None, :],
                        mask=o_ok[:, None] & (vcols < half)[None, :], other=0.0)  # (TILE_OUT, TILE_K / 2)
            byte = tl.load(metadata + o[:, None] * code_row + bcols[None, :],
                           mask=o_ok[:, None] & (bcols < code_row)[None, :], other=0).to(tl.int32)
            # expanded in registers: group g's code (nibble g % 2 of byte g // 2) says where its two values go
            code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (TILE_OUT, TILE_K // 4))
            p0, p1 = code & 3, code >> 2
            a, b = tl.split(tl.reshape(v, (TILE_OUT, TILE_K // 4, 2)))  # each group's first and second value
            e0 = tl.where(p0 == 0, a, 0.0)  # position 0 can only hold the first value
            e1 = tl.where(p0 == 1, a, tl.where(p1 == 1, b, 0.0))
            e2 = tl.where(p0 == 2, a, tl.where(p1 == 2, b, 0.0))
            e3 = tl.where(p1 == 3, b, 0.0)  # position 3 only the second
            # (TILE_OUT, G, 2, 2) with [..., i, j] = entry 2 i + j of the group, then (TILE_OUT, TILE_K)
            w = tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), (TILE_OUT, TILE_K))
            xt = tl.load(x_ptr + n[:, None] * stride_xn + cols[None, :],
                         mask=n_ok[:, None] & (cols < IN)[None, :], other=0.0)
            acc = ts._dot_wt(acc, xt, w, DOT_FP32, PRECISION)

        ts._finish(acc, n, o, N, OUT, bias_ptr, bias_ptr, y_ptr, stride_yn, partial, counters, SPLITS, False,
                   HAS_BIAS, ACT, PARTIAL)


@functools.cache
def _build() -> ts.Launcher:
    """Decorate the kernel (once per process), compiled or interpreted per ``TRITON_INTERPRET`` now."""
    if triton is None:
        raise UnavailableError("the Triton 2:4 kernel needs triton")
    ts._build()  # the shared device functions (ts._finish), decorated the same way
    g = globals()
    g["_two_four_kernel"] = triton.jit(getattr(g["_two_four_kernel"], "fn", g["_two_four_kernel"]))
    return ts.autotuned(g["_two_four_kernel"], AUTOTUNE_KEY)


@dataclass(frozen=True, eq=False)
class TwoFourState:
    """A 2:4 weight as the kernel reads it: the stored parts, contiguous (nothing re-encoded), and the layer's
    launches by call signature (``triton_sparse.Launch``).

    >>> state = prepare(TwoFour.from_dense(torch.tensor([[1.0, 0.0, 2.0, 0.0]])))
    >>> state.shape, state.values.tolist(), state.nbytes  # 2 fp32 values and one byte of codes
    ((1, 4), [[1.0, 2.0]], 9)
    """

    values: torch.Tensor  # (out, in / 2)
    metadata: torch.Tensor  # (out, ceil(in / 8)) uint8
    shape: tuple[int, int]
    launches: dict = field(default_factory=dict, init=False, repr=False)
    splits: dict = field(default_factory=dict, init=False, repr=False)  # (tokens, variant) -> splits

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: the values and the codes."""
        return self.values.numel() * self.values.element_size() + self.metadata.numel()


def two_four_matmul(w: TwoFour | TwoFourState, x: torch.Tensor, bias: torch.Tensor | None = None, *,
                    splits: int = 1, activation: str | None = None) -> torch.Tensor:
    """``act(x @ W^T + bias)`` for x (N, in) on the Triton kernel, in x's dtype, in one launch; ``splits`` > 1:
    split-K (the last program of each output tile sums the splits); ``activation`` in the epilogue."""
    state = w if isinstance(w, TwoFourState) else prepare(w)
    launch = ts.remember(state.launches, ts.signature(x, bias, splits, activation),
                         lambda: _launch(state, x, bias, splits, activation))
    y = torch.empty(x.shape[0], state.shape[0], dtype=x.dtype, device=x.device)
    if launch.grid is None:
        return y
    x = x.contiguous()
    partial, counters = ts.workspace(x.device, *launch.scratch) if launch.scratch else (y, y)
    args = (x, state.values, state.metadata, x if bias is None else bias.contiguous(), y, partial, counters,
            *launch.ints)
    with ts.on_device(x):
        _build()(launch.key, launch.grid, args, launch.constexprs)
    return y


def _launch(state: TwoFourState, x: torch.Tensor, bias: torch.Tensor | None, splits: int,
            activation: str | None) -> ts.Launch:
    """The ``Launch`` of a call like this one (checking its arguments)."""
    (out, inp), n = state.shape, x.shape[0]
    ts.check_product(state.shape, state.values.device, x, bias, splits)
    act = activations.CODES[activations.check(activation)]
    k_tiles = -(-inp // TILE_K)
    per_split = -(-k_tiles // splits)
    splits = -(-k_tiles // per_split)  # no empty split
    row_tiles = -(-out // TILE_OUT)
    bucket = ts.pow2_at_least(n)
    constexprs = dict(
        TILE_OUT=TILE_OUT, TILE_K=TILE_K, HAS_BIAS=bias is not None, ACT=act, PARTIAL=splits > 1,
        DOT_FP32=ts._build().interpret and torch.bfloat16 in (x.dtype, state.dtype),
        PRECISION=ts.precision(x), WIDE=ts.wide_offsets(x.numel(), splits * n * out, state.values.numel()))
    # the autotuner's key (its integers, then every tensor argument's dtype) follows from these
    key = (bucket, out, inp, splits, x.dtype, state.dtype, None if bias is None else bias.dtype)
    return ts.Launch(
        ints=(n, out, inp, bucket, inp, out, splits, per_split), constexprs=constexprs, key=key,
        grid=None if n == 0 or out == 0 else lambda block_n: (row_tiles, -(-n // block_n), splits),
        scratch=(splits * n * out, row_tiles * -(-n // 16)) if splits > 1 else None)


# --- the registry's entry points ---------------------------------------------------------------------------

def prepare(w: TwoFour) -> TwoFourState:
    """The layer's state: the stored weight's parts, contiguous (nothing re-encoded)."""
    return TwoFourState(w.values.contiguous(), w.metadata.contiguous(), tuple(w.shape))


def matmul(state: TwoFourState, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None, *,
           post=None, variant: str = "plain") -> torch.Tensor:
    """The registry's signature (``sparse_ops.dispatch``): ``post(act(x @ W^T + bias))``; the activation in the
    kernel's epilogue, the post-op after it with torch ops. ``variant``: "plain" or "splitk" (``pick``: the
    default)."""
    splits = state.splits.get((x.shape[0], variant))
    if splits is None:
        splits = state.splits[x.shape[0], variant] = choose_splits(state, x.shape[0], variant)
    y = two_four_matmul(state, x, bias, splits=splits, activation=activation)
    return y if post is None else post.apply(y)
