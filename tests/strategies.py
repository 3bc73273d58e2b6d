"""Hypothesis strategies shared by the tests: shapes, patterns and weight values with ties and zeros."""
from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import torch

from minisparse.patterns import Pattern, parse_pattern


@st.composite
def weights(draw, max_rows: int = 12, max_groups: int = 6, m: int | None = None) -> torch.Tensor:
    """A (d_out, d_in) float32 tensor whose d_in is a multiple of ``m`` (or of 4 and 8 by default):
    values on a coarse grid (many ties), exact zeros, negatives, and huge or tiny overall scales."""
    rows = draw(st.integers(1, max_rows))
    unit = m if m is not None else 8
    cols = unit * draw(st.integers(1, max_groups))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["grid", "normal", "zeros", "constant"]))
    if kind == "grid":
        values = rng.integers(-3, 4, size=(rows, cols)).astype(np.float32)
    elif kind == "normal":
        values = rng.standard_normal((rows, cols)).astype(np.float32)
    elif kind == "zeros":
        values = rng.standard_normal((rows, cols)).astype(np.float32) * (rng.random((rows, cols)) < 0.5)
    else:
        values = np.full((rows, cols), rng.choice([-1.0, 1.0]), dtype=np.float32)
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]))
    return torch.from_numpy(values * np.float32(scale))


@st.composite
def patterns(draw, d_in: int | None = None) -> Pattern:
    """Unstructured and row patterns at any sparsity in [0, 1), or N:M with M in {4, 8}."""
    kind = draw(st.sampled_from(["unstructured", "row", "nm"]))
    if kind == "nm":
        m = draw(st.sampled_from([4, 8] if d_in is None or d_in % 8 == 0 else [4]))
        n = draw(st.integers(1, m - 1))
        return parse_pattern(f"{n}:{m}")
    return parse_pattern(kind, draw(st.floats(0.0, 0.99, allow_nan=False)))
