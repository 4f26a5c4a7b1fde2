"""Mask math: exact counts, deterministic ties, N:M in every group, global threshold and caps."""
import pytest
import torch

from prune import masks as M


@pytest.mark.parametrize("numel", [1, 7, 64, 1000, 300_000])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("path", ["exact", "sampled"])
def test_layer_mask_exact_count(numel, sparsity, path, monkeypatch):
    if path == "sampled":
        monkeypatch.setattr(M, "_EXACT_SELECT_MAX", 1 << 8)
    scores = torch.randn(numel)
    keep = M.layer_mask(scores, sparsity)
    assert int((~keep).sum()) == round(sparsity * numel)
    if 0 < (~keep).sum() < numel:  # every kept score >= every pruned score
        assert scores[keep].min() >= scores[~keep].max()


@pytest.fixture
def sampled_selection(monkeypatch):
    """Force the sampled-bracket selection path on moderately sized inputs."""
    monkeypatch.setattr(M, "_EXACT_SELECT_MAX", 1 << 12)


@pytest.mark.parametrize("n", [10, 2_000_000])
def test_ties_keep_the_lower_index(n, sampled_selection):
    scores = torch.zeros(n)
    keep = M.layer_mask(scores, 0.3)
    n_pruned = round(0.3 * n)
    expected = torch.arange(n) < n - n_pruned
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("k_frac", [0.0, 0.001, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_kth_smallest_sampled_matches_kthvalue(k_frac, ties, sampled_selection):
    x = torch.randn(300_000)
    x = x.round(decimals=2) if ties else x
    k = max(1, round(k_frac * x.numel()))
    assert M.kth_smallest(x, k) == torch.kthvalue(x, k).values


def test_prune_lowest_bounds():
    assert M.prune_lowest(torch.ones(4), 4).sum() == 0
    assert M.prune_lowest(torch.ones(4), 0).all()
    with pytest.raises(ValueError, match="cannot prune 5 of 4"):
        M.prune_lowest(torch.ones(4), 5)


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (4, 8), (3, 8), (1, 4)])
@pytest.mark.parametrize("rows, cols", [(1, 8), (5, 16), (64, 64)])
def test_nm_mask_every_group(n, m, rows, cols):
    scores = torch.randn(rows, cols)
    keep = M.nm_mask(scores, n, m)
    groups = keep.reshape(-1, m)
    assert (groups.sum(1) == n).all()
    g_scores = scores.reshape(-1, m)
    kept_min = torch.where(groups, g_scores, torch.inf).min(1).values
    dropped_max = torch.where(groups, -torch.inf, g_scores).max(1).values
    assert (kept_min >= dropped_max).all()


def test_nm_ties_and_shape_error():
    assert M.nm_mask(torch.zeros(1, 4), 2, 4).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="input size 6 is not a multiple of M=4"):
        M.nm_mask(torch.zeros(2, 6), 2, 4)


def test_gradual_nm_is_subset_of_final():
    scores = torch.randn(16, 32)
    p = M.NMPattern(2, 4)
    final = M.nm_schedule_mask(scores, p, 0.5)
    assert torch.equal(final, M.nm_mask(scores, 2, 4))
    mid = M.nm_schedule_mask(scores, p, 0.25)
    assert int((~mid).sum()) == 128 and not (~mid & final).any()
    with pytest.raises(ValueError, match="exceeds what pattern 2:4 allows"):
        M.nm_schedule_mask(scores, p, 0.6)


@pytest.mark.parametrize("text, expected", [("unstructured", None), ("2:4", M.NMPattern(2, 4)),
                                            ("4:8", M.NMPattern(4, 8)), ("1:16", M.NMPattern(1, 16))])
def test_parse_pattern(text, expected):
    assert M.parse_pattern(text) == expected


@pytest.mark.parametrize("bad", ["4:4", "0:4", "5:4", "2-4", "block", ""])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError, match="unknown pattern"):
        M.parse_pattern(bad)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.95])
def test_global_exact_total(sparsity):
    scores = [torch.randn(10, 10), torch.randn(3, 7) * 5, torch.randn(100)]
    masks = [m.view(s.shape) for s, m in zip(scores, M.global_masks(torch.cat([s.flatten() for s in scores]),
                                                                      [s.numel() for s in scores], sparsity))]
    total = sum(s.numel() for s in scores)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * total)
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    pruned = torch.cat([s[~m] for s, m in zip(scores, masks)])
    if kept.numel() and pruned.numel():
        assert kept.min() >= pruned.max()


def test_global_cap_redistributes_exactly():
    small = torch.full((10,), 0.01)  # would be wiped out by a global threshold
    big = torch.arange(1.0, 91.0)
    masks = M.global_masks(torch.cat([small, big]), [10, 90], 0.5, max_layer_sparsity=0.8)
    assert int((~masks[0]).sum()) == 8  # capped at floor(0.8 * 10)
    assert int((~masks[1]).sum()) == 42  # the rest of the 50 go to the big layer, lowest first
    assert torch.equal(masks[1], big > 42)
    with pytest.raises(ValueError, match="unreachable with max_layer_sparsity=0.4"):
        M.global_masks(torch.cat([small, big]), [10, 90], 0.5, max_layer_sparsity=0.4)


@pytest.mark.parametrize("shape, in_dim", [((4, 8), 1), ((8, 4), 0), ((6, 4, 3, 3), 1), ((2, 8, 5), 1)])
def test_input_last_round_trip(shape, in_dim):
    t = torch.randn(shape)
    v = M.input_last(t, in_dim)
    assert v.shape[-1] == shape[in_dim]
    assert torch.equal(M.from_input_last(v, t.shape, in_dim), t)
