"""The Triton grouped matmul of the MoE layer (``sparse_ops.kernels.triton_moe``) against a per-expert fp32
loop: experts with no, one and many row blocks, row tails, H and D tails, bias on and off, fp32 / fp16 / bf16;
the block table worked out by hand; and the MoE layer's grouped path against its per-expert loop (on CPU
tensors under ``TRITON_INTERPRET=1``, which conftest sets without a GPU; compiled on CUDA under the marker).
"""
import os

import pytest
import torch
from _optional import import_or_skip  # noqa: E402

import_or_skip("triton", reason="the Triton kernels need triton (pip install prune-sparse[gpu])")


from sparse_ops.kernels import triton_moe
from sparse_ops.layers.moe import MoE

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors run only under TRITON_INTERPRET=1")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _reference(x, counts, w, b):
    out, start = [], 0
    for e, c in enumerate(counts):
        y = x[start:start + c].float() @ w[e].float().T
        out.append(y if b is None else y + b[e].float())
        start += c
    return torch.cat(out)


def _check(counts, H, D, dtype, bias, device="cpu"):
    E = len(counts)
    g = torch.Generator().manual_seed(sum(counts) + H)
    x = torch.randn(sum(counts), D, generator=g).to(dtype)
    w = torch.randn(E, H, D, generator=g).to(dtype)
    b = torch.randn(E, H, generator=g).to(dtype) if bias else None
    offsets = torch.tensor([0, *counts]).cumsum(0)
    y = triton_moe.grouped_linear(x.to(device), offsets.to(device), w.to(device),
                                  None if b is None else b.to(device)).cpu()
    ref = _reference(x, counts, w, b)
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(y.float(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])


# experts with no rows, one row, a whole block, a block and a tail; H and D not multiples of the blocks
CASES = (((3, 0, 16, 21), 40, 24), ((1,), 64, 32), ((0, 0, 5), 70, 50), ((17, 2), 8, 16))


def test_block_table_by_hand():
    expert, first = triton_moe.block_table(torch.tensor([0, 3, 3, 20]), block_m=16, max_blocks=5)
    assert expert.tolist() == [0, 2, 2, -1, -1]  # expert 1 has no rows: no block
    assert first.tolist() == [0, 3, 19, 0, 0]


@needs_interpreter
@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("dtype", TOL, ids=lambda d: str(d).removeprefix("torch."))
def test_grouped_matches_loop(dtype, bias):
    for counts, H, D in CASES:
        _check(counts, H, D, dtype, bias)


def test_errors():
    w = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(A, 8\)"):
        triton_moe.grouped_linear(torch.zeros(3, 5), torch.tensor([0, 1, 3]), w)
    with pytest.raises(ValueError, match=r"offsets must have shape \(3,\)"):
        triton_moe.grouped_linear(torch.zeros(3, 8), torch.tensor([0, 3]), w)


@needs_interpreter
@pytest.mark.parametrize("gated", (False, True))
def test_moe_grouped_path_matches_loop(monkeypatch, gated):
    """The layer's grouped path (forced on CPU tensors) gives its per-expert loop's output."""
    torch.manual_seed(0)
    moe = MoE(24, 40, num_experts=4, top_k=2, gated=gated, capacity_factor=1.5).eval()
    x = torch.randn(2, 9, 24)
    monkeypatch.setattr(triton_moe, "available", lambda: True)
    with torch.no_grad():
        monkeypatch.setattr(MoE, "_grouped", lambda self, xs: False)
        loop = moe(x)
        monkeypatch.setattr(MoE, "_grouped", lambda self, xs: True)
        grouped = moe(x)
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)


def test_grouped_only_without_grad():
    moe = MoE(8, 16, num_experts=2, top_k=1)
    xs = torch.zeros(3, 8)
    assert not moe._grouped(xs)  # CPU tensors: the C++ path or the loop
    if torch.cuda.is_available():
        moe = moe.cuda()
        assert not moe._grouped(xs.cuda())  # parameters require grad, grad enabled: the loop (training)
        with torch.no_grad():
            assert moe._grouped(xs.cuda()) == triton_moe.available()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TOL, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_matches_loop(dtype):
    if not triton_moe.available() or INTERPRETED:
        pytest.skip("needs compiled Triton on CUDA (TRITON_INTERPRET unset)")
    for counts, H, D in CASES + (((300, 0, 7, 64), 512, 256),):
        _check(counts, H, D, dtype, True, device="cuda")
    moe = MoE(64, 128, num_experts=8, top_k=2, gated=True).cuda().eval()
    x = torch.randn(5, 64, device="cuda")
    with torch.no_grad():
        grouped = moe(x)
    reference = moe(x).detach()  # grad enabled, parameters requiring it: the per-expert loop
    torch.testing.assert_close(grouped, reference, atol=1e-4, rtol=1e-4)
