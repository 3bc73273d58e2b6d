"""Greedy single-weight pruning as pure functions of (W, G, pattern): magnitude, Wanda, RIA, SparseGPT.

Every solver here takes a weight W (d_out, d_in), the Gram matrix G = X Xᵀ (d_in, d_in) of the layer's
calibration inputs (a *sum* over tokens; any positive global scale gives the same masks) and a
:class:`~minisparse.patterns.Pattern`, and returns a :class:`~minisparse.methods.SolverResult` whose
mask satisfies the pattern exactly (``patterns.is_feasible``) and whose weight is exactly 0 off the mask.

Section 2.1 of the SparseFW paper reads all of them as greedy single-weight pruning of the row-wise
objective ``||(w - ŵ) X||²``:

- *magnitude* removes the weight with the smallest |w_q| (ignores X);
- *Wanda* removes the weight whose removal alone costs least, ``w_q² G_qq``, i.e. the smallest
  ``|w_q| ||X_q||``, without touching the others, so the scores never change and one sort suffices;
- *RIA* is Wanda on a row- and column-renormalised weight, with the activation norm raised to a power;
- *SparseGPT* removes a weight *and* reconstructs the remaining ones optimally (Optimal Brain Surgeon):
  ``w ← w - w_q / [G⁻¹]_qq · G⁻¹ e_q``, processed column by column through the upper Cholesky factor
  of G⁻¹ with lazy block updates.

Ties are broken deterministically, as in :func:`~minisparse.patterns.topk_mask`: among equal scores
the weight with the lower index is kept.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from .methods import SolverResult, register
from .patterns import Pattern, num_pruned, parse_pattern, topk_mask

__all__ = ["magnitude", "wanda", "wanda_score", "ria", "ria_score", "sparsegpt"]


@register("magnitude", description="keep the largest |W| (ignores the inputs)")
def magnitude(weight: torch.Tensor, G: torch.Tensor | None, pattern: Pattern) -> SolverResult:
    """Magnitude pruning: keep the largest |W_ij| allowed by the pattern. G is not used."""
    mask = topk_mask(weight.abs(), pattern)
    return SolverResult(weight * mask, mask)


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def _check_inputs(weight: torch.Tensor, G: torch.Tensor | None, pattern: Pattern | str) -> Pattern:
    """Validate shapes and finiteness; return the parsed pattern."""
    pattern = parse_pattern(pattern)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"the weight must be a 2-D tensor (d_out, d_in); got {shape}")
    pattern.check_shape(tuple(weight.shape))
    if not weight.is_floating_point():
        raise ValueError(f"the weight must be a floating-point tensor; got dtype {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("the weight contains NaN or inf; cannot prune a non-finite layer")
    if G is None:
        raise ValueError("this method needs the Gram matrix G = X Xᵀ of the calibration inputs; got None")
    d_in = weight.shape[1]
    if G.dim() != 2 or tuple(G.shape) != (d_in, d_in):
        raise ValueError(
            f"G must be the (d_in, d_in) = ({d_in}, {d_in}) Gram matrix of the layer's inputs; "
            f"got shape {tuple(G.shape)}"
        )
    if not bool(torch.isfinite(G).all()):
        raise ValueError("the Gram matrix G contains NaN or inf; check the calibration activations")
    return pattern


def _check_per(per: str) -> str:
    key = str(per).strip().lower()
    if key not in ("row", "matrix"):
        raise ValueError(f"per must be 'row' or 'matrix'; got {per!r}")
    return key


def _gram_diag(G: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """diag G = ||X_j||² as ``dtype`` on ``device``; a negative entry means G is no Gram matrix."""
    diag = torch.diagonal(G).to(device=device, dtype=dtype)
    if bool((diag < 0).any()):
        raise ValueError(
            "the Gram matrix G has negative diagonal entries; G = X Xᵀ must have diag G = ||X_j||² >= 0"
        )
    return diag


def _score_dtype(t: torch.Tensor) -> torch.dtype:
    # Scores in float64: |W|·norm and W²·G_jj of float32 inputs neither overflow nor underflow there,
    # and W² is exact. MPS has no float64.
    return torch.float32 if t.device.type == "mps" else torch.float64


def _keep_top(score: torch.Tensor, keep: torch.Tensor | int) -> torch.Tensor:
    """Mask keeping the ``keep`` largest entries of each row of a 2-D score (``keep`` int or per row).

    Stable: among equal scores the lower column index is kept.
    """
    rows, cols = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    if isinstance(keep, int):
        keep = torch.full((rows,), keep, device=score.device)
    ranks = torch.arange(cols, device=score.device).expand(rows, cols)
    keep_sorted = ranks < keep.to(score.device).reshape(-1, 1)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    mask.scatter_(1, order, keep_sorted)
    return mask


def _balanced_row_mask(score: torch.Tensor, total_pruned: int) -> torch.Tensor:
    """Prune exactly ``total_pruned`` weights, spread as evenly as possible over the rows.

    Every row prunes ``total_pruned // d_out`` of its lowest scores; the remaining
    ``total_pruned % d_out`` prunes go to the rows whose next candidate has the lowest score (ties:
    the lower row index). When ``total_pruned`` is a multiple of d_out this is the row pattern.
    """
    d_out, d_in = score.shape
    base, extra = divmod(total_pruned, d_out)
    pruned = torch.full((d_out,), base, dtype=torch.long, device=score.device)
    if extra:
        ascending = torch.sort(score, dim=1, stable=True, descending=False).values
        # stable: among rows whose next candidate scores the same, the lower row index prunes it
        nxt = ascending[:, base]
        rows = torch.sort(nxt, stable=True).indices[:extra]
        pruned[rows] += 1
    return _keep_top(score, d_in - pruned)


def _mask_from_score(score: torch.Tensor, pattern: Pattern, per: str) -> torch.Tensor:
    if pattern.kind == "unstructured" and per == "row":
        return _balanced_row_mask(score, num_pruned(pattern, tuple(score.shape)))
    return topk_mask(score, pattern)


# ----------------------------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------------------------

def wanda_score(weight: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Wanda's saliency ``S_ij = |W_ij| · ||X_j||`` with ``||X_j|| = sqrt(G_jj)``, in float64.

    Equivalently (paper, eq. 5) the square root of ``W_ij² G_jj``, the error of removing W_ij alone.
    """
    dtype = _score_dtype(weight)
    norms = _gram_diag(G, dtype, weight.device).sqrt()
    return weight.abs().to(dtype) * norms.reshape(1, -1)


def _wanda_key(weight: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``W_ij² G_jj``, the square of :func:`wanda_score` and the ranking Wanda's masks use.

    Same order as ``|W_ij| sqrt(G_jj)`` but free of the square root, whose vectorised CPU kernels are
    not always correctly rounded: for float32 inputs the float64 product is exactly rounded, so equal
    scores in exact arithmetic stay equal and ties are broken by index as documented.
    """
    dtype = _score_dtype(weight)
    A = weight.to(dtype)
    return (A * A) * _gram_diag(G, dtype, weight.device).reshape(1, -1)


@register("wanda", description="keep the largest |W_ij|·||X_j|| (Wanda), per output row by default")
def wanda(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, per: str = "row") -> SolverResult:
    """Wanda: keep the largest ``|W_ij| ||X_j||``; no reconstruction.

    With an unstructured pattern Wanda compares scores within each output row (``per="row"``, the
    default, as in the Wanda paper): every row prunes ``round(sparsity * d_out * d_in) // d_out`` weights
    and the few left over (when the total is not a multiple of d_out) go to the rows whose next weight
    scores lowest, so the matrix sparsity is exact; when ``sparsity * d_in`` is an integer this is the
    row pattern. ``per="matrix"`` compares scores over the whole matrix. Row and N:M patterns decide
    the grouping themselves and ignore ``per``. The masks rank ``W_ij² G_jj``, the square of the score
    (the same order, computed without a square root so that ties are exact).
    """
    pattern = _check_inputs(weight, G, pattern)
    per = _check_per(per)
    mask = _mask_from_score(_wanda_key(weight, G), pattern, per)
    return SolverResult(torch.where(mask, weight, torch.zeros_like(weight)), mask,
                        {"per": per if pattern.kind == "unstructured" else pattern.kind})


# ----------------------------------------------------------------------------------------------
# RIA
# ----------------------------------------------------------------------------------------------

def ria_score(weight: torch.Tensor, G: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA's relative importance ``(|W_ij|/Σ_k|W_ik| + |W_ij|/Σ_k|W_kj|) · ||X_j||^a``, in float64.

    A row or column of zeros contributes 0 (instead of 0/0). ``a = 0.5`` is RIA's default.
    """
    dtype = _score_dtype(weight)
    A = weight.abs().to(dtype)
    row_sum = A.sum(dim=1, keepdim=True)
    col_sum = A.sum(dim=0, keepdim=True)
    zero = torch.zeros((), dtype=dtype, device=A.device)
    rel = torch.where(row_sum > 0, A / row_sum, zero) + torch.where(col_sum > 0, A / col_sum, zero)
    norms = _gram_diag(G, dtype, weight.device).sqrt()
    return rel * norms.pow(float(a)).reshape(1, -1)


@register("ria", description="keep the largest relative importance (RIA), per matrix by default")
def ria(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, a: float = 0.5,
        per: str = "matrix") -> SolverResult:
    """RIA (relative importance and activations): Wanda's greedy rule on a row/column-renormalised W.

    ``per="matrix"`` (default) compares scores over the whole matrix for an unstructured pattern;
    ``per="row"`` compares within each output row (as :func:`wanda` does). Row and N:M patterns decide
    the grouping themselves. No reconstruction.
    """
    pattern = _check_inputs(weight, G, pattern)
    per = _check_per(per)
    a = float(a)
    if a != a or abs(a) == float("inf"):
        raise ValueError(f"the activation exponent a must be a finite number; got {a!r}")
    score = ria_score(weight, G, a)
    mask = _mask_from_score(score, pattern, per)
    return SolverResult(torch.where(mask, weight, torch.zeros_like(weight)), mask,
                        {"per": per if pattern.kind == "unstructured" else pattern.kind, "a": a})


# ----------------------------------------------------------------------------------------------
# SparseGPT
# ----------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64; got {dtype}")
        return dtype
    key = str(dtype).strip().lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64'; got {dtype!r}")
    return _DTYPES[key]


def _inverse_cholesky_upper(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper U with Uᵀ U = (H + damp·mean(diag H)·I)⁻¹, or None if a factorisation fails."""
    mean_diag = torch.diagonal(H).mean()
    if not bool(mean_diag > 0):
        mean_diag = torch.ones((), dtype=H.dtype, device=H.device)
    Hd = H.clone()
    Hd.diagonal().add_(damp * mean_diag)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()) or not bool((torch.diagonal(U) > 0).all()):
        return None
    return U


def _split(total: int, ends: list[int], width: int) -> list[int]:
    """Split ``total`` over consecutive column blocks ending at ``ends`` in proportion to their widths.

    Block b gets ``floor(total·end_b/width) - floor(total·end_{b-1}/width)``: the parts sum to
    ``total`` exactly and none exceeds ``ceil(total·count_b/width)``.
    """
    parts, prev = [], 0
    for end in ends:
        cur = (total * end) // width
        parts.append(cur - prev)
        prev = cur
    return parts


@contextmanager
def _single_thread(device: torch.device):
    """Run the column loop of SparseGPT on one CPU thread.

    The loop issues thousands of tiny ops (one outer product per column); with several threads each op
    pays a synchronisation, and on a busy machine a descheduled thread makes every one of them wait:
    measured on a 576x1536 layer, 1.9 s on one thread against 21 s on two with another job running.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sparsegpt_columns(W1, Q1, Err1, U1, d1, keep1, pattern, count) -> None:
    """Prune and update the columns of one block in place (OBS step per column)."""
    for i in range(count):
        if pattern.kind == "nm" and i % pattern.m == 0:
            seg = W1[:, i:i + pattern.m].abs() / d1[i:i + pattern.m].reshape(1, -1)
            keep1[:, i:i + pattern.m] = _keep_top(seg, pattern.n)
        w = W1[:, i]
        q = torch.where(keep1[:, i], w, torch.zeros_like(w))
        Q1[:, i] = q
        err = (w - q) / U1[i, i]
        W1[:, i:].sub_(torch.outer(err, U1[i, i:]))
        Err1[:, i] = err


def _sparsegpt_pass(W: torch.Tensor, U: torch.Tensor, pattern: Pattern, blocksize: int,
                    block_quota: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One blocked OBS sweep over the columns; returns (pruned and reconstructed W, mask, error estimate)."""
    d_out, d_in = W.shape
    W = W.clone()
    mask = torch.ones(d_out, d_in, dtype=torch.bool, device=W.device)
    error = torch.zeros((), dtype=W.dtype, device=W.device)
    for b, i1 in enumerate(range(0, d_in, blocksize)):
        i2 = min(i1 + blocksize, d_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        # OBS saliency of pruning W_ij with the columns before j frozen: w_ij² / [U]_jj²; |w|/U_jj
        # orders the same and cannot overflow.
        if pattern.kind == "unstructured":
            score = (W1.abs() / d1.reshape(1, -1)).reshape(1, -1)
            keep1 = _keep_top(score, count * d_out - block_quota[b]).reshape(d_out, count)
        elif pattern.kind == "row":
            keep1 = _keep_top(W1.abs() / d1.reshape(1, -1), count - block_quota[b])
        else:
            keep1 = torch.ones(d_out, count, dtype=torch.bool, device=W.device)
        with _single_thread(W.device):
            _sparsegpt_columns(W1, Q1, Err1, U1, d1, keep1, pattern, count)
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        error = error + (Err1 * Err1).sum()
        if i2 < d_in:
            W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    return W, mask, float(error)


@register("sparsegpt", description="blocked OBS: greedy mask + reconstruction of the kept weights (SparseGPT)")
def sparsegpt(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, damp: float = 0.01,
              blocksize: int = 128, dtype: torch.dtype | str = torch.float32,
              max_retries: int = 5) -> SolverResult:
    """SparseGPT (Frantar & Alistarh, 2023): greedy OBS pruning with reconstruction, column by column.

    With ``H = G + damp·mean(diag G)·I`` and ``Uᵀ U = H⁻¹`` (U upper), columns are processed left to
    right in blocks of ``blocksize``. Pruning W_ij (the columns before j already fixed) costs
    ``W_ij² / U_jj²`` and the optimal update of the later columns of row i is
    ``-(W_ij / U_jj) · U_{j, j:}``; updates inside a block are applied column by column, those to the
    columns after the block once per block (lazy batch updates). For the first column this is the
    classical OBS step ``w - w_q / [H⁻¹]_qq · H⁻¹ e_q``.

    The mask:

    - *unstructured*: chosen per block over all rows, as SparseGPT does, by the scores of the block's
      current (already updated) weights. SparseGPT prunes ``sparsity·count·d_out`` weights (plus one
      more, since it prunes every score <= the threshold) in each block; here the exact total
      ``num_pruned`` is split over the blocks in proportion to their widths
      (``floor(P·end_b/d_in) - floor(P·end_{b-1}/d_in)``), so the matrix prunes exactly
      ``round(sparsity·d_out·d_in)`` weights.
    - *row*: per row within each block; each row's ``round(sparsity·d_in)`` is split over the blocks
      in the same way, so every row prunes exactly its share.
    - *N:M*: on the fly every M columns (``blocksize`` is rounded down to a multiple of M).

    Inputs with ``G_jj == 0`` (dead: X_j = 0 on all calibration tokens) get ``H_jj = 1`` and their
    weight column is set to 0, which leaves ``W X`` unchanged, as in the reference implementation.
    If a Cholesky factorisation fails (G not positive definite enough in ``dtype``) the damping is
    multiplied by 10 and the factorisation retried, up to ``max_retries`` times (from 1e-4 when
    ``damp == 0``); ``stats`` records the final ``damp`` and ``cholesky_retries``. A ValueError is
    raised if it still fails. Computed in ``dtype`` (float32 or float64) on the device of ``weight``.

    ``stats["error_estimate"]`` is Σ (w_ij - q_ij)² / U_jj² over all pruned weights, the layer error
    ``tr(ΔW H ΔWᵀ)`` under the damped H.
    """
    pattern = _check_inputs(weight, G, pattern)
    dtype = _resolve_dtype(dtype)
    damp = float(damp)
    if not (damp >= 0.0) or damp == float("inf"):
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of mean diag G); got {damp!r}")
    blocksize = int(blocksize)
    if blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer; got {blocksize}")
    if pattern.kind == "nm":
        blocksize = max(pattern.m, (blocksize // pattern.m) * pattern.m)
    max_retries = int(max_retries)
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0; got {max_retries}")

    d_out, d_in = weight.shape
    total = num_pruned(pattern, (d_out, d_in))
    stats: dict[str, Any] = {"damp_requested": damp, "damp": damp, "cholesky_retries": 0,
                             "blocksize": blocksize, "dtype": str(dtype).replace("torch.", "")}
    if total == 0:
        mask = torch.ones(d_out, d_in, dtype=torch.bool, device=weight.device)
        stats.update(dead_inputs=0, error_estimate=0.0)
        return SolverResult(weight.clone(), mask, stats)

    W = weight.to(dtype).clone()
    H = G.to(device=weight.device, dtype=dtype).clone()
    dead = torch.diagonal(H) == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    stats["dead_inputs"] = int(dead.sum())

    ends = [min(i1 + blocksize, d_in) for i1 in range(0, d_in, blocksize)]
    if pattern.kind == "unstructured":
        quota = _split(total, ends, d_in)
    elif pattern.kind == "row":
        quota = _split(total // d_out, ends, d_in)
    else:
        quota = []

    cur = damp
    for attempt in range(max_retries + 1):
        U = _inverse_cholesky_upper(H, cur)
        if U is not None:
            out, mask, err = _sparsegpt_pass(W, U, pattern, blocksize, quota)
            if bool(torch.isfinite(out).all()):
                stats.update(damp=cur, cholesky_retries=attempt, error_estimate=err)
                new = torch.where(mask, out, torch.zeros_like(out)).to(weight.dtype)
                return SolverResult(new, mask, stats)
        if attempt < max_retries:
            cur = cur * 10.0 if cur > 0 else 1e-4
    raise ValueError(
        f"SparseGPT: the Cholesky factorisation of the damped Gram matrix failed (or gave non-finite "
        f"weights) even with damp={cur:g} after {max_retries} retries; G is far from positive "
        f"semi-definite or badly scaled for {stats['dtype']} (try dtype='float64' or a larger damp)"
    )
