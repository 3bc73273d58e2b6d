"""SparseFW: the LMO, the rounding, the maintained products, the certificates and the solver contract."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisparse import get_method, is_feasible, parse_pattern, sparsefw, wanda
from minisparse.fw import _top_flat, fw_objective, group_budget, group_view, lmo, round_mask


def _problem(d_out=8, d_in=16, tokens=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    X = torch.randn(d_in, tokens, generator=g, dtype=dtype) * (0.2 + 3 * torch.rand(d_in, 1, generator=g, dtype=dtype))
    return W, X @ X.T


PATTERNS = [("unstructured", 0.5), ("unstructured", 0.6), ("row", 0.5), ("2:4", None), ("1:4", None)]


def _lmo_reference(score, allowed, budget):
    """Optimal value of max <score, V> over the LMO's set, group by group, by sorting."""
    total = 0.0
    for s, a, b in zip(score, allowed, budget):
        vals = torch.sort(s[a & (s > 0)], descending=True).values
        total += float(vals[: int(b)].sum())
    return total


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(1, 40), (6, 10), (30, 4), (12, 8)]))
def test_lmo_is_optimal_and_feasible(seed, shape):
    g = torch.Generator().manual_seed(seed)
    groups, size = shape
    score = torch.randn(groups, size, generator=g, dtype=torch.float64)
    score[torch.rand(groups, size, generator=g) < 0.2] = 0.0  # zeros: never worth taking
    allowed = torch.rand(groups, size, generator=g) < 0.8
    budget = torch.randint(0, size + 1, (groups,), generator=g)
    V = lmo(score, allowed, budget)
    assert not bool((V & ~allowed).any())
    assert bool((V.sum(dim=1) <= budget).all())
    assert bool((score[V] > 0).all())
    assert float(score[V].sum()) == pytest.approx(_lmo_reference(score, allowed, budget), abs=1e-9)


def test_top_flat_large_vectors_select_exactly_the_top_k():
    g = torch.Generator().manual_seed(1)
    for n, k in [(200_000, 7_000), (200_000, 150_000), (100_000, 1), (300_000, 299_999)]:
        x = torch.randn(n, generator=g)
        sel = _top_flat(x, k)
        assert int(sel.sum()) == k
        assert float(x[sel].min()) >= float(x[~sel].max())
    # heavy ties: integer values
    x = torch.randint(0, 5, (120_000,), generator=g).float()
    sel = _top_flat(x, 50_000)
    assert int(sel.sum()) == 50_000
    assert float(x[sel].min()) >= float(x[~sel].max())


def test_round_mask_exact_budget_and_stable_ties():
    m = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.0, 0.9, 0.9, 0.9]])
    allowed = torch.tensor([[True, True, True, True], [True, False, True, True]])
    out = round_mask(m, allowed, torch.tensor([2, 1]))
    assert out.tolist() == [[True, True, False, False], [False, False, True, False]]


@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_sparsefw_mask_is_feasible_and_weight_is_masked(pattern, sparsity, alpha):
    W, G = _problem(8, 16)
    pat = parse_pattern(pattern, sparsity)
    res = sparsefw(W.float(), G.float(), pat, iterations=60, alpha=alpha)
    assert is_feasible(res.mask, pat)
    assert torch.equal(res.weight, torch.where(res.mask, W.float(), torch.zeros_like(W.float())))
    s = res.stats
    assert s["objective"] <= s["objective_warm"] * (1 + 1e-6)  # the safeguard
    assert s["objective"] == pytest.approx(fw_objective(W.float(), G.float(), res.mask), rel=1e-4)
    assert s["fixed"] == int(alpha * s["kept"] + 1e-9)


def test_alpha_one_returns_the_warm_start():
    W, G = _problem(8, 16, seed=3)
    pat = parse_pattern("unstructured", 0.6)
    res = sparsefw(W, G, pat, iterations=50, alpha=1.0, dtype="float64")
    assert torch.equal(res.mask, wanda(W, G, pat).mask)


def test_fixed_weights_are_the_most_salient_kept_ones():
    W, G = _problem(8, 16, seed=4)
    pat = parse_pattern("unstructured", 0.5)
    warm = wanda(W, G, pat).mask
    res = sparsefw(W, G, pat, iterations=30, alpha=0.5, dtype="float64", safeguard=False)
    sal = W.pow(2) * torch.diagonal(G).reshape(1, -1)
    kept_sal = torch.sort(sal[warm], descending=True).values
    n_fixed = res.stats["fixed"]
    # every weight at least as salient as the n_fixed-th kept one survives
    assert bool(res.mask[warm & (sal >= kept_sal[n_fixed - 1])].all())


def _relaxed_optimum_cvxpy(W, G, pat):
    cp = pytest.importorskip("cvxpy")
    import numpy as np

    Wn, Gn = W.numpy(), G.numpy()
    d_out, d_in = Wn.shape
    L = np.linalg.cholesky(Gn + 1e-12 * np.eye(d_in))
    M = cp.Variable((d_out, d_in))
    cons = [M >= 0, M <= 1]
    keep = group_budget(pat, (d_out, d_in))
    groups = group_view(pat, (d_out, d_in))
    cons.append(cp.sum(cp.reshape(M, groups, order="C"), axis=1) <= keep)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(cp.multiply(Wn, 1 - M) @ L)), cons)
    prob.solve()
    return float(prob.value)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("row", 0.5), ("2:4", None)])
def test_fw_converges_to_the_cvxpy_relaxed_optimum_and_the_gap_certifies_it(pattern, sparsity):
    W, G = _problem(5, 12, seed=7)
    pat = parse_pattern(pattern, sparsity)
    opt = _relaxed_optimum_cvxpy(W, G, pat)
    res = sparsefw(W, G, pat, iterations=3000, alpha=0.0, step="line", dtype="float64", trace_every=1)
    s = res.stats
    assert s["lower_bound"] <= opt * (1 + 1e-7) + 1e-9
    assert s["objective_relaxed"] == pytest.approx(opt, rel=2e-3)
    for rec in s["trace"]:  # the gap bounds the suboptimality at every iteration
        assert rec["objective"] - opt <= rec["gap"] + 1e-7 * opt
    # exact line search: the relaxed objective never increases
    objs = [r["objective"] for r in s["trace"]]
    assert all(b <= a * (1 + 1e-10) + 1e-10 for a, b in zip(objs, objs[1:]))


def test_lower_bound_is_below_the_exact_binary_optimum():
    W, G = _problem(1, 10, seed=11)
    pat = parse_pattern("unstructured", 0.5)
    best = min(fw_objective(W, G, torch.tensor(list(c)).reshape(1, -1).bool())
               for c in itertools.product([0, 1], repeat=10) if sum(c) == 5)
    res = sparsefw(W, G, pat, iterations=500, alpha=0.0, dtype="float64")
    assert res.stats["lower_bound"] <= best + 1e-9
    assert res.stats["objective"] >= best - 1e-9


def test_maintained_products_match_exact_recomputation():
    """Sparse incremental updates of (W⊙V)G give the same run as recomputing every iteration."""
    W, G = _problem(24, 32, seed=5)
    pat = parse_pattern("unstructured", 0.6)
    a = sparsefw(W, G, pat, iterations=200, alpha=0.5, dtype="float64", refresh=1)
    b = sparsefw(W, G, pat, iterations=200, alpha=0.5, dtype="float64", refresh=10**9, dense_fraction=1.0)
    assert b.stats["dense_updates"] == 0
    assert b.stats["direct_updates"] > 0 and b.stats["delta_updates"] > 0  # both sparse paths ran
    assert torch.equal(a.mask, b.mask)
    assert b.stats["objective_relaxed"] == pytest.approx(a.stats["objective_relaxed"], rel=1e-9)


def test_sparsefw_beats_its_warm_start_on_a_correlated_layer():
    W, G = _problem(16, 32, tokens=48, seed=2)  # tokens < 2·d_in: strongly correlated inputs
    pat = parse_pattern("unstructured", 0.6)
    res = sparsefw(W, G, pat, iterations=300, alpha=0.5, dtype="float64")
    assert res.stats["used"] == "fw"
    assert res.stats["objective"] < res.stats["objective_warm"]


def test_deterministic_and_registered():
    W, G = _problem(8, 16, seed=9)
    pat = parse_pattern("2:4")
    a = sparsefw(W.float(), G.float(), pat, iterations=40)
    b = get_method("sparsefw").solver(W.float(), G.float(), pat, iterations=40)
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("kwargs,needle", [
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"warm_start": "obs"}, "warm_start"),
    ({"step": "armijo"}, "step"), ({"iterations": -1}, "iterations"), ({"refresh": 0}, "refresh"),
])
def test_bad_options_are_rejected_clearly(kwargs, needle):
    W, G = _problem(4, 8)
    with pytest.raises(ValueError, match=needle):
        sparsefw(W, G, parse_pattern("2:4"), **kwargs)


def test_nan_weight_rejected():
    W, G = _problem(4, 8)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsefw(W, G, parse_pattern("2:4"))
