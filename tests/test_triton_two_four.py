"""The Triton 2:4 kernel (``sparse_ops.kernels.triton_two_four``) against fp32 references, on a small grid
that reaches every path: tails in out / in / N, N = 1, groups with two, one and no nonzeros, an all-zero
weight, split-K on and off, bias on and off, fp32 / fp16 / bf16; split choice; the registry's entry point;
compilation for sm_80 / sm_90 without a device; the same grid compiled on a GPU (cuda marker).

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``).
"""
import itertools
import os

import pytest
import torch
from _optional import import_or_skip  # noqa: E402

import_or_skip("triton", reason="the Triton kernels need triton (pip install prune-sparse[gpu])")


from sparse_ops.formats import TwoFour
from sparse_ops.kernels import reference
from sparse_ops.kernels import triton_two_four as t24

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors run only under TRITON_INTERPRET=1")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (out, in, N): whole tiles and N = 1; tails in out / in / N; two token blocks; one row tile of four k tiles
SHAPES = ((32, 64, 1), (45, 100, 3), (70, 136, 17), (16, 256, 2))


def _weight(out: int, inp: int, dtype: torch.dtype, *, empty: float = 0.2, seed: int = 0) -> torch.Tensor:
    """A random 2:4 weight: two random positions kept per group of four, ``empty`` of the kept entries zero
    (groups with one or no nonzero)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(out, inp // 4, 4, generator=g)
    keep = torch.zeros_like(keys, dtype=torch.bool).scatter_(2, keys.topk(2, dim=2).indices, True)
    values = torch.randn(out, inp // 4, 4, generator=g) * (torch.rand(out, inp // 4, 4, generator=g) >= empty)
    return (values * keep).reshape(out, inp).to(dtype)


def _check(w: torch.Tensor, n: int, *, splits: int, bias: bool, device: str = "cpu") -> None:
    dtype = w.dtype
    wt = TwoFour.from_dense(w)
    x = torch.randn(n, w.shape[1]).to(dtype)
    b = torch.randn(w.shape[0]).to(dtype) if bias else None
    ref = reference.two_four_matmul(wt, x)  # fp32 from the format's parts
    if b is not None:
        ref = ref + b.float()
    y = t24.two_four_matmul(t24.prepare(wt.to(device)), x.to(device), None if b is None else b.to(device),
                            splits=splits).cpu()
    assert y.dtype == dtype
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(y.float(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("splits", (1, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_kernel_matches_reference(dtype, splits, bias):
    for i, (out, inp, n) in enumerate(SHAPES):
        _check(_weight(out, inp, dtype, seed=i), n, splits=splits, bias=bias)


@needs_interpreter
def test_zero_and_sparse_groups():
    """An all-zero weight (every code 0|1<<2, values zero) gives the bias; a weight with every group keeping
    only its last position reads values[2g + 1] at p1 == 3."""
    w = torch.zeros(33, 68)
    _check(w, 2, splits=1, bias=True)
    w[:, 3::4] = torch.randn(33, 17)
    _check(w, 5, splits=2, bias=False)


def test_choose_splits():
    wide = TwoFour.from_dense(torch.zeros(32, 4096))  # one row tile, 64 k tiles: skinny
    assert t24.choose_splits(wide, 1, "plain") == 1
    assert t24.pick(wide, 1) == "splitk" and 2 <= t24.choose_splits(wide, 1, "splitk") <= t24.ts.MAX_SPLITS
    assert t24.pick(wide, 1024) == "plain"  # many tokens: no split-K
    assert t24.pick(TwoFour.from_dense(torch.zeros(32, 64)), 1) == "plain"  # one k tile
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        t24.choose_splits(wide, 1, "fast")


def test_errors():
    wt = TwoFour.from_dense(torch.zeros(8, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 16\)"):
        t24.two_four_matmul(wt, torch.zeros(2, 12))
    with pytest.raises(ValueError, match="bias must have shape"):
        t24.two_four_matmul(wt, torch.zeros(2, 16), torch.zeros(3))
    with pytest.raises(ValueError, match="splits must be >= 1"):
        t24.two_four_matmul(wt, torch.zeros(2, 16), splits=0)


@needs_interpreter
@pytest.mark.parametrize("variant", ("plain", "splitk"))
def test_entry_point(variant):
    """The registry's matmul: the activation after the product, every variant the same product."""
    w = _weight(40, 128, torch.float32)
    wt = TwoFour.from_dense(w)
    x, b = torch.randn(3, 128), torch.randn(40)
    y = t24.matmul(t24.prepare(wt), x, b, "relu", variant=variant)
    torch.testing.assert_close(y, torch.relu(x @ w.T + b), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_matches_reference(dtype):
    """The same grid compiled on a real GPU (skipped without one), and every autotuned token block."""
    if not t24.available() or INTERPRETED:
        pytest.skip("needs compiled Triton on CUDA (TRITON_INTERPRET unset)")
    for (i, (out, inp, n)), splits, bias in itertools.product(enumerate(SHAPES), (1, 3), (False, True)):
        _check(_weight(out, inp, dtype, seed=i), n, splits=splits, bias=bias, device="cuda")
    for n in (1, 16, 100, 256):
        _check(_weight(300, 520, dtype), n, splits=1, bias=True, device="cuda")
