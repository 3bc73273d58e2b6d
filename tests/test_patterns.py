import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisparse.patterns import Pattern, is_feasible, num_pruned, parse_pattern, project, sparsity_of, topk_mask
from strategies import patterns, weights


@settings(max_examples=150, deadline=None)
@given(w=weights(), data=st.data())
def test_topk_mask_is_feasible_and_keeps_the_top(w, data):
    pat = data.draw(patterns(d_in=w.shape[1]))
    mask = topk_mask(w.abs(), pat)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert is_feasible(mask, pat)
    assert int((~mask).sum()) == num_pruned(pat, tuple(w.shape))
    # Every kept score is >= every pruned score inside the set the pattern compares.
    score = w.abs()
    if pat.kind == "unstructured":
        groups, gmask = score.reshape(1, -1), mask.reshape(1, -1)
    elif pat.kind == "row":
        groups, gmask = score, mask
    else:
        groups, gmask = score.reshape(-1, pat.m), mask.reshape(-1, pat.m)
    for g, k in zip(groups, gmask):
        if k.any() and (~k).any():
            assert g[k].min() >= g[~k].max()


def test_ties_are_broken_by_lower_index():
    score = torch.ones(2, 8)
    mask = topk_mask(score, parse_pattern("2:4"))
    assert mask.tolist() == [[True, True, False, False] * 2] * 2
    mask = topk_mask(score, parse_pattern("row", 0.25))
    assert mask[:, :6].all() and not mask[:, 6:].any()


def test_topk_mask_is_deterministic_on_large_tied_inputs():
    score = torch.randint(0, 3, (64, 128)).float()
    a = topk_mask(score, parse_pattern("unstructured", 0.6))
    b = topk_mask(score.clone(), parse_pattern("unstructured", 0.6))
    assert torch.equal(a, b)


def test_project_keeps_largest_magnitudes_with_signs():
    w = torch.tensor([[0.1, -3.0, 2.0, -0.5]])
    assert project(w, parse_pattern("2:4")).tolist() == [[0.0, -3.0, 2.0, 0.0]]
    assert sparsity_of(project(w, parse_pattern("2:4"))) == 0.5


@pytest.mark.parametrize("args, message", [
    (("unstructured", 1.0), "[0, 1)"),
    (("unstructured", -0.1), "[0, 1)"),
    (("unstructured", float("nan")), "[0, 1)"),
    (("row", None), "needs a sparsity"),
    (("4:4", None), "0 < N < M"),
    (("5:4", None), "0 < N < M"),
    (("0:4", None), "0 < N < M"),
    (("2:4", 0.7), "fixes the sparsity"),
    (("diagonal", 0.5), "not known"),
    (("unstructured:0.6", 0.5), "contradicts"),
    (("unstructured:1.5", None), "[0, 1)"),
    (("diagonal:0.5", None), "not known"),
])
def test_bad_patterns_are_rejected_with_the_valid_range(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_pattern(*args)


def test_nm_width_must_be_divisible():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        topk_mask(torch.ones(3, 10), parse_pattern("2:4"))


def test_nan_scores_are_rejected():
    score = torch.ones(2, 4)
    score[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(score, parse_pattern("2:4"))


def test_pattern_sparsity_and_strings():
    assert parse_pattern("2:4") == Pattern("nm", 0.5, 2, 4)
    assert parse_pattern(None, 0.7).kind == "unstructured"
    assert str(parse_pattern("4:8")) == "4:8"
    assert num_pruned(parse_pattern("1:4"), (3, 8)) == 3 * 2 * 3
    # str() of a pattern parses back to the same pattern (result files store patterns this way)
    for p in (parse_pattern("unstructured", 0.6), parse_pattern("row", 0.25), parse_pattern("2:4")):
        assert parse_pattern(str(p)) == p
    assert parse_pattern("unstructured:0.6", 0.6) == Pattern("unstructured", 0.6)


@pytest.mark.parametrize("nm", ["1:4", "2:4", "3:4", "2:8", "5:8"])
def test_nm_masks_by_pairwise_rank_equal_a_stable_sort_with_ties(nm):
    from minisparse.patterns import _keep_top

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (12, 32), generator=g).float()  # many ties
    pat = parse_pattern(nm)
    assert torch.equal(topk_mask(x, pat), _keep_top(x.reshape(-1, pat.m), pat.n).reshape(x.shape))
