"""Greedy single-weight pruning as pure functions of (W, G, pattern): magnitude first."""
from __future__ import annotations

import torch

from .methods import SolverResult, register
from .patterns import Pattern, topk_mask

__all__ = ["magnitude"]


@register("magnitude", needs_gram=False, description="keep the largest |W| (ignores the inputs)")
def magnitude(weight: torch.Tensor, G: torch.Tensor | None, pattern: Pattern) -> SolverResult:
    """Magnitude pruning: keep the largest |W_ij| allowed by the pattern. G is not used."""
    mask = topk_mask(weight.abs(), pattern)
    return SolverResult(weight * mask, mask)
