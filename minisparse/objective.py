"""The layer-wise objective ||W X - Ŵ X||_F² and what is derived from it, all through G = X Xᵀ.

For a weight W (d_out, d_in) and inputs X (d_in, tokens),
``||W X - Ŵ X||_F² = tr((W - Ŵ) G (W - Ŵ)ᵀ)`` with ``G = X Xᵀ``: X enters only through G.
"""
from __future__ import annotations

import torch

__all__ = ["gram", "layer_error", "relative_error", "reconstruct", "dampen"]


def gram(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G = X Xᵀ for inputs given as rows (..., d_in), the layout of activations in a model."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    return x.T @ x


def layer_error(weight: torch.Tensor, new_weight: torch.Tensor, G: torch.Tensor) -> float:
    """tr((W - Ŵ) G (W - Ŵ)ᵀ) = ||W X - Ŵ X||_F², computed in float64."""
    d = (weight.double() - new_weight.double())
    return float(((d @ G.double()) * d).sum())


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, G: torch.Tensor) -> float:
    """||W X - Ŵ X||_F² / ||W X||_F² (0 for an unchanged layer, 1 for an all-zero one)."""
    w = weight.double()
    ref = float(((w @ G.double()) * w).sum())
    if ref == 0.0:
        return 0.0
    return layer_error(weight, new_weight, G) / ref


def dampen(G: torch.Tensor, damp: float) -> torch.Tensor:
    """G + damp * mean(diag G) * I, the ridge that SparseGPT adds to keep G invertible."""
    if damp <= 0:
        return G
    mean_diag = torch.diagonal(G).mean()
    if mean_diag <= 0:
        mean_diag = torch.ones((), dtype=G.dtype, device=G.device)
    return G + damp * mean_diag * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def _solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a batch of symmetric positive (semi)definite systems A x = b.

    Cholesky where it succeeds; a least-squares (minimum-norm) solve for the singular ones. Cholesky
    also sidesteps batched LU (torch.linalg.solve), which fails intermittently on large CPU batches
    with several threads (pytorch/pytorch#142815).
    """
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    # a singular A can still "succeed": rounding may leave a tiny positive pivot instead of a zero or
    # negative one (whether it does depends on the CPU's BLAS kernels), and the solve then returns
    # garbage of size 1/pivot. A pivot that keeps less than ~100 k eps of its diagonal entry is singular to
    # working precision, so those systems get the minimum-norm solution too.
    k = A.shape[-1]
    pivots = torch.diagonal(L, dim1=-2, dim2=-1) ** 2
    diag = torch.diagonal(A, dim1=-2, dim2=-1).clamp_min(torch.finfo(A.dtype).tiny)
    tiny = (pivots <= 100 * k * torch.finfo(A.dtype).eps * diag).any(dim=-1)
    bad = (info != 0) | tiny
    if bad.any():
        x[bad] = torch.linalg.lstsq(A[bad], b[bad].unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    return x


def reconstruct(weight: torch.Tensor, mask: torch.Tensor, G: torch.Tensor, damp: float = 0.0,
                chunk: int = 256) -> torch.Tensor:
    """Optimal kept weights for a fixed mask: each row solves min ||(w - ŵ) X||² with ŵ = 0 off the mask.

    The solution on the kept set S is ŵ_S = G_SS⁻¹ G_S,: w (normal equations), with an optional ridge
    ``damp`` (fraction of mean diag G); where G_SS is singular the minimum-norm solution is taken.
    Solved in float64, rows batched when they keep the same number of weights (at most ``chunk`` rows
    and about 256 MiB of systems per batch).
    """
    mask = mask.bool()
    Gd = dampen(G.double(), damp)
    W = weight.double()
    out = torch.zeros_like(W)
    rhs_all = W @ Gd  # row i: (G w_i)ᵀ, since G is symmetric
    counts = mask.sum(dim=1)
    for k in torch.unique(counts).tolist():
        if k == 0:
            continue
        rows = torch.nonzero(counts == k).flatten()
        # at most ``chunk`` rows and about 256 MiB of gathered k x k systems at a time (k is 5504 for a
        # 2:4 down_proj of a 7B model: 256 rows at once would be 62 GB)
        step = max(1, min(chunk, (1 << 28) // (8 * k * k)))
        for start in range(0, rows.numel(), step):
            r = rows[start:start + step]
            idx = torch.nonzero(mask[r])[:, 1].reshape(len(r), k)  # kept columns, per row
            Gss = Gd[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (rows, k, k)
            rhs = torch.gather(rhs_all[r], 1, idx)
            out[r.unsqueeze(1), idx] = _solve_spd(Gss, rhs)
    return out.to(weight.dtype)
