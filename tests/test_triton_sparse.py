"""The Triton tiled-bitmap kernels (``sparse_ops.kernels.triton_sparse``): layout round trips and sizes,
and the kernel against fp32 references on a small grid that reaches every path (tails in out / in / N, N = 1,
sparsity 0 / 0.5 / 0.9 / 1, empty and dense tiles, split-K on and off, bias on and off, fp32 / fp16 / bf16).

Without a GPU the kernels run on CPU tensors in Triton's interpreter: ``TRITON_INTERPRET=1`` is set here,
before anything imports triton's kernels (the module decorates them at the first product, so an earlier import
of ``sparse_ops`` does not matter). Shapes are small: the interpreter runs each program in numpy.
"""
import os

import torch

if not torch.cuda.is_available():  # on a GPU the same tests run compiled (test_cuda_matches_reference)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import itertools

import pytest
from _optional import import_or_skip  # noqa: E402

import_or_skip("triton", reason="the Triton kernels need triton (pip install prune-sparse[gpu])")


from sparse_ops import bitmap
from sparse_ops.formats import CSR
from sparse_ops.kernels import reference
from sparse_ops.kernels import triton_sparse as ts
from sparse_ops.post import AddNorm

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tensors run only under TRITON_INTERPRET=1 (a CUDA machine runs "
                            "test_cuda_matches_reference)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relative to the output's scale: fp32 accumulation error; fp16 / bf16 about two ulps of the rounded output
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (out, in, N): whole tiles and N = 1; tails in out / in / N; N > the interpreter's 16-token block (two token
# blocks, the second a tail); one tile row of four tile columns (skinny: where split-K pays)
SHAPES = ((32, 64, 1), (45, 100, 3), (70, 130, 17), (16, 256, 2))
SPARSITIES = (0.0, 0.5, 0.9, 1.0)


def _weight(out: int, inp: int, sparsity: float, dtype: torch.dtype) -> torch.Tensor:
    keep = torch.rand(out, inp) >= sparsity
    return (torch.randn(out, inp) * keep).to(dtype)


def _assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(y.float(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def _check_product(w: torch.Tensor, n: int, *, splits: int, bias: bool, device: str = "cpu",
                   tile: tuple[int, int] = ts.DEFAULT_TILE) -> None:
    dtype = w.dtype
    csr = CSR.from_dense(w)
    tb = ts.TiledBitmap.from_csr(csr, tile).to(device)
    x = torch.randn(n, w.shape[1]).to(dtype)
    b = torch.randn(w.shape[0]).to(dtype) if bias else None
    ref = reference.csr_matmul(csr, x)  # fp32 from CSR's parts: independent of the tiled layout
    if b is not None:
        ref = ref + b.float()
    y = ts.tiled_matmul(tb, x.to(device), None if b is None else b.to(device), splits=splits)
    _assert_close(y.cpu(), ref, dtype)


def _grid() -> list[tuple]:
    """Every (dtype, splits, bias) runs every shape, each shape at a different sparsity per combination, so
    every sparsity meets every shape, dtype and split setting across the grid (12 tests of 4 products)."""
    combos = list(itertools.product(DTYPES, (1, 3), (False, True)))
    return [(dtype, splits, bias, [(shape, SPARSITIES[(i + j) % 4]) for j, shape in enumerate(SHAPES)])
            for i, (dtype, splits, bias) in enumerate(combos)]


def _id(case) -> str:
    dtype, splits, bias, _ = case
    return f"{str(dtype).removeprefix('torch.')}-split{splits}-{'bias' if bias else 'nobias'}"


@needs_interpreter
@pytest.mark.parametrize("case", _grid(), ids=_id)
def test_kernel_matches_reference(case):
    dtype, splits, bias, products = case
    for (out, inp, n), sparsity in products:
        _check_product(_weight(out, inp, sparsity, dtype), n, splits=splits, bias=bias)


def _mixed_tiles(dtype: torch.dtype) -> torch.Tensor:
    """(80, 200) in 32 x 64 tiles (3 x 4, tails in both): a fully dense tile, all-zero tiles, a whole tile row
    of zeros and partly filled tiles."""
    w = _weight(80, 200, 0.7, dtype)
    w[0:32, 64:128] = 0  # an all-zero tile
    w[0:32, 0:64] = (torch.rand(32, 64) + 0.5).to(dtype)  # a fully dense tile (no zeros)
    w[32:64] = 0  # a whole tile row empty
    w[64:80, 192:200] = 0  # the tail tile of the last row: empty
    return w


@needs_interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("splits", (1, 2, 5))
def test_empty_and_dense_tiles(dtype, splits):
    w = _mixed_tiles(dtype)
    tb = ts.TiledBitmap.from_dense(w)
    assert tb.num_tiles == 3 + 0 + 3  # tile row 0: dense, zero, two partial; row 1: none; row 2: three
    assert tb.max_row_tiles == 3
    assert torch.equal(tb.bitmaps[0], torch.full_like(tb.bitmaps[0], -1))  # the dense tile: all bits set
    assert torch.equal((tb.tile_ptr[1:] - tb.tile_ptr[:-1]), torch.tensor([3, 0, 3], dtype=torch.int32))
    _check_product(w, 5, splits=splits, bias=True)  # splits > tiles in a row: some programs get none


@needs_interpreter
@pytest.mark.parametrize("tile", ((16, 32), (64, 128), (128, 64)))
def test_tile_shapes(tile):
    _check_product(_weight(70, 150, 0.6, torch.float32), 4, splits=2, bias=True, tile=tile)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", ((32, 64), (16, 32), (64, 128)))
def test_round_trip_exact(dtype, tile):
    w = _weight(45, 100, 0.6, dtype)
    w[1, 2], w[3, 4], w[5, 6], w[7, 8] = float("nan"), float("inf"), -float("inf"), -0.0
    expected = w.masked_fill(w == 0, 0.0)  # -0.0 is a zero (as CSR)
    for tb in (ts.TiledBitmap.from_dense(w, tile), ts.TiledBitmap.from_csr(CSR.from_dense(w), tile)):
        tb.validate()
        assert tb.dtype == dtype and tb.nnz == int((w != 0).sum())
        back = tb.to_dense()
        torch.testing.assert_close(back, expected, atol=0, rtol=0, equal_nan=True)
        assert not torch.signbit(back[w == 0]).any()
    a, b = ts.TiledBitmap.from_dense(w, tile), ts.TiledBitmap.from_csr(CSR.from_dense(w), tile)
    for name in ts.TiledBitmap.PARTS:  # the two encoders agree bit for bit
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0, equal_nan=True)


def test_round_trip_int32_columns():
    """in > 32767: CSR stores int32 columns; also a many-block encode (small blocks)."""
    w = torch.zeros(3, 40000)
    w[0, 5], w[2, 39999], w[1, 32768] = 1.0, -2.0, 3.0
    csr = CSR.from_dense(w)
    assert csr.col_indices.dtype == torch.int32
    tb = ts.TiledBitmap.from_csr(csr).validate()
    assert tb.num_tiles == 3 and torch.equal(tb.to_dense(), w)


def test_encode_in_blocks(monkeypatch):
    monkeypatch.setattr(bitmap, "_ENCODE_BLOCK", 32 * 64)  # one tile row of (*, 64) per block
    w = _weight(100, 64, 0.5, torch.float16)
    tb = ts.TiledBitmap.from_csr(CSR.from_dense(w)).validate()
    assert torch.equal(tb.to_dense(), w)
    assert torch.equal(ts.TiledBitmap.from_dense(w).bitmaps, tb.bitmaps)


def test_all_zero_tile_costs_nothing():
    w = _weight(64, 128, 0.5, torch.float16)
    w[32:64, 64:128] = 0
    tb = ts.TiledBitmap.from_dense(w)
    full = ts.TiledBitmap.from_dense(w.masked_fill(w == 0, 1.0))  # every entry stored
    assert tb.num_tiles == 3 and full.num_tiles == 4
    nnz_bytes = tb.nnz * 2
    assert tb.values.numel() * tb.values.element_size() == nnz_bytes  # values: exactly the nonzeros
    per_tile = 4 + 4 + 32 * 64 // 8  # column, offset, bitmap
    assert tb.nbytes == 4 * 3 + 4 + 3 * per_tile + nnz_bytes  # tile_ptr (3), value_offsets' leading 0
    assert full.nbytes - full.nnz * 2 == tb.nbytes - nnz_bytes + per_tile
    assert tb.nbytes == ts.TiledBitmap.estimate_nbytes((64, 128), tb.nnz, torch.float16, tiles=3)
    zero = ts.TiledBitmap.from_dense(torch.zeros(64, 128))
    assert zero.num_tiles == 0 and zero.nbytes == 4 * 3 + 4 and zero.max_row_tiles == 0


def test_reference_matmul_matches_dense():
    w = _weight(45, 100, 0.7, torch.float32)
    x, b = torch.randn(3, 100), torch.randn(45)
    torch.testing.assert_close(ts.TiledBitmap.from_dense(w).reference_matmul(x, b), x @ w.T + b)


def test_validate_rejects_corruption():
    tb = ts.TiledBitmap.from_dense(_weight(45, 100, 0.5, torch.float32))
    bad_bits = tb.bitmaps.clone()
    bad_bits[-1, -1, -1] |= 1 << 30  # weight row 63 (out = 45), column 126 (in = 100): padding
    # ... and consistent offsets: the tile's last entry in rank order, so one more value at the end
    padded = {"bitmaps": bad_bits, "values": torch.cat([tb.values, torch.ones(1)]),
              "value_offsets": torch.cat([tb.value_offsets[:-1], tb.value_offsets[-1:] + 1])}
    offsets = tb.value_offsets.clone()
    offsets[1] += 1
    cols = tb.tile_cols.flip(0)
    for kwargs, match in ((padded, "padding"), ({"bitmaps": bad_bits}, "popcounts"),
                          ({"value_offsets": offsets}, "popcounts"), ({"tile_cols": cols}, "increase"),
                          ({"max_row_tiles": 1}, "max_row_tiles"),
                          ({"tile_ptr": tb.tile_ptr.long()}, "tile_ptr")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(tb, **kwargs).validate()
    with pytest.raises(ValueError, match="tile"):
        ts.TiledBitmap.from_dense(torch.ones(4, 4), tile=(24, 64))


def test_choose_splits():
    skinny = ts.TiledBitmap.from_dense(torch.ones(16, 1024))  # one tile row of 16 tiles
    assert ts.choose_splits(skinny, 1, "plain") == 1
    assert ts.pick(skinny, 1) == "splitk" and ts.choose_splits(skinny, 1, "splitk") == 8  # interpreter: 8 programs
    assert ts.pick(skinny, 1000) == "plain"  # many tokens: plain
    assert ts.choose_splits(skinny, 1000, "splitk") == 2  # asked for: at least 2
    one_tile = ts.TiledBitmap.from_dense(torch.ones(16, 64))
    assert ts.pick(one_tile, 1) == "plain" and ts.choose_splits(one_tile, 1, "splitk") == 2
    with pytest.raises(ValueError, match="variant"):
        ts.choose_splits(skinny, 1, "panels")
    assert ts.variants(1) == ("plain", "splitk", "gemv") and ts.variants(4096) == ("plain",)
    assert ts.choose_splits(skinny, 1, "gemv") == 8 and ts.choose_splits(one_tile, 1, "gemv") == 1


def test_autotune_configs():
    one = ts.token_configs(True)
    assert len(one) == 1 and one[0].kwargs["BLOCK_N"] == 16  # the interpreter: nothing to benchmark
    full = ts.token_configs(False)
    assert len(full) > 1
    assert {c.kwargs["BLOCK_N"] for c in ts.prune_token_configs(full, {"N_BUCKET": 1})} == {16}
    assert {c.kwargs["BLOCK_N"] for c in ts.prune_token_configs(full, {"N_BUCKET": 64})} == {16, 32, 64}


@needs_interpreter
@pytest.mark.parametrize("variant", ("plain", "splitk"))
def test_entry_point(variant):
    """``prepare`` / ``matmul`` with the registry's signature: activation and post-op after the kernel."""
    w = _weight(45, 200, 0.8, torch.float32)
    csr = CSR.from_dense(w)
    state = ts.prepare(csr)
    assert ts.available() and isinstance(state, ts.AlignedTiles)
    x, b = torch.randn(3, 200), torch.randn(45)
    post = AddNorm(torch.randn(3, 45), torch.rand(45) + 0.5, torch.randn(45))
    y = ts.matmul(state, x, b, "gelu", post=post, variant=variant)
    ref = post.apply(torch.nn.functional.gelu(reference.csr_matmul(csr, x) + b))
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ts.matmul(state, x, None), reference.csr_matmul(csr, x), atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_edge_cases():
    tb = ts.TiledBitmap.from_dense(_weight(20, 30, 0.5, torch.float16))
    assert ts.tiled_matmul(tb, torch.randn(0, 30).half()).shape == (0, 20)
    with pytest.raises(ValueError, match="shape"):
        ts.tiled_matmul(tb, torch.randn(2, 31).half())
    with pytest.raises(ValueError, match="bias"):
        ts.tiled_matmul(tb, torch.randn(2, 30).half(), torch.randn(21))
    with pytest.raises(ValueError, match="activation"):
        ts.matmul(ts.prepare(tb), torch.randn(2, 30).half(), None, "tanh")
    # in x's dtype, whatever the weight's: an fp32 product of the fp16 weight
    x = torch.randn(2, 30)
    torch.testing.assert_close(ts.tiled_matmul(tb, x), tb.reference_matmul(x), atol=1e-4, rtol=1e-4)


# Compiles the kernels (not interpreted: TRITON_INTERPRET unset in a subprocess) for NVIDIA targets; prints
# per case the count of tensor-core instructions in the PTX.
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    """The same grid compiled on a real GPU (skipped without one): every shape x sparsity x split x bias."""
    if not ts.available() or INTERPRETED:
        pytest.skip("needs compiled Triton on CUDA (TRITON_INTERPRET unset)")
    for (out, inp, n), sparsity, splits, bias in itertools.product(SHAPES, SPARSITIES, (1, 3), (False, True)):
        _check_product(_weight(out, inp, sparsity, dtype), n, splits=splits, bias=bias, device="cuda")
    _check_product(_mixed_tiles(dtype), 5, splits=2, bias=True, device="cuda")
    for n in (1, 16, 100, 256):  # every autotuned token block
        _check_product(_weight(300, 520, 0.9, dtype), n, splits=1, bias=True, device="cuda", tile=(64, 64))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device_not_the_current_one():
    w = _weight(64, 128, 0.8, torch.float16)
    state = ts.prepare(CSR.from_dense(w).to("cuda:1"))
    x = torch.randn(3, 128, dtype=torch.float16, device="cuda:1")
    with torch.cuda.device(0):
        y = ts.matmul(state, x, None)
    torch.testing.assert_close(y.float().cpu(), x.float().cpu() @ w.float().t(), rtol=2e-2, atol=2e-2)


@needs_interpreter
@pytest.mark.parametrize("layout", ["bitmap-int8", "csr-int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input_bits", [None, 8])
@pytest.mark.parametrize("variant", ["plain", "splitk"])
def test_int8_weights_dequantized_in_the_kernel(layout, dtype, input_bits, variant):
    """An int8 checkpoint's weight on the GPU kernel: q widened in registers, each output row scaled once, x
    quantized per block first under input_bits=8: the numbers of F.linear on the dequantized weight."""
    from sparse_ops.dispatch import kernel_for
    from sparse_ops.quantized import quantize_input
    from sparse_ops.registry import format_class

    weight = format_class(layout).from_dense(_weight(70, 130, 0.7, torch.float32)).with_dtype(dtype)
    weight = weight.with_input_bits(input_bits)
    kernel = kernel_for(layout, "cuda")
    assert kernel.name == f"cuda.{layout}" and kernel.native
    state = kernel.prepare(weight)
    assert state.values.dtype == torch.int8 and state.dtype == dtype and state.align == 16
    x, b = torch.randn(17, 130).to(dtype), torch.randn(70).to(dtype)
    y = kernel.matmul(state, x, b, variant=variant)
    xq = x.float() if input_bits is None else quantize_input(x.float())
    _assert_close(y, torch.nn.functional.linear(xq, weight.to_dense().float(), b.float()), dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 64), (45, 100), (16, 256), (70, 130)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_gemv_variant_at_one_token(dtype, shape, sparsity):
    """One token without tl.dot: the same product as the reference, split where that fills the GPU (the
    interpreter's target: 8 programs), refused for more tokens."""
    w = _weight(*shape, sparsity, dtype)
    csr = CSR.from_dense(w)
    state = ts.prepare(csr)
    x, b = torch.randn(1, shape[1]).to(dtype), torch.randn(shape[0]).to(dtype)
    assert "gemv" in ts.variants(1) and "gemv" not in ts.variants(2)
    y = ts.matmul(state, x, b, variant="gemv")
    _assert_close(y, reference.csr_matmul(csr, x) + b.float(), dtype)
    with pytest.raises(ValueError, match="unknown variant 'gemv' for 2 tokens"):
        ts.matmul(state, torch.randn(2, shape[1]).to(dtype), None, variant="gemv")


@needs_interpreter
@pytest.mark.parametrize("keep_every, block, step", [(1, 2048, 1), (2, 1024, 2), (8, 256, 4)])
@pytest.mark.parametrize("variant", ["plain", "splitk", "gemv"])
def test_value_block_and_tiles_per_iteration(keep_every, block, step, variant):
    """A sparser layer loads a smaller value block per tile (the largest tile's count, padded to a power of two)
    and more tiles per iteration; 5 tiles per row make the last iteration partly empty, split or not."""
    w = torch.zeros(64, 320, dtype=torch.float16)
    w[:, ::keep_every] = torch.randn(64, -(-320 // keep_every)).half()  # every tile: 2048 / keep_every values
    csr = CSR.from_dense(w)
    state = ts.prepare(csr)
    assert (state.block, state.step) == (block, step)
    x = torch.randn(1 if variant == "gemv" else 5, 320).half()
    _assert_close(ts.matmul(state, x, None, variant=variant), reference.csr_matmul(csr, x), torch.float16)
