"""SparseGPT: equal to plain column-by-column OBS in float64, exact counts and N:M, lower reconstruction
error than magnitude and Wanda, dead inputs, Conv1D orientation, half dtypes, clear errors, singular Grams."""
import math

import pytest
import torch

from prune.masks import NMPattern, nm_mask, num_pruned, row_mask
from prune.one_shot.sparsegpt import relative_error, sparsegpt_prune


def correlated_inputs(rows, features, big=4):
    """X = Z @ A with a random mixing A; the first ``big`` features 10x larger."""
    mixing = torch.eye(features, dtype=torch.float64)
    mixing += torch.randn(features, features, dtype=torch.float64) / math.sqrt(features)
    x = torch.randn(rows, features, dtype=torch.float64) @ mixing
    x[:, :big] *= 10
    return x


def obs_reference(weight, gram, keep, damp=0.01, width=1):
    """Slow OBS in float64: for every column in order, zero the masked weights and move every later column by
    ``-err * U[j, j+1:]`` (the full row of the inverse-Hessian Cholesky factor, no blocks, no lazy batches).
    Also returns the saliencies ``w^2 / U_jj^2`` of columns ``j:j+width`` seen at every ``j % width == 0``."""
    w, h = weight.double().clone(), gram.double().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    saliency = {}
    for j in range(w.shape[1]):
        if j % width == 0:
            saliency[j] = w[:, j:j + width].square() / u.diagonal()[j:j + width].square()
        q = torch.where(keep[:, j], w[:, j], 0.0)
        err = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= torch.outer(err, u[j, j + 1:])
        w[:, j] = q
    return w, saliency


CASES = [  # rows, in, block_size, pattern
    (8, 20, 4, None), (1, 37, 128, None), (16, 24, 1, None), (5, 130, 128, None), (6, 50, 16, None),
    (12, 48, 4, NMPattern(2, 4)), (3, 64, 128, NMPattern(4, 8)), (7, 24, 5, NMPattern(2, 4)),
    (1, 16, 1, NMPattern(2, 4)),
]


@pytest.mark.parametrize("rows, cols, block_size, nm", CASES)
def test_matches_column_by_column_obs(rows, cols, block_size, nm):
    x = correlated_inputs(4 * cols, cols)
    gram, weight = x.T @ x, torch.randn(rows, cols)
    before = weight.clone()
    sparsity = 0.5 if nm is None else nm.sparsity
    result = sparsegpt_prune(weight, gram, sparsity, nm=nm, block_size=block_size)
    assert torch.equal(weight, before)  # the input is untouched
    keep = result.weight != 0
    width = block_size if nm is None else nm.m
    ref, saliency = obs_reference(weight, gram, keep, width=width)
    assert ((ref == 0) == ~keep).all()
    assert (result.weight.double() - ref).norm() / ref.norm() < 1e-5
    assert result.error == pytest.approx(relative_error(weight, ref, gram), rel=1e-5)
    # the mask is the lowest saliency at the selection point: per block (exact cumulative count) or per group
    def cumulative(c):  # zeros due in the first c columns
        return num_pruned(sparsity, rows * cols) if c == cols else round(sparsity * rows * cols * c / cols)

    for j, sal in saliency.items():
        kept = keep[:, j:j + width]
        if nm is None:
            assert int((~kept).sum()) == cumulative(min(j + width, cols)) - cumulative(j)
            if kept.any() and (~kept).any():
                assert sal[~kept].max() <= sal[kept].min() * (1 + 1e-4)
        else:
            assert (kept.sum(1) == nm.n).all()
            kept_min = torch.where(kept, sal, math.inf).min(1).values
            pruned_max = torch.where(kept, -math.inf, sal).max(1).values
            assert (pruned_max <= kept_min * (1 + 1e-4)).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("rows, cols, block_size", [(1, 7, 128), (8, 20, 3), (33, 130, 16), (10, 64, 128)])
def test_exact_zero_count(sparsity, rows, cols, block_size):
    x = torch.randn(2 * cols, cols, dtype=torch.float64)
    result = sparsegpt_prune(torch.randn(rows, cols), x.T @ x, sparsity, block_size=block_size)
    assert int((result.weight == 0).sum()) == round(sparsity * rows * cols)
    assert torch.isfinite(result.weight).all()


@pytest.mark.parametrize("nm", [NMPattern(2, 4), NMPattern(4, 8)])
@pytest.mark.parametrize("block_size", [4, 12, 128])
def test_nm_pattern_holds(nm, block_size):
    x = correlated_inputs(256, 64)
    result = sparsegpt_prune(torch.randn(16, 64), x.T @ x, nm.sparsity, nm=nm, block_size=block_size)
    nonzeros = (result.weight != 0).reshape(16, -1, nm.m).sum(-1)
    assert (nonzeros == nm.n).all()


def test_lower_reconstruction_error_than_magnitude_and_wanda():
    x = correlated_inputs(512, 64, big=8)
    gram, weight = x.T @ x, torch.randn(32, 64)
    wanda_scores = weight.abs() * x.norm(dim=0).float()
    sparse_gpt = sparsegpt_prune(weight, gram, 0.5).error
    magnitude = relative_error(weight, weight * row_mask(weight.abs(), 0.5), gram)
    wanda = relative_error(weight, weight * row_mask(wanda_scores, 0.5), gram)
    assert sparse_gpt < 0.95 * wanda and wanda < 0.5 * magnitude  # about 0.077, 0.087, 0.276
    nm_sparse_gpt = sparsegpt_prune(weight, gram, 0.5, nm=NMPattern(2, 4)).error
    nm_wanda = relative_error(weight, weight * nm_mask(wanda_scores, 2, 4), gram)
    nm_magnitude = relative_error(weight, weight * nm_mask(weight.abs(), 2, 4), gram)
    assert sparse_gpt < nm_sparse_gpt < 0.95 * nm_wanda < nm_magnitude


def test_sparsity_zero_is_unchanged():
    x = torch.randn(64, 16, dtype=torch.float64)
    weight = torch.randn(8, 16)
    result = sparsegpt_prune(weight, x.T @ x, 0.0)
    assert torch.equal(result.weight, weight) and result.weight is not weight
    assert result.weight.dtype == torch.float32 and result.error == 0.0
    bf16 = weight.bfloat16()
    assert torch.equal(sparsegpt_prune(bf16, x.T @ x, 0.0).weight, bf16)


def test_dead_input_features():
    x = torch.randn(128, 16, dtype=torch.float64)
    x[:, [3, 11]] = 0.0
    weight = torch.randn(8, 16)
    result = sparsegpt_prune(weight, x.T @ x, 0.5, block_size=4)
    assert torch.isfinite(result.weight).all() and math.isfinite(result.error)
    assert (result.weight[:, [3, 11]] == 0).all()
    assert int((result.weight == 0).sum()) == 64  # the 16 dead zeros count toward the 64
    mostly_dead = sparsegpt_prune(weight, x.T @ x, 0.1)  # more dead weights (16) than the target (13)
    assert int((mostly_dead.weight == 0).sum()) == 16
    nm = sparsegpt_prune(weight, x.T @ x, 0.5, nm=NMPattern(2, 4))
    assert (nm.weight[:, [3, 11]] == 0).all() and ((nm.weight != 0).reshape(8, 4, 4).sum(-1) <= 2).all()


@pytest.mark.parametrize("nm", [None, NMPattern(2, 4)])
def test_conv1d_orientation_is_the_transpose(nm):
    x = correlated_inputs(96, 24)
    weight = torch.randn(10, 24)
    r1 = sparsegpt_prune(weight, x.T @ x, 0.5, nm=nm, block_size=8)
    r0 = sparsegpt_prune(weight.T.contiguous(), x.T @ x, 0.5, nm=nm, block_size=8, in_dim=0)
    assert r0.weight.shape == (24, 10)
    assert torch.equal(r0.weight, r1.weight.T) and r0.error == r1.error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    x = correlated_inputs(256, 64)
    gram, weight = x.T @ x, torch.randn(16, 64)
    half = sparsegpt_prune(weight.to(dtype), gram, 0.5)
    assert half.weight.dtype == dtype
    assert int((half.weight == 0).sum()) == 512
    # computed in float32 from the upcast weight, rounded once at the end
    assert torch.equal(half.weight, sparsegpt_prune(weight.to(dtype).float(), gram, 0.5).weight.to(dtype))
    eps = torch.finfo(dtype).eps
    assert abs(half.error - sparsegpt_prune(weight, gram, 0.5).error) < 8 * eps


def test_clear_errors():
    gram, weight = torch.eye(8, dtype=torch.float64), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"gram has shape \(6, 6\), expected \(8, 8\)"):
        sparsegpt_prune(weight, torch.eye(6, dtype=torch.float64), 0.5)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            sparsegpt_prune(weight, gram, bad)
    with pytest.raises(ValueError, match="input size 6 is not a multiple of M=4"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), 0.5, nm=NMPattern(2, 4))
    with pytest.raises(ValueError, match="does not match pattern 2:4"):
        sparsegpt_prune(weight, gram, 0.3, nm=NMPattern(2, 4))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        sparsegpt_prune(weight, gram, 0.5, block_size=0)
    with pytest.raises(ValueError, match=r"weight shape \(4, 8\) is not positive definite"):
        sparsegpt_prune(weight, -gram, 0.5)
    with pytest.raises(ValueError, match="inf or NaN"):
        sparsegpt_prune(weight, gram * math.nan, 0.5)


@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_singular_gram(damp):
    x = torch.randn(16, 4, dtype=torch.float64) @ torch.randn(4, 64, dtype=torch.float64)  # rank 4 of 64
    weight = torch.randn(8, 64)
    result = sparsegpt_prune(weight, x.T @ x, 0.5, damp=damp)
    assert torch.isfinite(result.weight).all() and math.isfinite(result.error)
    assert int((result.weight == 0).sum()) == 256
    assert result.error < relative_error(weight, weight * row_mask(weight.abs(), 0.5), x.T @ x)


def joint_reference(weight, gram, keep, damp=0.01):
    """Slow joint SparseGPT + int8 in float64: as ``obs_reference``, each kept weight rounded to its row's grid
    (scale: the row's largest magnitude / 127, fixed before the pass) when its column is visited."""
    w, h = weight.double().clone(), gram.double().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    s = w.abs().amax(1) / 127
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for j in range(w.shape[1]):
        q = torch.where(keep[:, j], torch.clamp(torch.round(w[:, j] / s), -127, 127) * s, 0.0)
        err = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= torch.outer(err, u[j, j + 1:])
        w[:, j] = q
    return w, s


@pytest.mark.parametrize("rows, cols, block_size, nm", CASES[:6])
def test_joint_int8_matches_column_by_column_obs_with_rounding(rows, cols, block_size, nm):
    x = correlated_inputs(4 * cols, cols)
    gram, weight = x.T @ x, torch.randn(rows, cols)
    sparsity = 0.5 if nm is None else nm.sparsity
    result = sparsegpt_prune(weight, gram, sparsity, nm=nm, block_size=block_size, bits=8)
    keep = result.weight != 0
    ref, s = joint_reference(weight, gram, keep)
    torch.testing.assert_close(result.scales.double(), s, rtol=1e-6, atol=0)
    codes = result.weight.double() / s[:, None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # exactly on the grid
    assert codes.round().abs().max() <= 127 and ((ref == 0) | keep).all()
    ref_codes = (ref / s[:, None]).round()
    # float32 against float64: a weight that lands on a half step may round the other way (and shift the rest)
    assert (codes.round() != ref_codes).float().mean() < 0.02
    assert result.error == pytest.approx(relative_error(weight, ref.float(), gram), rel=0.05)


def test_joint_int8_is_gptq_at_zero_sparsity_and_costs_nothing_over_pruning():
    # at 0% it is GPTQ: below rounding each weight to nearest; at 50% int8's rounding is small next to pruning's
    # error, and quantizing jointly stays within 1% of pruning then rounding
    x = correlated_inputs(512, 96)
    gram, weight = x.T @ x, torch.randn(24, 96)
    for sparsity, worst in ((0.0, 0.9), (0.5, 1.01)):
        joint = sparsegpt_prune(weight, gram, sparsity, bits=8)
        pruned = sparsegpt_prune(weight, gram, sparsity).weight
        s = pruned.abs().amax(1, keepdim=True) / 127
        after = torch.clamp(torch.round(pruned / s), -127, 127) * s
        assert joint.error < worst * relative_error(weight, after, gram)
        assert int((joint.weight == 0).sum()) >= round(sparsity * weight.numel())  # + codes rounded to 0


def test_joint_int8_refuses_other_bits_and_half_weights():
    gram = torch.eye(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="bits must be None or 8, got 4"):
        sparsegpt_prune(torch.randn(4, 8), gram, 0.5, bits=4)
    with pytest.raises(ValueError, match="needs a float32 weight"):
        sparsegpt_prune(torch.randn(4, 8, dtype=torch.bfloat16), gram, 0.5, bits=8)
