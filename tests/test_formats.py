"""CSR and 2:4 containers: lossless round trips (atol=0), storage sizes, and validation of corrupted parts."""
import dataclasses

import pytest
import torch

from sparse_ops.formats import CSR, TwoFour, csr_nbytes, is_two_four
from sparse_ops.registry import FORMATS, format_class

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def unstructured(shape, sparsity, dtype=torch.float32):
    w = torch.randn(shape)
    return w.masked_fill(torch.rand(shape) < sparsity, 0.0).to(dtype)


def two_four(shape, dtype=torch.float32, extra_sparsity=0.0):
    """Random 2:4 weight: 2 random zeros in every group of 4, plus ``extra_sparsity`` of further zeros."""
    out, inp = shape
    w = torch.randn(out, inp // 4, 4)
    drop = torch.rand(out, inp // 4, 4).argsort(-1)[..., :2]
    w = w.scatter(-1, drop, 0.0).reshape(shape)
    return w.masked_fill(torch.rand(shape) < extra_sparsity, 0.0).to(dtype)


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (16, 36), (3, 8), (0, 8), (5, 0)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_csr_round_trip_is_bit_identical(dtype, shape, sparsity):
    w = unstructured(shape, sparsity, dtype)
    back = CSR.from_dense(w).validate().to_dense()
    assert back.dtype == dtype and torch.equal(bits(back), bits(w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (16, 36), (3, 8), (0, 8), (5, 0)])
@pytest.mark.parametrize("extra", [0.0, 0.5, 1.0])
def test_two_four_round_trip_is_bit_identical(dtype, shape, extra):
    w = two_four(shape, dtype, extra)
    back = TwoFour.from_dense(w).validate().to_dense()
    assert back.dtype == dtype and torch.equal(bits(back), bits(w))


@pytest.mark.parametrize("cls", [CSR, TwoFour])
def test_special_values_survive_and_negative_zero_becomes_positive_zero(cls):
    w = torch.tensor([[float("nan"), 0.0, float("inf"), -0.0], [-0.0, -1e-38, 0.0, 0.0]])
    back = cls.from_dense(w).to_dense()
    expected = torch.tensor([[float("nan"), 0.0, float("inf"), 0.0], [0.0, -1e-38, 0.0, 0.0]])
    assert torch.equal(bits(back), bits(expected))  # -0.0 is stored as a zero, returned as +0.0


def test_csr_layout_worked_by_hand():
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0]])
    csr = CSR.from_dense(w)
    assert csr.crow_indices.tolist() == [0, 2, 2, 4] and csr.col_indices.tolist() == [1, 3, 0, 3]
    assert csr.values.tolist() == [1.5, -2.0, 3.0, 4.0]
    assert csr.crow_indices.dtype == torch.int32 and csr.col_indices.dtype == torch.int16
    assert csr.nbytes == 4 * 4 + 4 * 2 + 4 * 4 == csr_nbytes((3, 4), 4, torch.float32)


def test_csr_column_dtype_widens_past_int16():
    w = torch.zeros(2, 32768)
    w[0, 32767] = 1.0
    csr = CSR.from_dense(w)
    assert csr.col_indices.dtype == torch.int32 and csr.col_indices.tolist() == [32767]
    assert CSR.from_dense(torch.zeros(2, 32767)).col_indices.dtype == torch.int16


def test_two_four_layout_worked_by_hand():
    # groups: [0, 5, 0, 6] -> positions (1, 3); [7, 0, 0, 0] -> (0, 1) with a stored 0; [0, 0, 0, 0] -> (0, 1)
    w = torch.tensor([[0.0, 5.0, 0.0, 6.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    tf = TwoFour.from_dense(w)
    assert tf.values.tolist() == [[5.0, 6.0, 7.0, 0.0, 0.0, 0.0]]
    code = lambda p0, p1: p0 | p1 << 2
    assert tf.metadata.tolist() == [[code(1, 3) | code(0, 1) << 4, code(0, 1)]]  # odd group count: pad 0
    assert tf.nbytes == 6 * 4 + 2


def test_two_four_rejects_broken_pattern_with_group_count():
    w = two_four((4, 16))
    w[0, :4] = 1.0
    w[3, 8:11] = 2.0
    with pytest.raises(ValueError, match=r"not 2:4: 2 of 16 groups"):
        TwoFour.from_dense(w)
    assert not is_two_four(w) and is_two_four(two_four((4, 16)))


def test_two_four_rejects_shapes_that_do_not_divide():
    with pytest.raises(ValueError, match=r"divisible by 4.*\(3, 10\)"):
        TwoFour.from_dense(torch.zeros(3, 10))


@pytest.mark.parametrize("cls", [CSR, TwoFour])
@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(2, 4, dtype=torch.float64),
                                 torch.zeros(2, 4, dtype=torch.int8), torch.zeros(2, 2, 4)])
def test_from_dense_rejects_wrong_inputs(cls, bad):
    with pytest.raises(ValueError, match="2-D|values, got"):
        cls.from_dense(bad)


def test_format_table_and_unknown_name():
    assert format_class("csr") is CSR and format_class("2:4") is TwoFour and set(FORMATS) == {"csr", "2:4", "dense-int8", "csr-int8", "bitmap-int8"}
    with pytest.raises(ValueError, match=r"unknown sparse format 'bsr'; known: csr, 2:4"):
        format_class("bsr")


def _csr():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0]])
    return CSR.from_dense(w)


CSR_CORRUPTIONS = {
    "col out of range": (dict(col_indices=torch.tensor([1, 3, 0, 2, 4], dtype=torch.int16)), "lie in"),
    "negative col": (dict(col_indices=torch.tensor([1, 3, -1, 2, 3], dtype=torch.int16)), "lie in"),
    "unsorted row": (dict(col_indices=torch.tensor([3, 1, 0, 2, 3], dtype=torch.int16)), "strictly increase"),
    "duplicate col": (dict(col_indices=torch.tensor([1, 1, 0, 2, 3], dtype=torch.int16)), "strictly increase"),
    "crow decreasing": (dict(crow_indices=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), "non-decreasing"),
    "crow end": (dict(crow_indices=torch.tensor([0, 2, 3, 4], dtype=torch.int32)), "end at nnz=5"),
    "crow start": (dict(crow_indices=torch.tensor([1, 2, 3, 5], dtype=torch.int32)), "start at 0"),
    "crow length": (dict(crow_indices=torch.tensor([0, 2, 5], dtype=torch.int32)), r"shape \(4,\)"),
    "crow dtype": (dict(crow_indices=torch.tensor([0, 2, 3, 5])), "int32"),
    "col dtype": (dict(col_indices=torch.tensor([1, 3, 0, 2, 3])), "int16, int32"),
    "values length": (dict(values=torch.ones(4)), r"shape \(4,\)"),
    "values dtype": (dict(values=torch.ones(5, dtype=torch.float64)), "float32, float16, bfloat16"),
    "shape": (dict(shape=(3, -4)), "non-negative"),
}


@pytest.mark.parametrize("case", sorted(CSR_CORRUPTIONS))
def test_csr_validate_catches_corruption(case):
    change, message = CSR_CORRUPTIONS[case]
    bad = dataclasses.replace(_csr(), **change)
    with pytest.raises(ValueError, match=message):
        bad.validate()
    parts = {**_csr().parts(), **{k: v for k, v in change.items() if k != "shape"}}
    with pytest.raises(ValueError, match=message):
        CSR.from_parts(parts, change.get("shape", (3, 4)))


def _tf():
    return TwoFour.from_dense(two_four((2, 12)))


TWO_FOUR_CORRUPTIONS = {
    "p0 == p1": (lambda m: m.fill_(0b0101), "invalid position codes"),
    "p0 > p1": (lambda m: m.fill_(0b0110), "invalid position codes"),
    "padding": (lambda m: m[:, 1].fill_(0x10 | m[0, 1].item()), "padding"),
}


@pytest.mark.parametrize("case", sorted(TWO_FOUR_CORRUPTIONS))
def test_two_four_validate_catches_corrupt_metadata(case):
    corrupt, message = TWO_FOUR_CORRUPTIONS[case]
    tf = _tf()
    meta = tf.metadata.clone()
    corrupt(meta)
    with pytest.raises(ValueError, match=message):
        TwoFour.from_parts({"values": tf.values, "metadata": meta}, (2, 12))


@pytest.mark.parametrize("parts,shape,message", [
    (lambda tf: {"values": tf.values[:, :5], "metadata": tf.metadata}, (2, 12), r"values must have shape \(2, 6\)"),
    (lambda tf: {"values": tf.values, "metadata": tf.metadata.to(torch.int8)}, (2, 12), "uint8"),
    (lambda tf: {"values": tf.values, "metadata": tf.metadata[:, :1]}, (2, 12), r"shape \(2, 2\)"),
    (lambda tf: {"values": tf.values, "metadata": tf.metadata}, (2, 10), "divisible by 4"),
    (lambda tf: {"values": tf.values}, (2, 12), r"needs parts \['values', 'metadata'\]"),
])
def test_two_four_from_parts_rejects_inconsistent_parts(parts, shape, message):
    with pytest.raises(ValueError, match=message):
        TwoFour.from_parts(parts(_tf()), shape)
