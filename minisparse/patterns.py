"""Sparsity patterns as pure tensor functions: parse, top-k masks, projections, checks.

A pattern says which masks are allowed for a weight matrix W of shape (d_out, d_in):

- ``unstructured``: any mask that prunes ``round(sparsity * W.numel())`` weights of the matrix;
- ``row``: every output row prunes ``round(sparsity * d_in)`` weights;
- ``N:M``: in every group of M consecutive weights along the input dimension, N are kept
  (2:4 keeps 2 of 4, so its sparsity is 1 - N/M).

Masks are boolean tensors with ``True`` for a kept weight. Ties in a score are broken
deterministically: among equal scores the weight with the lower flat index is kept.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

__all__ = [
    "Pattern",
    "parse_pattern",
    "num_pruned",
    "topk_mask",
    "project",
    "is_feasible",
    "sparsity_of",
]


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern. Build it with :func:`parse_pattern`."""

    kind: str  # "unstructured" | "row" | "nm"
    sparsity: float
    n: int = 0  # kept per group (N:M only)
    m: int = 0  # group size (N:M only)

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return f"{self.kind}:{self.sparsity:g}"

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError if a weight of this shape cannot carry the pattern."""
        if len(shape) != 2:
            raise ValueError(f"a pattern applies to a 2-D weight (d_out, d_in); got shape {tuple(shape)}")
        if self.kind == "nm" and shape[1] % self.m != 0:
            raise ValueError(
                f"pattern {self}: the input width {shape[1]} is not divisible by M={self.m}; "
                f"choose an M that divides {shape[1]} (e.g. 2:4 needs a width divisible by 4)"
            )


def parse_pattern(pattern: str | Pattern | None = None, sparsity: float | None = None) -> Pattern:
    """Build a :class:`Pattern` from CLI-style arguments.

    ``parse_pattern("2:4")``, ``parse_pattern("unstructured", 0.5)``, ``parse_pattern("row", 0.6)``,
    or ``parse_pattern(None, 0.5)`` (unstructured). Raises ValueError naming the bad argument.
    """
    if isinstance(pattern, Pattern):
        return pattern
    if pattern is None:
        pattern = "unstructured"
    text = str(pattern).strip().lower()
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not (0 < n < m):
            raise ValueError(
                f"pattern {pattern!r}: an N:M pattern keeps N of every M weights and needs 0 < N < M "
                f"(for example 2:4 or 4:8); got N={n}, M={m}"
            )
        implied = 1.0 - n / m
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise ValueError(
                f"pattern {pattern!r} fixes the sparsity at {implied:g}; "
                f"sparsity={sparsity!r} contradicts it (leave --sparsity out with an N:M pattern)"
            )
        return Pattern("nm", implied, n, m)
    kinds = {"unstructured": "unstructured", "matrix": "unstructured", "row": "row", "per-row": "row"}
    written = re.fullmatch(r"([a-z-]+)\s*:\s*([0-9.eE+-]+)", text)  # the str() form, e.g. "unstructured:0.6"
    if written and written.group(1) in kinds:
        if sparsity is not None and not math.isclose(float(sparsity), float(written.group(2)), abs_tol=1e-12):
            raise ValueError(f"pattern {pattern!r} names the sparsity {written.group(2)}; sparsity={sparsity!r} "
                             "contradicts it (give it once)")
        text, sparsity = written.group(1), written.group(2)
    if text not in kinds:
        raise ValueError(
            f"pattern {pattern!r} is not known; use 'unstructured', 'row' or an N:M pattern such as '2:4'"
        )
    if sparsity is None:
        raise ValueError(f"pattern {pattern!r} needs a sparsity in [0, 1), e.g. --sparsity 0.5")
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(
            f"sparsity must lie in [0, 1) (the fraction of weights pruned, e.g. 0.5); got {sparsity!r}"
        )
    return Pattern(kinds[text], s)


def num_pruned(pattern: Pattern, shape: tuple[int, int]) -> int:
    """Number of weights the pattern prunes in a matrix of this shape."""
    pattern.check_shape(shape)
    d_out, d_in = shape
    if pattern.kind == "unstructured":
        return int(round(pattern.sparsity * d_out * d_in))
    if pattern.kind == "row":
        return d_out * int(round(pattern.sparsity * d_in))
    return d_out * (d_in // pattern.m) * (pattern.m - pattern.n)


def _keep_top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` largest entries of each row of a 2-D score.

    Stable: among equal scores, lower column index wins.
    """
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    if keep <= 0:
        return mask
    if keep >= cols:
        return ~mask
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :keep]
    mask.scatter_(1, order, True)
    return mask


def group_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank (0 = largest) of each entry within its row, for narrow rows; ties: lower index first.

    One comparison per pair of columns (s(s-1)/2 of them), each a pass over a column: for the many
    rows of four of an N:M pattern this is several times faster than a stable sort.
    """
    s = x.shape[1]
    cols = [x[:, i] for i in range(s)]
    rank = [torch.zeros(x.shape[0], dtype=torch.uint8, device=x.device) for _ in range(s)]
    for i in range(s):
        for j in range(i + 1, s):
            later_wins = cols[j] > cols[i]  # j > i: on a tie the lower index i wins
            rank[i] += later_wins
            rank[j] += ~later_wins
    return torch.stack(rank, dim=1)


def topk_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Mask keeping the highest-scoring weights allowed by the pattern.

    ``score`` has the weight's shape (d_out, d_in); higher means more important. NaN scores
    are rejected. Returns a bool tensor, True where the weight is kept.
    """
    pattern.check_shape(tuple(score.shape))
    if torch.isnan(score).any():
        raise ValueError("the saliency score contains NaN; check the weights and the Gram matrix for NaN/inf")
    d_out, d_in = score.shape
    if pattern.kind == "unstructured":
        keep = d_out * d_in - num_pruned(pattern, (d_out, d_in))
        return _keep_top(score.reshape(1, -1), keep).reshape(d_out, d_in)
    if pattern.kind == "row":
        keep = d_in - int(round(pattern.sparsity * d_in))
        return _keep_top(score, keep)
    groups = score.reshape(-1, pattern.m)
    if pattern.m <= 8:
        return (group_rank(groups) < pattern.n).reshape(d_out, d_in)
    return _keep_top(groups, pattern.n).reshape(d_out, d_in)


def project(weight: torch.Tensor, pattern: Pattern, score: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection onto the pattern (keep the largest |w|), or keep the top ``score``."""
    mask = topk_mask(weight.abs() if score is None else score, pattern)
    return weight * mask


def is_feasible(mask: torch.Tensor, pattern: Pattern) -> bool:
    """True if the boolean keep-mask satisfies the pattern exactly."""
    pattern.check_shape(tuple(mask.shape))
    mask = mask.bool()
    d_out, d_in = mask.shape
    if pattern.kind == "unstructured":
        return int((~mask).sum()) == num_pruned(pattern, (d_out, d_in))
    if pattern.kind == "row":
        return bool(((~mask).sum(dim=1) == int(round(pattern.sparsity * d_in))).all())
    return bool((mask.reshape(-1, pattern.m).sum(dim=1) == pattern.n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)
