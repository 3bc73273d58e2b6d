"""Tests of minisparse.prox: soft-thresholding, the 2:4 regularizer and its exact prox, the frozen-weight
regularizer and its prox.  The 2:4 prox is checked against an independent brute-force global
minimiser (grid search plus multi-start coordinate descent), not against the candidate theory it uses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisparse import prox as P
from strategies import weights


# ---------------------------------------------------------------------------------------------------
# An independent global reference for one group: min over w >= 0 of 0.5||w - z||^2 + lam e3(w)


def _e3(w):
    return w[..., 0] * w[..., 1] * (w[..., 2] + w[..., 3]) + w[..., 2] * w[..., 3] * (w[..., 0] + w[..., 1])


def global_reference(z: np.ndarray, lam: np.ndarray, n_grid: int = 7, top: int = 4, sweeps: int = 400):
    """Best objective found for each row of z (sorted magnitudes, shape (G, 4)) and lam (G,).

    A grid over the box [0, z] (n_grid values per coordinate, all 4-tuples) locates the basins; the
    ``top`` best grid points of every group are refined by projected coordinate descent
    (w_i <- max(0, z_i - lam * d e3 / d w_i), exact 1-D minimisation, monotone), and the 2-sparse point
    is added.  Returns the least objective value and its point."""
    G = z.shape[0]
    levels = np.linspace(0.0, 1.0, n_grid)
    mesh = np.stack(np.meshgrid(levels, levels, levels, levels, indexing="ij"), -1).reshape(-1, 4)
    pts = z[:, None, :] * mesh[None, :, :]  # (G, K, 4)
    vals = 0.5 * ((pts - z[:, None, :]) ** 2).sum(-1) + lam[:, None] * _e3(pts)
    best_idx = np.argsort(vals, axis=1)[:, :top]
    w = np.take_along_axis(pts, best_idx[:, :, None], axis=1).copy()  # (G, top, 4)
    zz, ll = z[:, None, :], lam[:, None]
    for _ in range(sweeps):
        prev = w.copy()
        for i in range(4):
            o = [j for j in range(4) if j != i]
            e2 = w[..., o[0]] * w[..., o[1]] + w[..., o[0]] * w[..., o[2]] + w[..., o[1]] * w[..., o[2]]
            w[..., i] = np.maximum(zz[..., i] - ll * e2, 0.0)
        if np.abs(w - prev).max() < 1e-16:
            break
    v = 0.5 * ((w - zz) ** 2).sum(-1) + ll * _e3(w)
    k = v.argmin(1)
    v_best, w_best = v[np.arange(G), k], w[np.arange(G), k]
    w2 = np.concatenate([z[:, :2], np.zeros_like(z[:, 2:])], 1)
    v2 = 0.5 * (z[:, 2] ** 2 + z[:, 3] ** 2)
    use2 = v2 <= v_best
    return np.where(use2, v2, v_best), np.where(use2[:, None], w2, w_best)


def random_groups(n: int, seed: int):
    """Signed groups with ties, zeros, equal magnitudes of opposite signs, and lambdas over the whole
    range from 'identity-like' to 'top-2 projection'."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, 4))
    kind = rng.integers(0, 10, n)
    a = np.abs(y[:, 0:1])
    y[kind == 1, 1] = -y[kind == 1, 0]  # tie of magnitudes, opposite signs
    y[kind == 2] = a[kind == 2] * np.sign(rng.standard_normal((int((kind == 2).sum()), 4)))  # all tied
    y[kind == 3, 2:] = 0.0  # zeros
    y[kind == 4, 3] = 0.0
    y[kind == 5] = rng.integers(-3, 4, (int((kind == 5).sum()), 4))  # small integers: many ties
    m = kind == 6
    y[m, 1:] = y[m, :1] * (1 + 1e-3 * rng.standard_normal((int(m.sum()), 3)))  # near-ties
    y[kind == 7, 2] = y[kind == 7, 1]
    scale = np.abs(y).max(1)
    scale[scale == 0] = 1.0
    lam = np.exp(rng.uniform(-4.0, 3.0, n)) / scale
    return y, lam


def objective(x: np.ndarray, y: np.ndarray, lam: np.ndarray) -> np.ndarray:
    return 0.5 * ((x - y) ** 2).sum(1) + lam * _e3(np.abs(x))


# ---------------------------------------------------------------------------------------------------
# soft-thresholding and the regularizer


def test_soft_threshold_matches_cvxpy():
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(0)
    for n, t in [(7, 0.3), (12, 1.0), (20, 0.05)]:
        y = rng.standard_normal(n)
        x = cp.Variable(n)
        cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + t * cp.norm1(x))).solve()
        ours = P.soft_threshold(torch.tensor(y), t).numpy()
        np.testing.assert_allclose(ours, x.value, atol=1e-6)
    # tensor threshold, broadcast
    y = torch.tensor([[1.0, -2.0, 0.5], [3.0, -0.1, 0.0]])
    t = torch.tensor([[0.5], [1.0]])
    assert torch.equal(P.soft_threshold(y, t), torch.tensor([[0.5, -1.5, 0.0], [2.0, -0.0, 0.0]]))
    with pytest.raises(ValueError):
        P.soft_threshold(y, -1.0)


def test_reg_24_zero_iff_two_four_sparse_and_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    mask = torch.rand(50, 16, generator=g) < 0.5
    w = w * mask
    nnz = (w.reshape(50, 4, 4) != 0).sum(-1)
    r = P.reg_24(w)
    assert r.shape == (50, 4)
    assert torch.equal(r == 0, nnz <= 2)
    perm = torch.randperm(4, generator=g)
    wp = w.reshape(50, 4, 4)[..., perm].reshape(50, 16)
    torch.testing.assert_close(P.reg_24(wp), r)
    torch.testing.assert_close(P.reg_24(-w), r)
    # value: the four triple products
    v = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    assert P.reg_24(v).item() == pytest.approx(1 * 2 * 3 + 1 * 2 * 4 + 1 * 3 * 4 + 2 * 3 * 4)
    assert P.reg_24_total(w).item() == pytest.approx(r.sum().item())
    with pytest.raises(ValueError):
        P.reg_24(torch.zeros(3, 6))


# ---------------------------------------------------------------------------------------------------
# prox_24 against the global reference


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_prox_24_is_globally_optimal_and_sign_consistent(backend):
    if backend == "kernel" and not P.kernel_available():
        pytest.skip("no compiled kernel")
    y, lam = random_groups(2000, seed=1)
    x = P.prox_24(torch.tensor(y), torch.tensor(lam).reshape(-1, 1), backend=backend).numpy()
    z = -np.sort(-np.abs(y), axis=1)
    v_ref, _ = global_reference(z, lam)
    v_ours = objective(x, y, lam)
    scale = np.maximum(np.abs(y).max(1) ** 2, 1e-300)
    excess = (v_ours - v_ref) / scale
    assert excess.max() <= 1e-9, f"worst excess {excess.max():.3g} at {y[excess.argmax()]}, lam {lam[excess.argmax()]}"
    # the reference is a good global minimiser too: it agrees on almost every group
    assert (np.abs(excess) <= 1e-6).mean() > 0.97
    # each coordinate is zero or keeps its sign, and shrinks
    assert np.all((x == 0) | (np.sign(x) == np.sign(y)))
    assert np.all(np.abs(x) <= np.abs(y) * (1 + 1e-12))


def test_prox_24_beats_alternating_minimisation_on_the_tie_counterexample():
    y = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    lam = 1.01
    a = (math.sqrt(1 + 4 * lam) - 1) / (2 * lam)
    for backend in ["auto", "torch"]:
        x = P.prox_24(y, lam, backend=backend)
        torch.testing.assert_close(x, torch.tensor([[a, a, a, 0.0]], dtype=torch.float64))
    for init in ["z", "zero"]:  # the paper's ALM and the authors' code stop at (1, 1, 0, 0)
        xa = P.prox_24_alm(y, lam, init=init)
        assert P.objective_24(xa, y, lam).item() == pytest.approx(0.5)
    assert P.objective_24(P.prox_24(y, lam), y, lam).item() < 0.458


def test_prox_24_never_worse_than_alm_on_realistic_weights():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 64, generator=g, dtype=torch.float64) * 0.02
    for lam in [5.0, 20.0, 60.0]:
        ours = P.objective_24(P.prox_24(W, lam), W, lam)
        alm = P.objective_24(P.prox_24_alm(W, lam, max_iter=300), W, lam)
        assert (ours - alm).max().item() <= 1e-15


@pytest.mark.skipif(not P.kernel_available(), reason="no compiled kernel")
def test_prox_24_globally_optimal_where_the_kernel_needs_its_slow_path():
    # groups with R(0) >= 0 > R'(0) (3-sparse point a saddle along w4): three similar small
    # magnitudes and lam near 1 (normalised); here the kernel's interval screens and certified
    # walk decide, and a wrong certificate would show up as an excess over the global reference
    rng = np.random.default_rng(11)
    n = 3000
    z2 = rng.uniform(0.1, 1.0, n)
    z3 = z2 * rng.uniform(0.8, 1.0, n)
    z4 = z3 * rng.uniform(0.3, 1.0, n)
    z = np.stack([np.ones(n), z2, z3, z4], 1)
    lam = rng.uniform(0.6, 1.2, n)
    perm = np.argsort(rng.random((n, 4)), axis=1)
    y = np.take_along_axis(z, perm, axis=1) * np.sign(rng.standard_normal((n, 4)))
    counts: dict = {}
    x = P.prox_24(torch.tensor(y), torch.tensor(lam).reshape(-1, 1), backend="kernel", stats=counts).numpy()
    assert counts["walks"] >= 50, counts  # the slow path really ran
    v_ref, _ = global_reference(z, lam)
    excess = objective(x, y, lam) - v_ref
    assert excess.max() <= 1e-9, f"worst excess {excess.max():.3g} at {y[excess.argmax()]}, lam {lam[excess.argmax()]}"
    xt = P.prox_24(torch.tensor(y), torch.tensor(lam).reshape(-1, 1), backend="torch").numpy()
    assert np.abs(objective(x, y, lam) - objective(xt, y, lam)).max() <= 1e-12

# ---------------------------------------------------------------------------------------------------
# kernel == torch path, lambda handling, limits


@pytest.mark.skipif(not P.kernel_available(), reason="no compiled kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_torch_path(dtype):
    y, lam = random_groups(4000, seed=2)
    Y = torch.tensor(y, dtype=dtype).reshape(100, 160)
    L = torch.tensor(lam).reshape(100, 40)
    xk = P.prox_24(Y, L, backend="kernel")
    xt = P.prox_24(Y, L, backend="torch")
    assert xk.dtype == dtype and xt.dtype == dtype
    ok = P.objective_24(xk, Y, L)
    ot = P.objective_24(xt, Y, L)
    scale = Y.double().reshape(100, 40, 4).abs().amax(-1).clamp_min(1e-300) ** 2
    assert ((ok - ot).abs() / scale).max().item() <= 1e-12
    # same point where the optimum is unique (no ties in the group)
    mags = Y.double().abs().reshape(-1, 4).sort(1).values
    distinct = ((mags[:, 1:] - mags[:, :-1]) > 1e-6 * mags[:, -1:]).all(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    err = (xk.double() - xt.double()).reshape(-1, 4).abs().amax(1) / mags[:, -1].clamp_min(1e-300)
    assert err[distinct].max().item() <= tol


@pytest.mark.skipif(not P.kernel_available(), reason="no compiled kernel")
def test_kernel_equals_torch_path_on_realistic_weights_and_in_place():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(96, 192, generator=g) * 0.02
    for lam in [8.0, 30.0, 90.0]:
        xk = P.prox_24(W, lam)
        xt = P.prox_24_torch(W, lam)
        torch.testing.assert_close(xk, xt, rtol=0, atol=1e-7)
        Wc = torch.nn.Parameter(W.clone())
        P.prox_24_(Wc, lam)
        assert torch.equal(Wc.data, xk)
        out = torch.empty_like(W)
        assert P.prox_24(W, lam, out=out) is out and torch.equal(out, xk)
        counts: dict = {}
        P.prox_24(W, lam, stats=counts)
        nnz = (xk.reshape(-1, 4) != 0).sum(1)
        assert (counts["n2"], counts["n3"], counts["n4"]) == tuple(int(v) for v in
                                                                 ((nnz <= 2).sum(), (nnz == 3).sum(), (nnz == 4).sum()))


def test_lambda_per_group_tensor_and_broadcasting():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 32, generator=g, dtype=torch.float64)
    lam = torch.rand(6, 8, generator=g, dtype=torch.float64) * 3
    x = P.prox_24(W, lam)
    for i in range(6):
        for j in range(8):
            xi = P.prox_24(W[i:i + 1, 4 * j:4 * j + 4], float(lam[i, j]))
            torch.testing.assert_close(x[i:i + 1, 4 * j:4 * j + 4], xi, rtol=0, atol=1e-15)
    lam_row = torch.rand(6, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(P.prox_24(W, lam_row), P.prox_24(W, lam_row.expand(6, 8)))
    torch.testing.assert_close(P.prox_24(W, torch.tensor(0.7)), P.prox_24(W, 0.7))
    with pytest.raises(ValueError):
        P.prox_24(W, torch.ones(5, 8))
    with pytest.raises(ValueError):
        P.prox_24(W, -1.0)
    with pytest.raises(ValueError):
        P.prox_24(W, float("nan"))
    with pytest.raises(ValueError):
        P.prox_24(torch.zeros(3, 6), 1.0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_lambda_zero_is_identity_and_huge_lambda_is_the_top2_projection(backend):
    g = torch.Generator().manual_seed(6)
    W = torch.randn(20, 64, generator=g)
    assert torch.equal(P.prox_24(W, 0.0, backend=backend), W)
    x = P.prox_24(W, 1e12, backend=backend)
    grp = W.reshape(-1, 4)
    top2 = torch.zeros_like(grp).scatter(1, grp.abs().topk(2, dim=1).indices, 1.0)
    assert torch.equal(x.reshape(-1, 4), grp * top2)
    assert torch.equal(P.reg_24(x), torch.zeros(20, 16))
    # large but moderate lambda: 2:4 feasible as well
    assert torch.equal(P.reg_24(P.prox_24(W, 50.0, backend=backend)), torch.zeros(20, 16))


def test_special_values():
    y = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, float("nan"), 2.0, 3.0], [-0.0, 2.0, -2.0, 2.0],
                      [1e-300, 2e-300, 3e-300, 4e-300], [1e300, -2e300, 3e300, 4e300]], dtype=torch.float64)
    for backend in ["auto", "torch"]:
        x = P.prox_24(y, 1.0, backend=backend)
        assert torch.equal(x[0], y[0])
        assert torch.isnan(x[1, 1]) and torch.equal(x[1, [0, 2, 3]], y[1, [0, 2, 3]])  # unchanged
        assert torch.isfinite(x[2:]).all()
        assert bool((x[4] == torch.tensor([0.0, 0.0, 3e300, 4e300], dtype=torch.float64)).all())
        torch.testing.assert_close(x[3], y[3], rtol=1e-15, atol=0)  # lam * scale tiny: (almost) identity
    assert P.prox_24(torch.zeros(0, 8), 1.0).shape == (0, 8)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_tiny_lambda_is_exactly_the_identity_and_nothing_more(backend):
    # lam * scale underflows (a subnormal): found by the property test below; both paths used to
    # return a point far from the optimum (an objective of 5e-61 where the input itself costs ~0)
    w = torch.tensor([[2e-30, 1e-30, 0, -2e-30, -1e-30, -3e-30, -3e-30, -3e-30]])
    for dt in (torch.float32, torch.float64):
        W = w.to(dt)
        for lam in (5e-324 / 3e-30, 1e-300, 1e-200):
            st = {}
            x = P.prox_24(W, lam, backend=backend, stats=st)
            assert torch.equal(x, W), (dt, lam, x)
            if backend == "auto" and P.kernel_available():
                assert (st["n2"], st["n3"], st["n4"]) == (0, 1, 1)
    # where lam is small but does matter (a coordinate far below lam relative to the largest), the
    # certificate must not fire: the tiny coordinate is pruned (w4 = z4 - 3 lam < 0), the others keep
    # their value to rounding
    y = torch.tensor([[1.0, 1.0, 1.0, 1e-25]], dtype=torch.float64)
    x = P.prox_24(y, 1e-20, backend=backend)
    assert x[0, 3] == 0 and torch.equal(x[0, :3], y[0, :3])
    v = P.objective_24(x, y, 1e-20).item()
    assert v <= P.objective_24(y, y, 1e-20).item() and v <= 0.5e-50 + 1e-20 * 1.0 + 1e-30


def test_half_precision_inputs():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(8, 32, generator=g)
    for dt in [torch.bfloat16, torch.float16]:
        x = P.prox_24(W.to(dt), 3.0)
        assert x.dtype == dt and x.shape == W.shape
        ref = P.prox_24(W.to(dt).float(), 3.0).to(dt)
        assert torch.equal(x, ref)


@pytest.mark.skipif(not P.kernel_available(), reason="no compiled kernel")
def test_kernel_threads_and_fallback(monkeypatch):
    g = torch.Generator().manual_seed(8)
    W = torch.randn(512, 256, generator=g)  # 32768 groups: more than one chunk per thread
    x1 = P.prox_24(W, 10.0, num_threads=1)
    x2 = P.prox_24(W, 10.0, num_threads=3)
    assert torch.equal(x1, x2)
    lam = torch.rand(512, 64, generator=g) * 20
    monkeypatch.setitem(P._kernel_meta, "openmp", False)  # the Python-threads split of a kernel without OpenMP
    assert torch.equal(P.prox_24(W, 10.0, num_threads=3), x1)
    assert torch.equal(P.prox_24(W, lam, num_threads=3), P.prox_24(W, lam, num_threads=1))
    monkeypatch.setattr(P, "_kernel", False)
    assert not P.kernel_available()
    torch.testing.assert_close(P.prox_24(W, 10.0), x1, rtol=0, atol=1e-7)
    with pytest.raises(RuntimeError):
        P.prox_24(W, 10.0, backend="kernel")


@settings(max_examples=60, deadline=None)
@given(w=weights(max_rows=6, max_groups=4, m=4), lam=st.floats(0.0, 1e3, allow_nan=False),
       lead=st.integers(0, 2), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_prox_24_shapes_and_properties(w, lam, lead, dtype):
    W = w.to(dtype).reshape(*([1] * lead), *w.shape)
    scale = float(W.abs().max()) if W.numel() else 1.0
    lam_s = lam / scale if scale > 0 else lam
    x = P.prox_24(W, lam_s)
    assert x.shape == W.shape and x.dtype == W.dtype
    assert bool(((x == 0) | (torch.sign(x) == torch.sign(W))).all())
    assert bool((x.abs() <= W.abs()).all())
    xt = P.prox_24(W, lam_s, backend="torch")
    ok, ot = P.objective_24(x, W, lam_s), P.objective_24(xt, W, lam_s)
    assert bool(((ok - ot).abs() <= 1e-9 * max(scale, 1e-300) ** 2 + 1e-300).all())
    big = P.prox_24(W, 1e6 / max(scale, 1e-300))
    assert bool((P.reg_24(big) == 0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu():
    y, lam = random_groups(2000, seed=9)
    Y = torch.tensor(y, dtype=torch.float32).reshape(50, 160)
    L = torch.tensor(lam, dtype=torch.float32).reshape(50, 40)
    xc = P.prox_24(Y.cuda(), L.cuda())
    assert xc.device.type == "cuda"
    xk = P.prox_24(Y, L)
    oc = P.objective_24(xc.cpu(), Y, L)
    ok = P.objective_24(xk, Y, L)
    scale = Y.double().reshape(50, 40, 4).abs().amax(-1).clamp_min(1e-300) ** 2
    assert ((oc - ok).abs() / scale).max().item() <= 1e-9


# ---------------------------------------------------------------------------------------------------
# frozen-weight regularizer


@pytest.mark.parametrize("chunk", [7, 1 << 17])
def test_chunked_in_place_frozen_gradient_equals_the_formula(chunk):
    g = torch.Generator().manual_seed(11)
    W0 = torch.randn(37, 24, generator=g, dtype=torch.float64) * 0.2
    W0[0, :5] = 0.0  # sign(0) counts as +1
    W = W0 + torch.randn(37, 24, generator=g, dtype=torch.float64) * 0.05
    G = torch.randn(37, 24, generator=g, dtype=torch.float64)
    want = G + 0.3 * P.reg_frozen_grad(W, W0, 0.2)
    out = P.add_reg_frozen_grad_(G, W, W0, 0.3, 0.2, chunk=chunk)
    assert out is G
    torch.testing.assert_close(G, want, rtol=1e-12, atol=1e-14)
    Gt = torch.zeros(24, 37, dtype=torch.float64)  # a transposed (non-contiguous) view takes the plain path
    P.add_reg_frozen_grad_(Gt.t(), W, W0, 0.3, 0.2, chunk=chunk)
    torch.testing.assert_close(Gt.t(), 0.3 * P.reg_frozen_grad(W, W0, 0.2), rtol=1e-12, atol=1e-14)


def test_frozen_regularizer_gradient_and_prox():
    g = torch.Generator().manual_seed(10)
    W0 = torch.randn(100, generator=g, dtype=torch.float64) * 0.5
    W0[:10] = 0.0
    V = W0 + torch.randn(100, generator=g, dtype=torch.float64) * 0.3
    V[10:20] = 0.0
    W = V.clone().requires_grad_(True)
    P.reg_frozen(W, W0).backward()
    torch.testing.assert_close(W.grad, P.reg_frozen_grad(V, W0))
    assert P.reg_frozen(torch.where(V.abs() > 0.2, W0, torch.zeros_like(W0)), W0).item() == 0.0
    c = (W0 + 0.1 * torch.where(W0 >= 0, 1.0, -1.0)) ** -2
    grid = torch.linspace(-3, 3, 20001, dtype=torch.float64)
    for lam in [0.0, 0.01, 0.3, 5.0, 200.0, 1e9]:
        x = P.prox_frozen(V, W0, lam)
        f = lambda w: 0.5 * (w - V[:, None]) ** 2 + lam * c[:, None] * (w * (w - W0[:, None])) ** 2  # noqa: E731
        fx = f(x[:, None])[:, 0]
        fgrid = f(grid[None, :]).min(1).values  # >= the true minimum
        assert (fx - fgrid).max().item() <= 1e-12
        # stationarity at the returned point
        gx = (x - V) + lam * P.reg_frozen_grad(x, W0)
        assert (gx.abs() / (1 + lam * c)).max().item() <= 1e-9
    assert torch.equal(P.prox_frozen(V, W0, 0.0), V)
    # huge lambda: each weight goes (nearly) to 0 or to its original value
    x = P.prox_frozen(V, W0, 1e9)
    assert (x * (x - W0)).abs().max().item() < 1e-3
    # per-element lambda
    lam_t = torch.rand(100, generator=g, dtype=torch.float64)
    xt = P.prox_frozen(V, W0, lam_t)
    for i in [0, 15, 90]:
        torch.testing.assert_close(xt[i:i + 1], P.prox_frozen(V[i:i + 1], W0[i:i + 1], float(lam_t[i])))
