"""Progress bars: ``tqdm.auto`` (a widget in Jupyter when ipywidgets is installed, text otherwise).

Without ipywidgets, importing ``tqdm.auto`` in a notebook emits a ``TqdmWarning`` to stderr, which would
appear in every chapter of the rendered book; the text bar it falls back to is what we want, so the
warning is silenced here, once, for the package's own progress bars.
"""
from __future__ import annotations

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
