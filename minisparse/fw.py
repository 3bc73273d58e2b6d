"""SparseFW: Frank-Wolfe on the convex relaxation of layer-wise mask selection.

The layer-wise problem ``min_M ||W X - (M ⊙ W) X||²`` over binary masks M allowed by a pattern is
relaxed to the convex hull of those masks (for k kept weights in a group: ``{M ∈ [0,1], Σ M <= k}``),
a convex quadratic program in M. With ``G = X Xᵀ`` and ``E(M) = W ⊙ (1 - M)`` the objective and its
gradient are

    f(M) = <E(M), E(M) G>,        ∇f(M) = -2 W ⊙ (E(M) G),

so X enters only through G (Roux et al., "Don't be greedy, just relax!", Algorithm 1). Every iteration
calls the linear minimisation oracle (LMO) of the constraint set, which keeps, in each group, the
``k`` entries with the most negative gradient (only negative ones), and moves towards that vertex V:
``M ← M + η (V - M)`` with ``η = 2/(t+2)`` or the exact line search (f is quadratic along V - M).
At the end M is rounded to the top-k entries of each group.

*alpha-fixing* (Algorithm 2 of the paper): the ``floor(alpha·k)`` weights of highest warm-start
saliency (Wanda or RIA) among those the warm start keeps are fixed to 1 and Frank-Wolfe runs on the
others with the remaining budget. ``alpha = 1`` returns the warm start itself.

Cost. Besides the three G-sized products at the start, an iteration needs ``(W ⊙ V) G``. Consecutive
LMO vertices differ in few entries, so that product is kept up to date from the *changed* entries
(a sparse-dense product) and recomputed exactly every ``refresh`` iterations; the iterate's product
``(W ⊙ M) G`` is the same convex combination as M itself. An iteration then costs a few elementwise
passes, one selection and a sparse product, instead of a dense (d_out, d_in) @ (d_in, d_in) product.

Certificates. FW gives a duality gap for free: ``g_t = <∇f(M_t), M_t - V_t> >= f(M_t) - f*``, so
``max_t (f(M_t) - g_t)`` is a lower bound on the relaxed optimum and hence on the best *binary* mask
(of the free coordinates, given the fixed ones). ``stats`` reports it beside the rounded objective,
so every matrix carries a bound on how far its mask can be from optimal.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from .greedy import _check_inputs, _wanda_key, ria, ria_score, wanda
from .methods import SolverResult, register
from .patterns import Pattern, group_rank, num_pruned

__all__ = ["sparsefw", "fw_objective", "lmo", "round_mask", "group_view", "group_budget"]

_WARM = ("wanda", "ria", "magnitude")
_STEPS = ("fw", "line")


# ----------------------------------------------------------------------------------------------
# groups: every pattern is "keep k_g entries in each group g" on a reshaped view of the matrix
# ----------------------------------------------------------------------------------------------

def group_view(pattern: Pattern, shape: tuple[int, int]) -> tuple[int, int]:
    """Shape (groups, group size) of the row-major view in which the pattern is one budget per row.

    unstructured: one group (the whole matrix); row: one group per output row; N:M: one group per
    M consecutive weights of a row.
    """
    d_out, d_in = shape
    if pattern.kind == "unstructured":
        return 1, d_out * d_in
    if pattern.kind == "row":
        return d_out, d_in
    return d_out * d_in // pattern.m, pattern.m


def group_budget(pattern: Pattern, shape: tuple[int, int]) -> int:
    """Weights kept per group (the same for every group of the pattern)."""
    d_out, d_in = shape
    if pattern.kind == "unstructured":
        return d_out * d_in - num_pruned(pattern, shape)
    if pattern.kind == "row":
        return d_in - int(round(pattern.sparsity * d_in))
    return pattern.n


def _top_flat(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor (any k of them where values tie).

    A large vector is not fully selected: the quantile of a strided sample gives a threshold that k
    plus a safety margin of entries exceed; topk runs on those candidates only. Falls back to a full
    topk when the sample's threshold misses.
    """
    n = x.numel()
    out = torch.zeros(n, dtype=torch.bool, device=x.device)
    if k <= 0:
        return out
    if k >= n:
        return ~out
    if n < (1 << 16):
        out[torch.topk(x, k, sorted=False).indices] = True
        return out
    stride = max(1, n // 4096)
    sample = x[::stride]
    s = sample.numel()
    pos = k * s / n
    margin = 8.0 * math.sqrt(pos * (1 - k / n)) + 16
    rank = min(s - 1, int(pos + margin))
    lo = torch.kthvalue(sample, s - rank).values  # about rank+1 sample entries are >= lo
    cand = (x >= lo).nonzero().squeeze(1) if bool(torch.isfinite(lo)) else None
    if cand is not None and k <= cand.numel() <= max(2 * k, k + n // 8):
        vals = x[cand]
        if cand.numel() == k:
            out[cand] = True
        else:
            out[cand[torch.topk(vals, k, sorted=False).indices]] = True
        return out
    out[torch.topk(x, k, sorted=False).indices] = True
    return out


def lmo(score: torch.Tensor, allowed: torch.Tensor | None, budget: torch.Tensor) -> torch.Tensor:
    """The LMO of ``{M ∈ [0,1]: M = 0 off ``allowed``, Σ_group M <= budget}`` for ``-score`` as gradient.

    ``score``, ``allowed`` have the grouped shape (groups, size); ``budget`` is (groups,) long. In each
    group the at most ``budget`` allowed entries with the largest *positive* score are set to 1: the
    vertex minimising ``<-score, V>``. Returns a bool tensor of the grouped shape. ``allowed=None``
    allows every entry (a caller can exclude entries more cheaply by giving them a score <= 0).
    """
    groups, size = score.shape
    if groups == 1:
        k = int(budget[0])
        x = score.reshape(-1)
        if allowed is not None:
            x = x.masked_fill(~allowed.reshape(-1), -math.inf)
        positive = x > 0
        if int(torch.count_nonzero(positive)) <= k:
            return positive.reshape(groups, size)
        # at least k allowed entries are positive, so the k largest of x are allowed and positive
        return _top_flat(x, k).reshape(groups, size)
    pos = score > 0 if allowed is None else allowed & (score > 0)
    x = score.masked_fill(~pos, -math.inf)
    if size <= 8:
        rank = group_rank(x)
        return pos & (rank < budget.reshape(-1, 1))
    kmax = int(budget.max()) if budget.numel() else 0
    if kmax <= 0:
        return torch.zeros_like(pos)
    vals, idx = torch.topk(x, min(kmax, size), dim=1)
    take = torch.arange(idx.shape[1], device=x.device).reshape(1, -1) < budget.reshape(-1, 1)
    out = torch.zeros_like(pos)
    out.scatter_(1, idx, take & (vals > 0))
    return out


def round_mask(m: torch.Tensor, allowed: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Top-``budget`` rounding of a relaxed mask in each group, among the allowed entries.

    Exactly ``budget`` entries per group are kept; among equal values the lower index is kept.
    """
    x = m.masked_fill(~allowed, -math.inf)
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    take = torch.arange(x.shape[1], device=x.device).reshape(1, -1) < budget.reshape(-1, 1)
    out = torch.zeros_like(allowed)
    out.scatter_(1, order, take)
    return out


def fw_objective(weight: torch.Tensor, G: torch.Tensor, mask: torch.Tensor) -> float:
    """``f(M) = <W ⊙ (1-M), (W ⊙ (1-M)) G>`` in float64, for a binary or relaxed mask M."""
    E = weight.double() * (1 - mask.double())
    return float(((E @ G.double()) * E).sum())


# ----------------------------------------------------------------------------------------------
# the solver
# ----------------------------------------------------------------------------------------------

def _warm_start(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, warm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(warm-start keep-mask, saliency) for the named greedy method."""
    if warm == "wanda":
        return wanda(weight, G, pattern).mask, _wanda_key(weight, G)
    if warm == "ria":
        return ria(weight, G, pattern).mask, ria_score(weight, G)
    score = weight.abs().double()
    from .patterns import topk_mask
    return topk_mask(score, pattern), score


def _sparse_times(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int],
                  G: torch.Tensor) -> torch.Tensor:
    """S @ G for the sparse S with the given (row-major sorted) entries."""
    S = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, shape, is_coalesced=True,
                                check_invariants=False)
    return torch.sparse.mm(S, G)


@register("sparsefw", description="Frank-Wolfe on the convex hull of masks, warm-started and alpha-fixed (SparseFW)")
def sparsefw(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, *, iterations: int = 500,
             alpha: float = 0.9, warm_start: str = "wanda", step: str = "fw", refresh: int = 100,
             dtype: torch.dtype | str = torch.float32, trace_every: int = 0, trace_rounded: bool = False,
             dense_fraction: float = 0.05, safeguard: bool = True) -> SolverResult:
    """SparseFW (Roux et al. 2025, Algorithm 2): alpha-fixing, Frank-Wolfe on the rest, top-k rounding.

    - ``warm_start``: ``"wanda"`` (default), ``"ria"`` or ``"magnitude"``; its mask is the start M_0
      and its saliency decides which weights are fixed.
    - ``alpha``: fraction of the kept weights fixed from the warm start (``floor(alpha·k)`` highest
      saliency among the warm start's kept weights, over the whole matrix); FW optimises the others,
      with each group's budget reduced by its fixed weights. 0.9 is the paper's best setting.
    - ``iterations``: Frank-Wolfe iterations T (the paper uses 2000; choose by measurement).
    - ``step``: ``"fw"`` for the classical ``2/(t+2)`` (the paper's) or ``"line"`` for the exact
      line search ``η = clip(g_t / (2 q_t), 0, 1)`` with ``q_t = <W⊙D, (W⊙D) G>``, ``D = V - M``.
      With ``"fw"`` the first step is 1, so ``M_1 = V_0``: the warm-start *mask* only enters through
      V_0 (the LMO at the warm start), the fixed weights and the safeguard, as in the paper.
    - ``refresh``: recompute the maintained products exactly every this many iterations.
    - ``trace_every``: record (iteration, objective, gap, step) every this many iterations in
      ``stats["trace"]``; with ``trace_rounded`` also the objective of the rounded mask (a dense
      product each time).
    - ``safeguard``: if the rounded FW mask has a larger layer error than the warm start (it can: the
      rounding error is only bounded, not zero), return the warm start's mask instead
      (``stats["used"]`` says which). ``False`` follows the paper's Algorithm 2 literally.

    Returns the masked weight (no reconstruction: SparseFW selects masks) and stats: the objective of
    the warm start, of the final relaxed iterate M_T, of the rounded mask, the last duality gap
    (``gap``, computed at M_{T-1}), the best lower bound ``lower_bound = max_t f(M_t) - g_t`` on the
    optimum of the relaxed (and of the binary) problem given the fixed weights (use this one, not
    ``objective_relaxed - gap``, as the certificate), all as absolute values and relative to ``f(0) = ||W X||²``, and timings: seconds per
    iteration against the seconds of one dense ``W @ G``.
    """
    pattern = _check_inputs(weight, G, pattern)
    from .greedy import _resolve_dtype
    dtype = _resolve_dtype(dtype)
    warm = str(warm_start).strip().lower()
    if warm not in _WARM:
        raise ValueError(f"warm_start must be one of {', '.join(_WARM)}; got {warm_start!r}")
    step = str(step).strip().lower()
    if step not in _STEPS:
        raise ValueError(f"step must be 'fw' (2/(t+2)) or 'line' (exact line search); got {step!r}")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha (the fraction of kept weights fixed from the warm start) must lie in [0, 1]; got {alpha!r}")
    iterations = int(iterations)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}")
    refresh = int(refresh)
    if refresh < 1:
        raise ValueError(f"refresh must be a positive integer; got {refresh}")
    trace_every = int(trace_every)

    shape = (weight.shape[0], weight.shape[1])
    gshape = group_view(pattern, shape)
    keep = group_budget(pattern, shape)
    k_total = keep * gshape[0]
    device = weight.device

    warm_mask, saliency = _warm_start(weight, G, pattern, warm)
    # fixed: the floor(alpha k) highest-saliency weights the warm start keeps (stable: lower index wins)
    n_fixed = int(math.floor(alpha * k_total + 1e-9))
    flat_sal = saliency.reshape(-1).masked_fill(~warm_mask.reshape(-1), -math.inf)
    fixed = torch.zeros(weight.numel(), dtype=torch.bool, device=device)
    if n_fixed:
        order = torch.sort(flat_sal, descending=True, stable=True).indices[:n_fixed]
        fixed[order] = True
    fixed = fixed.reshape(gshape)
    allowed = ~fixed
    budget = keep - fixed.sum(dim=1)
    M0 = warm_mask.reshape(gshape) & allowed

    W = weight.to(dtype)
    Gd = G.to(device=device, dtype=dtype)
    Wg = W.reshape(gshape)
    matmul_seconds = math.inf
    for _ in range(3):  # the reference cost of one dense product: best of three (the first call warms up)
        t0 = time.perf_counter()
        WG = W @ Gd
        matmul_seconds = min(matmul_seconds, time.perf_counter() - t0)
    f_dense = float((W.double() * WG.double()).sum())
    Wfree = torch.where(allowed, Wg, torch.zeros_like(Wg))  # W ⊙ (1 - F), grouped
    C = Wfree.reshape(shape) @ Gd  # (W ⊙ (1-F)) G
    Cg = C.reshape(gshape)

    stats: dict[str, Any] = {
        "warm_start": warm, "alpha": alpha, "iterations": iterations, "step": step, "groups": gshape[0],
        "kept": k_total, "fixed": n_fixed, "free_budget": int(budget.sum()), "dtype": str(dtype).replace("torch.", ""),
        "objective_dense": f_dense, "matmul_seconds": matmul_seconds,
    }

    def objective_of(mask_g: torch.Tensor) -> float:
        full = (mask_g | fixed).reshape(shape)
        E = torch.where(full, torch.zeros_like(W), W)
        return float(((E @ Gd).double() * E.double()).sum())

    f_warm = objective_of(M0)
    free_f = allowed.to(dtype).reshape(-1)
    zero = torch.zeros((), dtype=dtype, device=device)
    M = M0.to(dtype)
    R = (torch.where(M0, Wg, zero).reshape(shape) @ Gd).reshape(gshape)  # (W ⊙ M) G
    P = torch.zeros_like(R)  # (W ⊙ V) G, V starts empty
    V = torch.zeros_like(fixed)
    trace: list[dict[str, float]] = []
    lower = -math.inf
    gap = 0.0
    changes_total = 0
    dense_updates = direct_updates = delta_updates = 0
    loop_start = time.perf_counter()
    for t in range(iterations):
        if t and t % refresh == 0:  # wash out the rounding drift of the maintained products
            R = ((Wg * M).reshape(shape) @ Gd).reshape(gshape)
            P = (torch.where(V, Wg, zero).reshape(shape) @ Gd).reshape(gshape)
        # W ⊙ (E G) = -∇f / 2 on the free entries; 0 on the fixed ones, which the LMO (positive
        # scores only) therefore never picks, and which no sum below sees (M, V, 1-F are 0 there)
        A = torch.sub(Cg, R).mul_(Wfree)
        V_new = lmo(A, None, budget)
        changed = V_new ^ V
        nnz = int(torch.count_nonzero(changed))
        direct = int(torch.count_nonzero(V_new))
        changes_total += nnz
        if min(nnz, direct) > dense_fraction * weight.numel():
            P = (torch.where(V_new, Wg, zero).reshape(shape) @ Gd).reshape(gshape)
            dense_updates += 1
        elif direct <= nnz:  # (W ⊙ V) G from V itself: V is sparse when alpha fixes most kept weights
            direct_updates += 1
            flat = V_new.reshape(-1).nonzero().squeeze(1)
            P = _sparse_times(flat // shape[1], flat % shape[1], W.reshape(-1)[flat], shape, Gd).reshape(gshape)
        elif nnz:  # update from the entries that changed
            delta_updates += 1
            flat = changed.reshape(-1).nonzero().squeeze(1)
            sign = V_new.reshape(-1)[flat].to(dtype) * 2 - 1
            vals = W.reshape(-1)[flat] * sign
            P += _sparse_times(flat // shape[1], flat % shape[1], vals, shape, Gd).reshape(gshape)
        V = V_new
        Vf = V.to(dtype)
        # f(M) = <W⊙(1-F-M), (W⊙(1-F-M)) G> = <A, 1-F-M>;  gap = <∇f, M - V> = 2 <A, V - M>
        a_flat = A.reshape(-1)
        a_m = float(torch.dot(a_flat, M.reshape(-1)))
        f_cur = float(torch.dot(a_flat, free_f)) - a_m
        gap = 2.0 * (float(torch.dot(a_flat, Vf.reshape(-1))) - a_m)
        lower = max(lower, f_cur - gap)
        if step == "fw":
            eta = 2.0 / (t + 2.0)
        else:
            WD = torch.sub(Vf, M).mul_(Wg)
            q = float(torch.dot(WD.reshape(-1), torch.sub(P, R).reshape(-1)))
            eta = 1.0 if q <= 0 else min(1.0, max(0.0, gap / (2.0 * q)))
        if trace_every and t % trace_every == 0:
            rec = {"iteration": t, "objective": f_cur, "gap": gap, "step": eta, "changes": nnz}
            if trace_rounded:
                rec["rounded"] = objective_of(round_mask(M, allowed, budget))
            trace.append(rec)
        if eta > 0:
            M.mul_(1.0 - eta).add_(Vf, alpha=eta)
            R.mul_(1.0 - eta).add_(P, alpha=eta)
    loop_seconds = time.perf_counter() - loop_start
    if iterations:
        f_rel = float((torch.sub(Cg, R).mul_(Wg).double() * (free_f.reshape(gshape) - M).double()).sum())
        final = round_mask(M, allowed, budget)
    else:
        final, f_rel = M0, f_warm
    f_round = objective_of(final)
    used = "fw"
    f_final = f_round
    if safeguard and f_round > f_warm:
        final, f_final, used = M0, f_warm, "warm"
    mask = (final | fixed).reshape(shape)
    ref = f_dense if f_dense > 0 else 1.0
    stats.update(
        objective_warm=f_warm, objective_relaxed=f_rel, objective_rounded=f_round, objective=f_final,
        used=used, gap=gap if iterations else None, lower_bound=lower if iterations else None,
        rel_warm=f_warm / ref, rel_relaxed=f_rel / ref, rel_rounded=f_round / ref, rel_final=f_final / ref,
        reduction_rounded=(1 - f_round / f_warm) if f_warm > 0 else 0.0,
        reduction_vs_warm=(1 - f_final / f_warm) if f_warm > 0 else 0.0,
        seconds=loop_seconds, seconds_per_iteration=loop_seconds / iterations if iterations else None,
        iteration_over_matmul=(loop_seconds / iterations / matmul_seconds) if iterations and matmul_seconds > 0 else None,
        mean_changes=changes_total / iterations if iterations else 0.0, dense_updates=dense_updates, direct_updates=direct_updates, delta_updates=delta_updates,
    )
    if trace_every:
        stats["trace"] = trace
    new = torch.where(mask, weight, torch.zeros_like(weight))
    return SolverResult(new, mask, stats)
