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

__all__ = ["SolverResult", "Method", "register", "get_method", "available_methods", "method_options",
           "check_options", "parse_option"]

# Modules whose import registers methods; a new method module is added here once.
_METHOD_MODULES = ("minisparse.greedy", "minisparse.fw", "minisparse.proxsparse", "minisparse.admm")


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


def method_options(method: Method) -> dict[str, Any]:
    """The solver's keyword options and their defaults (everything after W, G and the pattern)."""
    import inspect

    params = list(inspect.signature(method.solver).parameters.values())[3:]
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _RUNTIME}


# Arguments an end-to-end method receives from the run itself (CLI flags), not as solver options.
_RUNTIME = {"seqlen", "seed", "bos_id", "progress"}


def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value) with value read as int, float, true/false, or else a string."""
    if "=" not in text:
        raise ValueError(f"a solver option is written KEY=VALUE (e.g. alpha=0.9); got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    low = raw.lower()
    value: Any
    if low in ("true", "false"):
        value = low == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return key.replace("-", "_"), value


def check_options(method: Method, options: dict[str, Any], pattern) -> None:
    """Raise ValueError for an option the solver does not take, or a value it rejects.

    Values are checked by running the solver on a tiny random problem with the same pattern, so a bad
    value fails in milliseconds instead of after the model is loaded and the first layer is captured.
    """
    known = method_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise ValueError(f"method {method.name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options (with defaults) are: {listing}")
    if method.kind == "end2end":
        try:
            method.solver(None, None, pattern, **options)
        except TypeError as err:
            raise ValueError(f"method {method.name!r}: bad option value ({err})") from None
        return
    width = 2 * pattern.m if getattr(pattern, "kind", "") == "nm" else 8
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, width, generator=gen)
    X = torch.randn(width, 4 * width, generator=gen)
    trial = dict(options)
    if "iterations" in known and "iterations" in trial:
        trial["iterations"] = min(int(trial["iterations"]), 2) if isinstance(trial["iterations"], int) else trial["iterations"]
    try:
        method.solver(W, X @ X.T, pattern, **trial)
    except TypeError as err:
        raise ValueError(f"method {method.name!r}: bad option value ({err})") from None
