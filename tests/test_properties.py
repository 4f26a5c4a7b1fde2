"""Property tests (hypothesis): masks have exact counts and keep their pattern, formats round-trip bit for
bit, and a SparseLinear equals its dense twin, for random shapes, dtypes, sparsities and N:M patterns.

Derandomized with bounded example counts: the same cases every run, the whole file in well under 40 s.
Tensors come from a drawn seed (fast to make, and a failing case prints the seed that rebuilds it).
"""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune.masks import NMPattern, global_masks, layer_mask, nm_mask, nm_schedule_mask, num_pruned
from sparse_ops.formats import CSR, TwoFour, csr_nbytes, is_two_four
from sparse_ops.linear import SparseLinear

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) by dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def cases(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


seeds = st.integers(0, 2**31 - 1)
sparsities = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
shapes = st.lists(st.integers(1, 24), min_size=1, max_size=3).map(tuple)


def scores_of(shape, dtype, seed, levels):
    """Random scores; ``levels`` > 0 draws from that many distinct values, so ties are common."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        return torch.randint(0, levels, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def assert_top_kept(scores, keep):
    """Every kept score >= every pruned score, and among equal scores the lower flat index is kept."""
    s, k = scores.reshape(-1).double(), keep.reshape(-1)
    if k.all() or not k.any():
        return
    threshold_kept, threshold_pruned = s[k].min(), s[~k].max()
    assert threshold_kept >= threshold_pruned
    tied = (s == threshold_kept).nonzero().squeeze(1) if threshold_kept == threshold_pruned else None
    if tied is not None:  # the kept ones among the tied are a prefix of them in flat order
        kept_tied = k[tied]
        assert not (kept_tied[1:] & ~kept_tied[:-1]).any()


@cases(150)
@given(shape=shapes, dtype=st.sampled_from(FLOATS), sparsity=sparsities, seed=seeds,
       levels=st.sampled_from([0, 2, 5]))
def test_layer_mask_exact_count_top_scores_and_ties(shape, dtype, sparsity, seed, levels):
    scores = scores_of(shape, dtype, seed, levels)
    keep = layer_mask(scores, sparsity)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert int((~keep).sum()) == num_pruned(sparsity, scores.numel()) == round(sparsity * scores.numel())
    assert_top_kept(scores, keep)


nm_patterns = st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))


@cases(120)
@given(nm=nm_patterns, rows=st.integers(1, 12), groups=st.integers(1, 6), dtype=st.sampled_from(FLOATS),
       seed=seeds, levels=st.sampled_from([0, 2, 3]))
def test_nm_mask_keeps_exactly_n_top_scores_in_every_group(nm, rows, groups, dtype, seed, levels):
    n, m = nm
    scores = scores_of((rows, groups * m), dtype, seed, levels)
    keep = nm_mask(scores, n, m)
    per_group = keep.reshape(rows, groups, m)
    assert (per_group.sum(-1) == n).all()  # the pattern holds, with exactly N kept
    for g_scores, g_keep in zip(scores.reshape(-1, m), per_group.reshape(-1, m)):
        assert_top_kept(g_scores, g_keep)


@cases(100)
@given(nm=nm_patterns, rows=st.integers(1, 10), groups=st.integers(1, 5), frac=st.floats(0.0, 1.0),
       seed=seeds)
def test_gradual_nm_mask_is_a_subset_of_the_final_pattern(nm, rows, groups, frac, seed):
    pattern = NMPattern(*nm)
    scores = scores_of((rows, groups * pattern.m), torch.float32, seed, 0)
    sparsity = frac * pattern.sparsity
    keep = nm_schedule_mask(scores, pattern, sparsity)
    final = nm_mask(scores, pattern.n, pattern.m)
    assert not (final & ~keep).any()  # never drops what the final N:M mask keeps
    allowed = int((~final).sum())
    assert int((~keep).sum()) == min(num_pruned(sparsity, scores.numel()), allowed)
    if frac == 1.0:
        assert torch.equal(keep, final)


@cases(100)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5), sparsity=sparsities, seed=seeds,
       levels=st.sampled_from([0, 3]))
def test_global_masks_exact_total_and_one_threshold(sizes, sparsity, seed, levels):
    flat = scores_of((sum(sizes),), torch.float32, seed, levels)
    masks = global_masks(flat, sizes, sparsity)
    assert [m.numel() for m in masks] == sizes
    keep = torch.cat(masks)
    assert int((~keep).sum()) == num_pruned(sparsity, flat.numel())
    assert_top_kept(flat, keep)


# --- formats: lossless round trips ---

def sparse_weight(shape, dtype, sparsity, seed, special):
    """Random (out, in) weight with ``sparsity`` zeros; ``special`` adds NaN, +-inf, -0.0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if special:
        picks = torch.randint(0, 6, shape, generator=g)
        for code, value in enumerate([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40]):
            w = torch.where(picks == code, torch.tensor(value), w)
    return w.masked_fill(torch.rand(shape, generator=g) < sparsity, 0.0).to(dtype)


def canonical_bits(w):
    """Bit patterns with -0.0 counted as +0.0 (the formats store neither; see formats' module note)."""
    w = torch.where(w == 0, torch.zeros_like(w), w)
    return w.view(torch.int16) if w.element_size() == 2 else w.view(torch.int32)


matrix_shapes = st.tuples(st.integers(0, 40), st.integers(0, 70))


@cases(150)
@given(shape=matrix_shapes, dtype=st.sampled_from(VALUE_DTYPES), sparsity=st.floats(0.0, 1.0), seed=seeds,
       special=st.booleans())
def test_csr_round_trip_is_bit_identical(shape, dtype, sparsity, seed, special):
    w = sparse_weight(shape, dtype, sparsity, seed, special)
    csr = CSR.from_dense(w)
    rebuilt = CSR.from_parts(csr.parts(), csr.shape)  # what a file read does: validate every invariant
    assert torch.equal(canonical_bits(rebuilt.to_dense()), canonical_bits(w))
    assert csr.nnz == int((w != 0).sum()) and csr.nbytes == csr_nbytes(shape, csr.nnz, dtype)


@cases(150)
@given(shape=st.tuples(st.integers(0, 40), st.integers(0, 18).map(lambda g: 4 * g)),
       dtype=st.sampled_from(VALUE_DTYPES), extra=st.floats(0.0, 1.0), seed=seeds, special=st.booleans())
def test_two_four_round_trip_is_bit_identical(shape, dtype, extra, seed, special):
    w = sparse_weight(shape, torch.float32, 0.0, seed, special).reshape(shape[0], shape[1] // 4, 4)
    g = torch.Generator().manual_seed(seed + 1)
    drop = torch.rand(w.shape, generator=g).argsort(-1)[..., :2]  # 2 zeros in every group of 4
    w = w.scatter(-1, drop, 0.0).reshape(shape)
    w = w.masked_fill(torch.rand(shape, generator=g) < extra, 0.0).to(dtype)
    assert is_two_four(w)
    tf = TwoFour.from_dense(w)
    rebuilt = TwoFour.from_parts(tf.parts(), tf.shape)
    assert torch.equal(canonical_bits(rebuilt.to_dense()), canonical_bits(w))


# --- a sparse layer equals its dense twin ---

@cases(60)
@given(out=st.integers(1, 48), groups=st.integers(1, 16),
       batch=st.lists(st.integers(1, 5), min_size=1, max_size=2),
       dtype=st.sampled_from(VALUE_DTYPES), fmt=st.sampled_from(["csr", "2:4"]), sparsity=st.floats(0.0, 1.0),
       bias=st.booleans(), seed=seeds)
def test_sparse_linear_equals_dense(out, groups, batch, dtype, fmt, sparsity, bias, seed):
    inp = 4 * groups
    w = sparse_weight((out, inp), torch.float32, sparsity, seed, special=False)
    if fmt == "2:4":
        w = w.reshape(out, groups, 4)
        w = w.scatter(-1, w.abs().argsort(-1)[..., :2], 0.0).reshape(out, inp)  # keep the 2 largest of 4
    g = torch.Generator().manual_seed(seed + 2)
    b = torch.randn(out, generator=g) if bias else None
    x = torch.randn(*batch, inp, generator=g)
    w, x, b = w.to(dtype), x.to(dtype), None if b is None else b.to(dtype)
    layer = SparseLinear(CSR.from_dense(w) if fmt == "csr" else TwoFour.from_dense(w), b)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())  # fp64 reference
    rtol, atol = TOL[dtype]
    scale = x.double().abs() @ w.double().abs().T  # (..., out): error grows with the sum of |terms|
    got = layer(x)
    assert got.shape == (*batch, out) and got.dtype == dtype
    assert ((got.double() - expected).abs() <= atol + rtol * (scale + expected.abs())).all()
