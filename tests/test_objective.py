import numpy as np
import pytest
import torch

from minisparse.objective import dampen, gram, layer_error, reconstruct, relative_error
from minisparse.patterns import parse_pattern, topk_mask


def _problem(d_out=5, d_in=8, tokens=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    return W, X


def test_error_depends_on_x_only_through_gram():
    W, X = _problem()
    What = W * (torch.rand_like(W) > 0.5)
    direct = float(((X @ W.T - X @ What.T) ** 2).sum())
    G = gram(X, torch.float64)
    assert layer_error(W, What, G) == pytest.approx(direct, rel=1e-10)
    assert relative_error(W, What, G) == pytest.approx(direct / float(((X @ W.T) ** 2).sum()), rel=1e-10)
    assert relative_error(W, W, G) == 0.0


def test_reconstruct_matches_cvxpy_least_squares():
    cp = pytest.importorskip("cvxpy")
    W, X = _problem(seed=1)
    G = gram(X, torch.float64)
    mask = topk_mask(W.abs(), parse_pattern("row", 0.5))
    ours = reconstruct(W, mask, G)
    for i in range(W.shape[0]):
        keep = np.flatnonzero(mask[i].numpy())
        v = cp.Variable(len(keep))
        target = X.numpy() @ W[i].numpy()
        cp.Problem(cp.Minimize(cp.sum_squares(X.numpy()[:, keep] @ v - target))).solve(solver="CLARABEL")
        np.testing.assert_allclose(ours[i].numpy()[keep], v.value, rtol=1e-5, atol=1e-6)
    assert torch.all(ours[~mask] == 0)
    # the optimum beats simply masking
    assert layer_error(W, ours, G) < layer_error(W, W * mask, G)


def test_reconstruct_handles_unequal_rows_and_ridge():
    W, X = _problem(d_out=6, d_in=8, tokens=5, seed=2)  # fewer tokens than inputs: G is singular
    G = gram(X, torch.float64)
    mask = topk_mask(W.abs(), parse_pattern("unstructured", 0.4))
    out = reconstruct(W, mask, G, damp=0.01)
    assert torch.isfinite(out).all() and torch.all(out[~mask] == 0)
    Gd = dampen(G, 0.01)
    assert torch.allclose(torch.diagonal(Gd) - torch.diagonal(G), torch.full((8,), 0.01 * float(torch.diagonal(G).mean()), dtype=torch.float64))


def test_reconstruct_large_batches_agree_with_row_by_row():
    """Batched solves of 288x288 systems (the size of a real 50% layer) equal one-row-at-a-time solves."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2000, 576, generator=g, dtype=torch.float64)
    G = X.T @ X
    W = torch.randn(200, 576, generator=g, dtype=torch.float64)
    mask = topk_mask(W.abs(), parse_pattern("row", 0.5))
    batched = reconstruct(W, mask, G)
    single = reconstruct(W, mask, G, chunk=1)
    torch.testing.assert_close(batched, single, rtol=1e-8, atol=1e-10)


def test_solve_spd_treats_a_system_singular_to_working_precision_as_singular():
    # 1 + 2 ulp: Cholesky succeeds on every CPU (pivot 4.4e-16 > 0), but the matrix is singular to working
    # precision; a plain solve returns entries of size 1e15, the minimum-norm solution splits b evenly
    from minisparse.objective import _solve_spd

    one = torch.tensor(1.0, dtype=torch.float64)
    A = torch.stack([torch.stack([one, one]), torch.stack([one, one + 2 * torch.finfo(torch.float64).eps])])
    assert torch.linalg.cholesky_ex(A).info == 0
    x = _solve_spd(A.unsqueeze(0), torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(x, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    # a well-conditioned system in the same batch is still solved exactly by Cholesky
    B = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    y = _solve_spd(torch.stack([A, B]), torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(y[1], torch.linalg.solve(B, torch.tensor([1.0, 2.0], dtype=torch.float64)))
    torch.testing.assert_close(y[0], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_reconstruct_singular_block_gives_minimum_norm_solution():
    # two identical inputs: G_SS is singular when both are kept; the weight is split evenly
    X = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 1.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    G = gram(X, torch.float64)
    W = torch.tensor([[1.0, 3.0, 0.2]], dtype=torch.float64)
    out = reconstruct(W, torch.tensor([[True, True, False]]), G)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0], out[0, 1])
    assert layer_error(W, out, G) <= layer_error(W, W * torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64), G) + 1e-9
