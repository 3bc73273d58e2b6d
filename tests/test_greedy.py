"""Tests of the greedy layer-wise solvers: magnitude, Wanda, RIA, SparseGPT."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisparse.greedy import magnitude, ria, ria_score, sparsegpt, wanda, wanda_score
from minisparse.methods import get_method
from minisparse.objective import dampen, gram, layer_error, reconstruct
from minisparse.patterns import is_feasible, num_pruned, parse_pattern, topk_mask

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# problem generators
# ------------------------------------------------------------------------------------------------

def _values(gen: torch.Generator, shape: tuple[int, int], kind: str) -> torch.Tensor:
    if kind == "ties":  # few distinct integers: many exact ties, zeros, negatives
        return torch.randint(-2, 3, shape, generator=gen).double()
    if kind == "sparse":  # mostly zeros
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        return v * (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@st.composite
def problems(draw):
    """A weight (float32) and a Gram matrix G = X Xᵀ from random X, with ties, zeros, dead inputs and
    scales from tiny to huge, plus a pattern the shape admits."""
    d_out = draw(st.integers(1, 6))
    d_in = 4 * draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w_kind = draw(st.sampled_from(["ties", "normal", "sparse"]))
    x_kind = draw(st.sampled_from(["ties", "normal", "sparse"]))
    w_scale = draw(st.sampled_from([1e-12, 1e-3, 1.0, 1e3, 1e12]))
    x_scale = draw(st.sampled_from([1e-4, 1.0, 1e4]))
    tokens = draw(st.integers(1, 3 * d_in))
    W = (_values(gen, (d_out, d_in), w_kind) * w_scale).float()
    X = _values(gen, (tokens, d_in), x_kind) * x_scale
    if draw(st.booleans()):  # dead inputs: columns of X that are zero on every token
        X[:, torch.rand(d_in, generator=gen) < 0.3] = 0
    G = gram(X, torch.float64).float()
    kinds = ["unstructured", "row", "2:4", "1:4", "3:4", "1:2"] + (["4:8"] if d_in % 8 == 0 else [])
    kind = draw(st.sampled_from(kinds))
    if ":" in kind:
        pattern = parse_pattern(kind)
    else:
        s = draw(st.one_of(st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.7, 0.9]), st.floats(0.0, 0.99)))
        pattern = parse_pattern(kind, s)
    return W, G, pattern


SOLVERS = {
    "magnitude": lambda W, G, p: magnitude(W, G, p),
    "wanda-row": lambda W, G, p: wanda(W, G, p),
    "wanda-matrix": lambda W, G, p: wanda(W, G, p, per="matrix"),
    "ria-matrix": lambda W, G, p: ria(W, G, p),
    "ria-row": lambda W, G, p: ria(W, G, p, per="row", a=1.0),
    "sparsegpt": lambda W, G, p: sparsegpt(W, G, p),
    "sparsegpt-bs3": lambda W, G, p: sparsegpt(W, G, p, blocksize=3),
    "sparsegpt-bs8-f64": lambda W, G, p: sparsegpt(W, G, p, blocksize=8, dtype="float64"),
}


def correlated_problem(seed: int, d_out: int = 32, d_in: int = 64, tokens: int = 512, kind: str = "factor"):
    """W and G from correlated inputs: a few shared latent factors plus noise (kind="factor"), or
    mixed features with log-normal channel scales like LLM activations with outliers (kind="scaled")."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    if kind == "factor":
        X = torch.randn(tokens, 8, generator=gen, dtype=torch.float64) @ torch.randn(
            8, d_in, generator=gen, dtype=torch.float64) + Z
    else:
        mix = torch.eye(d_in, dtype=torch.float64) + 0.5 * torch.randn(
            d_in, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
        X = (Z @ mix) * torch.exp(torch.randn(d_in, generator=gen, dtype=torch.float64))
    W = torch.randn(d_out, d_in, generator=gen)
    return W, gram(X, torch.float64).float()


# ------------------------------------------------------------------------------------------------
# every solver, every pattern: exact feasibility
# ------------------------------------------------------------------------------------------------

@settings(max_examples=60, **SETTINGS)
@given(problems())
def test_every_solver_meets_every_pattern_exactly(problem):
    W, G, pattern = problem
    for name, solve in SOLVERS.items():
        res = solve(W, G, pattern)
        assert res.mask.dtype == torch.bool and res.mask.shape == W.shape, name
        assert is_feasible(res.mask, pattern), (name, pattern, int((~res.mask).sum()), num_pruned(pattern, W.shape))
        assert res.weight.dtype == W.dtype and res.weight.shape == W.shape, name
        assert bool(torch.isfinite(res.weight).all()), name
        assert bool((res.weight[~res.mask] == 0).all()), name
        if not name.startswith("sparsegpt"):  # no reconstruction: kept weights unchanged
            assert torch.equal(res.weight[res.mask], W[res.mask]), name


@settings(max_examples=25, **SETTINGS)
@given(problems())
def test_solvers_are_deterministic(problem):
    W, G, pattern = problem
    for name in ("wanda-row", "ria-matrix", "sparsegpt-bs3"):
        a, b = SOLVERS[name](W, G, pattern), SOLVERS[name](W.clone(), G.clone(), pattern)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight), name


def test_methods_are_registered():
    for name, fn in (("magnitude", magnitude), ("wanda", wanda), ("ria", ria), ("sparsegpt", sparsegpt)):
        assert get_method(name).solver is fn and get_method(name).kind == "layerwise"


@pytest.mark.parametrize("solver", [wanda, ria, sparsegpt])
@pytest.mark.parametrize("where,bad", [("W", float("nan")), ("W", float("inf")), ("G", float("nan")),
                                        ("G", -float("inf"))])
def test_non_finite_inputs_raise(solver, where, bad):
    W, G = correlated_problem(0, 4, 8, 32)
    if where == "W":
        W[1, 2] = bad
    else:
        G[3, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        solver(W, G, parse_pattern("2:4"))


def test_bad_arguments_raise():
    W, G = correlated_problem(0, 4, 8, 32)
    p = parse_pattern("unstructured", 0.5)
    with pytest.raises(ValueError, match="per must be"):
        wanda(W, G, p, per="column")
    with pytest.raises(ValueError, match="d_in"):
        sparsegpt(W, G[:4, :4], p)
    with pytest.raises(ValueError, match="Gram matrix"):
        wanda(W, None, p)
    with pytest.raises(ValueError, match="damp"):
        sparsegpt(W, G, p, damp=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        sparsegpt(W, G, p, dtype="float16")
    with pytest.raises(ValueError, match="negative diagonal"):
        wanda(W, -G, p)


# ------------------------------------------------------------------------------------------------
# Wanda and RIA against naive formulas
# ------------------------------------------------------------------------------------------------

def _naive_keep(scores: list[float], keep: int) -> set[int]:
    """Indices of the ``keep`` highest scores; ties: the lower index is kept."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return set(order[:keep])


@settings(max_examples=40, **SETTINGS)
@given(problems(), st.integers(0, 4))
def test_wanda_equals_naive_per_row_loop(problem, k):
    W, G, _ = problem
    d_out, d_in = W.shape
    k = min(k, d_in - 1)
    pattern = parse_pattern("row", k / d_in)  # prunes exactly k per row (k/d_in*d_in rounds to k)
    expected = torch.zeros(d_out, d_in, dtype=torch.bool)
    for i in range(d_out):
        # W_ij² G_jj: the single-weight error (paper eq. 5), the square of |W_ij| ||X_j||
        errors = [float(W[i, j]) * float(W[i, j]) * float(G[j, j]) for j in range(d_in)]
        for j in _naive_keep(errors, d_in - k):
            expected[i, j] = True
    assert torch.equal(wanda(W, G, pattern).mask, expected)
    # unstructured with per="row" (Wanda's default) prunes the same k per row
    assert torch.equal(wanda(W, G, parse_pattern("unstructured", k / d_in)).mask, expected)
    # the row pattern ignores per
    assert torch.equal(wanda(W, G, pattern, per="matrix").mask, expected)
    naive = [[abs(float(W[i, j])) * math.sqrt(float(G[j, j])) for j in range(d_in)] for i in range(d_out)]
    assert torch.allclose(wanda_score(W, G), torch.tensor(naive, dtype=torch.float64), rtol=1e-15, atol=0)


@settings(max_examples=40, **SETTINGS)
@given(problems(), st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.3, 0.5, 0.8]))
def test_ria_equals_naive_formula(problem, a, s):
    W, G, _ = problem
    d_out, d_in = W.shape
    A = [[abs(float(W[i, j])) for j in range(d_in)] for i in range(d_out)]
    rs = [sum(A[i]) for i in range(d_out)]
    cs = [sum(A[i][j] for i in range(d_out)) for j in range(d_in)]
    naive = torch.tensor([[((A[i][j] / rs[i] if rs[i] else 0.0) + (A[i][j] / cs[j] if cs[j] else 0.0))
                           * math.sqrt(float(G[j, j])) ** a for j in range(d_in)] for i in range(d_out)],
                         dtype=torch.float64)
    assert torch.allclose(ria_score(W, G, a), naive, rtol=1e-12, atol=0)
    # the mask keeps a top set of the naive scores (up to last-bit rounding of sqrt/pow)
    for pattern in (parse_pattern("unstructured", s), parse_pattern("row", s)):
        mask = ria(W, G, pattern, a=a).mask
        best = topk_mask(naive, pattern)
        assert is_feasible(mask, pattern)
        assert float(naive[mask].sum()) == pytest.approx(float(naive[best].sum()), rel=1e-12, abs=0)


def test_ties_keep_the_lower_index():
    W = torch.ones(3, 8)
    G = torch.eye(8) * 4.0
    p = parse_pattern("unstructured", 0.5)
    first = torch.arange(24).reshape(3, 8) < 12
    for solve in (magnitude, ria):
        assert torch.equal(solve(W, G, p).mask, first)
    left = (torch.arange(8) < 4).expand(3, 8)
    assert torch.equal(wanda(W, G, p).mask, left)
    assert torch.equal(wanda(W, G, p, per="matrix").mask, first)
    assert torch.equal(ria(W, G, parse_pattern("2:4")).mask, torch.tensor([True, True, False, False] * 6).reshape(3, 8))


def test_wanda_per_matrix_versus_per_row():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(6, 16, generator=gen) * torch.tensor([100.0, 1, 1, 0.01, 1, 1]).reshape(-1, 1)
    _, G = correlated_problem(1, 6, 16, 64)
    p = parse_pattern("unstructured", 0.5)
    by_row, by_matrix = wanda(W, G, p), wanda(W, G, p, per="matrix")
    assert ((~by_row.mask).sum(dim=1) == 8).all()  # 8 of 16 in every row
    assert torch.equal(by_matrix.mask, topk_mask(wanda_score(W, G), p))  # global top half
    assert by_matrix.mask[0].all() and not by_matrix.mask[3].any()  # the big row kept, the tiny one gone
    assert int((~by_matrix.mask).sum()) == int((~by_row.mask).sum()) == 48
    # RIA's default is per matrix; per="row" equals the row pattern
    assert torch.equal(ria(W, G, p, per="row").mask, ria(W, G, parse_pattern("row", 0.5)).mask)
    assert torch.equal(ria(W, G, p).mask, topk_mask(ria_score(W, G), p))


def test_wanda_per_row_spreads_a_remainder_evenly():
    _, G = correlated_problem(2, 5, 8, 64)
    W = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    p = parse_pattern("unstructured", 0.3)  # round(0.3*40) = 12 = 5*2 + 2 over 5 rows
    res = wanda(W, G, p)
    per_row = (~res.mask).sum(dim=1)
    assert int(per_row.sum()) == 12 and set(per_row.tolist()) == {2, 3}
    # the two extra prunes go where the third-lowest score of the row is lowest
    third = torch.sort(wanda_score(W, G), dim=1).values[:, 2]
    assert set(torch.nonzero(per_row == 3).flatten().tolist()) == set(torch.argsort(third)[:2].tolist())


# ------------------------------------------------------------------------------------------------
# SparseGPT: OBS, reconstruction quality, robustness
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_sparsegpt_single_weight_is_the_obs_step(damp):
    """Prune one weight per row: the update is OBS, w - w_q/[H⁻¹]_qq H⁻¹ e_q, on the columns from q on
    (SparseGPT freezes the columns before q); for q = 0 it is the classical closed form."""
    d_out, d_in = 4, 10
    _, G = correlated_problem(5, d_out, d_in, 200)
    G = G.double()
    gen = torch.Generator().manual_seed(7)
    W = (torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) * 1.5 + 0.5) * torch.sign(
        torch.randn(d_out, d_in, generator=gen, dtype=torch.float64))
    qs = [0, 4, 7, 9]
    for i, q in enumerate(qs):
        W[i, q] = 1e-4  # the weight to prune
    res = sparsegpt(W, G, parse_pattern("row", 1 / d_in), damp=damp, dtype="float64")
    assert [int(j) for j in torch.nonzero(~res.mask)[:, 1]] == qs
    H = dampen(G, damp)
    Hinv = torch.linalg.inv(H)
    closed = W[0] - W[0, 0] / Hinv[0, 0] * Hinv[:, 0]
    assert torch.allclose(res.weight[0], closed, rtol=1e-9, atol=1e-12)
    for i, q in enumerate(qs):
        Hq = torch.linalg.inv(H[q:, q:])
        expected = W[i].clone()
        expected[q:] = W[i, q:] - W[i, q] / Hq[0, 0] * Hq[:, 0]
        assert torch.allclose(res.weight[i], expected, rtol=1e-9, atol=1e-12)
        assert res.weight[i, q] == 0


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_sparsegpt_lazy_block_updates_change_nothing(nm):
    """N:M masks are chosen every M columns whatever the blocking, so the block size only reorders
    the arithmetic: blocks of M columns (lazy updates everywhere) give the one-block result."""
    W, G = correlated_problem(6, 8, 48, 128)
    p = parse_pattern(nm)
    one = sparsegpt(W, G, p, blocksize=48, dtype="float64")
    for bs in (8, 16, 20):  # 20 rounds down to 16 for M = 8 and stays 20 for M = 4
        blocked = sparsegpt(W, G, p, blocksize=bs, dtype="float64")
        assert torch.equal(one.mask, blocked.mask)
        assert torch.allclose(one.weight, blocked.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", [parse_pattern("unstructured", 0.5), parse_pattern("row", 0.6),
                                     parse_pattern("2:4")])
def test_sparsegpt_reconstruction_against_optimum_and_none(pattern):
    W, G = correlated_problem(11)
    res = sparsegpt(W, G, pattern, dtype="float64")
    err = layer_error(W, res.weight, G)
    optimum = layer_error(W, reconstruct(W, res.mask, G), G)
    none = layer_error(W, W * res.mask, G)
    assert optimum <= err * (1 + 1e-6)
    assert err < 0.5 * none
    # the error estimate is the exact error under the damped G
    damped = layer_error(W, res.weight, dampen(G, res.stats["damp"]))
    assert res.stats["error_estimate"] == pytest.approx(damped, rel=1e-6)


@pytest.mark.parametrize("kind", ["factor", "scaled"])
@pytest.mark.parametrize("pattern", [parse_pattern("unstructured", 0.5), parse_pattern("row", 0.5),
                                     parse_pattern("2:4")])
def test_sparsegpt_beats_wanda_and_magnitude(kind, pattern):
    for seed in range(2):
        W, G = correlated_problem(seed, kind=kind)
        e_sgpt = layer_error(W, sparsegpt(W, G, pattern).weight, G)
        assert e_sgpt < layer_error(W, wanda(W, G, pattern).weight, G)
        assert e_sgpt < layer_error(W, magnitude(W, G, pattern).weight, G)


def test_sparsegpt_exact_sparsity_split_over_blocks():
    W, G = correlated_problem(4, 7, 40, 128)
    p = parse_pattern("unstructured", 0.37)  # round(0.37 * 280) = 104, not a multiple of anything nice
    res = sparsegpt(W, G, p, blocksize=16)  # blocks of 16, 16, 8 columns
    pruned = (~res.mask).sum(dim=0)
    assert int(pruned.sum()) == 104
    assert [int(pruned[a:b].sum()) for a, b in ((0, 16), (16, 32), (32, 40))] == [41, 42, 21]
    r = sparsegpt(W, G, parse_pattern("row", 0.3), blocksize=16)  # 12 per row: 4, 5, 3 per block
    per_block = [(~r.mask[:, a:b]).sum(dim=1) for a, b in ((0, 16), (16, 32), (32, 40))]
    assert [set(x.tolist()) for x in per_block] == [{4}, {5}, {3}]


def test_sparsegpt_float32_close_to_float64():
    W, G = correlated_problem(8)
    p = parse_pattern("2:4")
    r32, r64 = sparsegpt(W, G, p), sparsegpt(W, G, p, dtype=torch.float64)
    assert r32.weight.dtype == torch.float32 and r64.weight.dtype == torch.float32
    e32, e64 = layer_error(W, r32.weight, G), layer_error(W, r64.weight, G)
    assert abs(e32 - e64) <= 1e-3 * e64


def test_sparsegpt_dead_inputs():
    W, G = correlated_problem(9, 4, 16, 64)
    G[3, :] = 0
    G[:, 3] = 0
    res = sparsegpt(W, G, parse_pattern("unstructured", 0.25))
    assert res.stats["dead_inputs"] == 1 and res.stats["cholesky_retries"] == 0
    assert (res.weight[:, 3] == 0).all()  # a dead input's weights carry nothing: they go (or stay 0)
    zero = sparsegpt(W, torch.zeros_like(G), parse_pattern("2:4"))  # no data at all: every input dead
    assert zero.stats["dead_inputs"] == 16 and bool(torch.isfinite(zero.weight).all())
    assert is_feasible(zero.mask, parse_pattern("2:4")) and (zero.weight == 0).all()


def test_sparsegpt_cholesky_retry():
    W, G = correlated_problem(10, 8, 16, 64)
    p = parse_pattern("unstructured", 0.5)
    lam_min = float(torch.linalg.eigvalsh(G.double())[0])
    indefinite = G - (lam_min + 0.05 * float(torch.diagonal(G).mean())) * torch.eye(16)
    # smallest eigenvalue -5% of mean diag G: the 1% ridge fails, the 10% ridge works
    assert float(torch.linalg.eigvalsh(indefinite.double())[0]) < 0
    res = sparsegpt(W, indefinite, p)
    assert res.stats["cholesky_retries"] == 1 and res.stats["damp"] == pytest.approx(0.1)
    assert bool(torch.isfinite(res.weight).all()) and is_feasible(res.mask, p)
    neg = sparsegpt(W, -torch.eye(16), p)  # mean diag < 0: ridge relative to 1; needs damp 10
    assert neg.stats["cholesky_retries"] == 3 and neg.stats["damp"] == pytest.approx(10.0)
    assert bool(torch.isfinite(neg.weight).all()) and is_feasible(neg.mask, p)
    with pytest.raises(ValueError, match="Cholesky"):
        sparsegpt(W, indefinite, p, max_retries=0)


def test_sparsegpt_sparsity_zero_and_half_precision():
    W, G = correlated_problem(12, 4, 16, 64)
    res = sparsegpt(W, G, parse_pattern("unstructured", 0.0))
    assert res.mask.all() and torch.equal(res.weight, W)
    half = sparsegpt(W.to(torch.bfloat16), G, parse_pattern("2:4"))
    assert half.weight.dtype == torch.bfloat16 and (half.weight[~half.mask] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_solvers_on_cuda_match_cpu():
    W, G = correlated_problem(13, 64, 256, 1024)
    for p in (parse_pattern("unstructured", 0.5), parse_pattern("row", 0.5), parse_pattern("2:4")):
        for solve in (magnitude, wanda, ria):
            cpu, gpu = solve(W, G, p), solve(W.cuda(), G.cuda(), p)
            assert gpu.weight.is_cuda and torch.equal(cpu.mask, gpu.mask.cpu())
        cpu, gpu = sparsegpt(W, G, p, dtype="float64"), sparsegpt(W.cuda(), G.cuda(), p, dtype="float64")
        assert gpu.weight.is_cuda and is_feasible(gpu.mask.cpu(), p)
        assert (cpu.mask == gpu.mask.cpu()).float().mean() > 0.999
        assert layer_error(W, gpu.weight.cpu(), G) == pytest.approx(layer_error(W, cpu.weight, G), rel=1e-3)
