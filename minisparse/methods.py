"""The registry of pruning methods: name -> solver. The CLI, the engine and the book look methods up here.

A *layer-wise* method is a pure function ``solver(W, G, pattern, **options) -> SolverResult`` of a
weight matrix W (d_out, d_in), the Gram matrix G = X Xᵀ (d_in, d_in) of its calibration inputs and a
:class:`~minisparse.patterns.Pattern`. It knows nothing about models; the engine hands it each Linear
layer in turn. Adding a method touches its own module (which calls :func:`register`) and nothing else.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["SolverResult", "Method", "register", "get_method", "available_methods"]

# Modules whose import registers methods; a new method module is added here once.
_METHOD_MODULES = ("minisparse.greedy",)


@dataclass
class SolverResult:
    """What a layer-wise solver returns: the new weight, its keep-mask and solver statistics."""

    weight: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    solver: Callable[..., SolverResult]
    kind: str = "layerwise"  # "layerwise" (engine + solver) or "end2end" (training loop)
    description: str = ""


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, kind: str = "layerwise", description: str = ""):
    """Decorator registering a solver under ``name``."""

    def wrap(fn: Callable[..., SolverResult]) -> Callable[..., SolverResult]:
        if name in _REGISTRY and _REGISTRY[name].solver is not fn:
            raise ValueError(f"method {name!r} is registered twice")
        doc_lines = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Method(name, fn, kind, description or (doc_lines[0] if doc_lines else ""))
        return fn

    return wrap


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def available_methods() -> dict[str, Method]:
    """All registered methods, by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> Method:
    """Look a method up by name; an unknown name raises ValueError listing the known ones."""
    methods = available_methods()
    key = str(name).strip().lower()
    if key not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(methods)}")
    return methods[key]
