"""Every kernel in the dispatch table against the fp32 reference, over shapes, batches, dtypes, sparsities."""
import pytest
import torch

from sparse_ops.dispatch import KERNELS, kernel_for
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import reference
from tests.test_formats import two_four, unstructured

# Tolerance scaled by dtype: the sparse product and the reference differ by summation order (fp32) and by
# rounding of the output (fp16/bf16); errors grow with sqrt(in_features), inputs are unit normals.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SHAPES = [(1, 4), (7, 12), (33, 64), (64, 40)]
BATCHES = [1, 3, 16]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def close_to_reference(y, ref, dtype, in_features):
    scale = max(1.0, in_features ** 0.5)
    torch.testing.assert_close(y.float(), ref, rtol=RTOL[dtype], atol=ATOL[dtype] * scale)


def check(format_cls, weight, batch, dtype, device):
    fmt = format_cls.from_dense(weight).to(device)
    kernel = kernel_for(fmt.format, device)
    x = torch.randn(batch, weight.shape[1], dtype=dtype, device=device)
    bias = torch.randn(weight.shape[0], dtype=dtype, device=device)
    y = kernel.matmul(kernel.prepare(fmt), x, bias)
    assert y.shape == (batch, weight.shape[0]) and y.dtype == dtype
    ref = reference.REFERENCE[fmt.format](fmt, x) + bias.float()
    close_to_reference(y, ref, dtype, weight.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_csr_matches_reference(shape, batch, sparsity, dtype):
    check(CSR, unstructured(shape, sparsity, dtype), batch, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", [0.0, 0.9])  # 50% sparse (dense path) and 95% sparse (CSR path)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_two_four_matches_reference(shape, batch, extra, dtype):
    check(TwoFour, two_four(shape, dtype, extra), batch, dtype, "cpu")


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_references_agree_with_dense_product(sparsity):
    w = two_four((9, 16), extra_sparsity=sparsity)
    x = torch.randn(5, 16)
    for fmt in (CSR.from_dense(w), TwoFour.from_dense(w)):
        torch.testing.assert_close(reference.REFERENCE[fmt.format](fmt, x), x @ w.t())


def test_reference_worked_by_hand():
    w = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, -3.0]])
    x = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    assert reference.csr_matmul(CSR.from_dense(w), x).tolist() == [[20.0, -2999.0]]
    assert reference.two_four_matmul(TwoFour.from_dense(w), x).tolist() == [[20.0, -2999.0]]


def test_dispatch_table_and_error_lists_supported_pairs():
    int8 = {(f, d) for f in ("dense-int8", "csr-int8", "bitmap-int8") for d in ("cpu", "cuda")}
    assert set(KERNELS) == {("csr", "cpu"), ("2:4", "cpu"), ("csr", "cuda"), ("2:4", "cuda")} | int8
    assert kernel_for("csr", torch.device("cpu")).name in ("cpu.csr", "torch.cpu.csr")  # ours, or torch's
    with pytest.raises(NotImplementedError, match=r"'bsr' on device type 'cpu'; supported: csr on cpu, "
                                                  r"2:4 on cpu, dense-int8 on cpu, .*, 2:4 on cuda"):
        kernel_for("bsr", "cpu")
    with pytest.raises(NotImplementedError, match=r"device type 'meta'"):
        kernel_for("csr", "meta")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_csr_matches_reference(shape, batch, sparsity, dtype):
    check(CSR, unstructured(shape, sparsity, dtype), batch, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", [0.0, 0.5])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(32, 64), (7, 12), (100, 200), (256, 512)])
def test_cuda_two_four_matches_reference(shape, batch, extra, dtype):
    check(TwoFour, two_four(shape, dtype, extra), batch, dtype, "cuda")


@pytest.mark.cuda
def test_cuda_two_four_refuses_fp32():
    with pytest.raises(NotImplementedError, match="float16 or bfloat16"):
        kernel_for("2:4", "cuda").prepare(TwoFour.from_dense(two_four((32, 64))).to("cuda"))


def test_every_candidate_takes_one_signature():
    """Each available kernel of a (format, cpu) pair gives act(x W^T + b) followed by the post-op from the same call,
    fused or not (``dispatch.unfused``), so callers never branch on what a kernel can do."""
    from sparse_ops.dispatch import candidates
    from sparse_ops.post import AddNorm

    w = torch.zeros(8, 16)
    w[:, ::4] = torch.randn(8, 4)  # 2:4 and 75% sparse
    x, bias, residual = torch.randn(3, 16), torch.randn(8), torch.randn(3, 8)
    expect = torch.nn.functional.layer_norm(torch.relu(x @ w.t() + bias) + residual, (8,))
    for fmt in (CSR, TwoFour):
        found = candidates(fmt.format, "cpu")
        assert found and found[0].backend in ("ours", "torch")
        for kernel in found:
            y = kernel.matmul(kernel.prepare(fmt.from_dense(w)), x, bias, "relu", post=AddNorm(residual))
            torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5, msg=kernel.name)
