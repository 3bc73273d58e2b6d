"""The layer-wise engine: walk a decoder layer by layer, collect G = X Xᵀ per Linear, call a solver.

1. One cheap pass over the calibration batch records the input of the first decoder layer and the
   keyword arguments (position embeddings, masks, position ids) that the model hands each layer;
   the layers themselves are skipped in that pass.
2. For each decoder layer in turn: move it to the compute device, run the calibration inputs through
   it while forward pre-hooks accumulate G for every Linear (streamed, d_in² floats per Linear, never
   the activations), hand (W, G, pattern) to the solver, write the result back, then run the *pruned*
   layer to produce the inputs of the next one, and move the layer back.

Only the current layer and the calibration activations live on the compute device, so a model too
large for it can be pruned with the rest kept in CPU memory. Nothing here knows a model family: layers
are found by structure (:func:`~minisparse.models.decoder_layers`) and Linear modules by type.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from ._progress import tqdm

from .methods import Method, get_method
from .models import decoder_layers, prunable_linears
from .objective import relative_error
from .patterns import Pattern, parse_pattern

__all__ = ["PruneReport", "capture_layer_inputs", "GramCollector", "prune_model", "check_prunable",
           "collect_grams", "prune_with_masks", "save_masks", "load_masks"]


class _StopForward(Exception):
    pass


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


_DROP_KWARGS = {"past_key_values", "past_key_value", "use_cache"}


@contextmanager
def _recording_layers(layers: nn.ModuleList, store: Callable[[int, torch.Tensor, dict], None]):
    """Temporarily replace each layer's forward by one that records its inputs and passes them on."""

    def make(i: int):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise TypeError("decoder layers are expected to take their extra inputs as keywords")
            store(i, hidden_states, {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS})
            if i == len(layers) - 1:
                raise _StopForward
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int,
                         store_device: torch.device) -> tuple[list[torch.Tensor], dict[tuple[int, int], dict]]:
    """Hidden states entering the first decoder layer (one tensor per batch) and the keyword arguments
    each layer receives, keyed by (layer index, batch size). No decoder layer is computed."""
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs: dict[tuple[int, int], dict] = {}
    embed_device = model.get_input_embeddings().weight.device

    def store(i: int, hidden: torch.Tensor, kw: dict) -> None:
        if i == 0:
            inputs.append(hidden.to(store_device))
        kwargs.setdefault((i, hidden.shape[0]), _move(kw, store_device))

    with _recording_layers(layers, store):
        for start in range(0, len(calib_ids), batch_size):
            batch = calib_ids[start:start + batch_size].to(embed_device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    if not inputs:
        raise RuntimeError("the model's forward never reached its first decoder layer")
    return inputs, kwargs


class GramCollector:
    """Forward pre-hooks that accumulate G = Σ x xᵀ (float32 or float64) for each Linear of a layer.

    Linear modules fed the very same input tensor (q/k/v, gate/up) share one G: it is computed once.
    """

    def __init__(self, linears: dict[str, nn.Linear], dtype: torch.dtype = torch.float32):
        self.linears = linears
        self.dtype = dtype
        self.G: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self.tokens = 0
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.alias.setdefault(name, self._last[1])
                return
            self._last = (x, name)
            x2 = x.reshape(-1, x.shape[-1]).to(self.dtype)
            if name not in self.G:
                self.G[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=self.dtype, device=x2.device)
            self.G[name].addmm_(x2.T, x2)
            if name == next(iter(self.linears)):
                self.tokens += x2.shape[0]
        return hook

    def __enter__(self) -> "GramCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def gram(self, name: str) -> torch.Tensor:
        return self.G[self.alias.get(name, name)]


@dataclass
class PruneReport:
    """What a layer-wise run did: per-matrix statistics, per-layer times, totals."""

    method: str
    pattern: str
    matrices: list[dict] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0
    calib_tokens: int = 0

    @property
    def pruned(self) -> int:
        return sum(m["zeros"] for m in self.matrices)

    @property
    def numel(self) -> int:
        return sum(m["numel"] for m in self.matrices)

    @property
    def sparsity(self) -> float:
        """Measured fraction of zeros over the pruned Linear layers."""
        return self.pruned / max(self.numel, 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method, "pattern": self.pattern, "measured_sparsity": self.sparsity,
            "capture_seconds": self.capture_seconds, "total_seconds": self.total_seconds,
            "calib_tokens": self.calib_tokens, "layer_seconds": self.layer_seconds, "matrices": self.matrices,
        }


def check_prunable(model: nn.Module, pattern: Pattern) -> None:
    """Raise ValueError unless every decoder Linear can carry the pattern and has finite weights."""
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in prunable_linears(layer).items():
            try:
                pattern.check_shape(tuple(lin.weight.shape))
            except ValueError as err:
                raise ValueError(f"layer {i} {name}: {err}") from None
            if not torch.isfinite(lin.weight).all():
                raise ValueError(f"layer {i} {name}: the weight contains NaN or inf; prune a model with finite weights")


def _call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def prune_model(model: nn.Module, calib_ids: torch.Tensor, method: str | Method = "magnitude",
                pattern: Pattern | str = "2:4", *, sparsity: float | None = None,
                device: torch.device | str | None = None, batch_size: int = 8,
                gram_dtype: torch.dtype = torch.float32, layers: Iterable[int] | None = None,
                solver_options: dict | None = None, progress: bool = True) -> PruneReport:
    """Prune every Linear of every decoder layer (or of ``layers``) in place, layer by layer.

    ``calib_ids`` is a (n_samples, seqlen) LongTensor of calibration tokens. The solver is looked up in
    the method registry. Returns a :class:`PruneReport` with per-matrix sparsity, relative layer-wise
    error ||WX - ŴX||²/||WX||² (on the calibration inputs each layer actually saw) and time.
    """
    start = time.perf_counter()
    meth = method if isinstance(method, Method) else get_method(method)
    if meth.kind != "layerwise":
        raise ValueError(f"method {meth.name!r} is not layer-wise; it runs through the training loop")
    pat = parse_pattern(pattern, sparsity)
    options = dict(solver_options or {})
    stack = decoder_layers(model)
    check_prunable(model, pat)
    if calib_ids.ndim != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calib_ids must be a non-empty (n_samples, seqlen) tensor; got shape {tuple(calib_ids.shape)}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    wanted = sorted(set(range(len(stack)) if layers is None else layers))
    if wanted and not (0 <= wanted[0] and wanted[-1] < len(stack)):
        raise ValueError(f"layers must lie in [0, {len(stack)}); got {wanted}")
    report = PruneReport(meth.name, str(pat))

    hidden, kwargs = capture_layer_inputs(model, calib_ids, batch_size, dev)
    report.capture_seconds = time.perf_counter() - start
    report.calib_tokens = int(calib_ids.numel())
    last = wanted[-1] if wanted else -1
    bar = tqdm(range(last + 1), desc=f"{meth.name} {pat}", unit="layer", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        layer = stack[i]
        home = next(layer.parameters()).device
        layer.to(dev)
        if i in wanted:
            linears = prunable_linears(layer)
            with GramCollector(linears, gram_dtype) as grams:
                for h in hidden:
                    _call_layer(layer, h, kwargs[(i, h.shape[0])])
            errors = []
            for name, lin in linears.items():
                t1 = time.perf_counter()
                G = grams.gram(name)
                if not torch.isfinite(G).all():
                    raise ValueError(f"layer {i} {name}: the Gram matrix of its inputs holds NaN or inf "
                                     "(the activations overflowed; try float32 or a different calibration text)")
                W = lin.weight.detach().to(torch.float32, copy=True)
                result = meth.solver(W, G, pat, **options)
                new = result.weight
                if not torch.isfinite(new).all():
                    raise ValueError(f"layer {i} {name}: solver {meth.name!r} returned NaN or inf weights")
                lin.weight.copy_(new.to(lin.weight.dtype) + 0.0)  # + 0.0 turns the -0.0 of W * mask into +0.0 (bit-exact saves)
                err = relative_error(W, new, G)
                errors.append(err)
                zeros = int((lin.weight == 0).sum())
                report.matrices.append({
                    "layer": i, "name": name, "shape": list(W.shape), "numel": W.numel(), "zeros": zeros,
                    "sparsity": zeros / W.numel(), "rel_error": err,
                    "seconds": time.perf_counter() - t1, "stats": result.stats,
                })
            del grams
            bar.set_postfix(rel_err=f"{sum(errors) / len(errors):.3g}")
        if i < last:
            hidden = [_call_layer(layer, h, kwargs[(i, h.shape[0])]) for h in hidden]
        layer.to(home)
        report.layer_seconds.append(time.perf_counter() - t0)
    report.total_seconds = time.perf_counter() - start
    return report


def collect_grams(model: nn.Module, calib_ids: torch.Tensor, layer: int, *, batch_size: int = 8,
                  device: torch.device | str | None = None,
                  gram_dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W, G) for every Linear of decoder layer ``layer`` of the unpruned model, by Linear name.

    Runs the same walk as :func:`prune_model` with a solver that keeps every weight, so the book and the
    tests see exactly the matrices a solver is handed.
    """
    from .methods import SolverResult

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_all(W, G, pattern):
        seen.append((W.clone(), G.clone()))
        return SolverResult(W, torch.ones_like(W, dtype=torch.bool))

    report = prune_model(model, calib_ids, Method("collect", keep_all), parse_pattern("unstructured", 0.0),
                         device=device, batch_size=batch_size, gram_dtype=gram_dtype, layers=[layer],
                         progress=False)
    return {m["name"]: wg for m, wg in zip(report.matrices, seen)}


def prune_with_masks(model: nn.Module, calib_ids: torch.Tensor, masks: dict[str, torch.Tensor], *,
                     reconstruct: bool = True, damp: float = 0.01, batch_size: int = 8,
                     device: torch.device | str | None = None, progress: bool = True) -> PruneReport:
    """Apply masks chosen elsewhere (ProxSparse, SparseFW, another method's run) and, with ``reconstruct``,
    re-fit the kept weights by least squares on the calibration inputs: per row
    min ||w X - ŵ X||² with ŵ = 0 off the mask (:func:`~minisparse.objective.reconstruct`, ridge ``damp``
    as SparseGPT's), the weight update SparseGPT makes, for a mask it did not choose.

    ``masks`` maps every name of :func:`~minisparse.train.prunable_parameters` to a boolean mask of that
    weight's shape (True = kept); the model must hold its dense weights. The walk is
    :func:`prune_model`'s, so each layer is re-fitted on the inputs the already pruned layers produce.
    """
    from .methods import SolverResult
    from .objective import reconstruct as refit
    from .train import prunable_parameters

    params = prunable_parameters(model)
    missing = sorted(set(params) - set(masks))
    extra = sorted(set(masks) - set(params))
    if missing or extra:
        raise ValueError(f"masks must name exactly the model's prunable weights; missing {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}, unknown {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for n, p in params.items():
        if tuple(masks[n].shape) != tuple(p.shape):
            raise ValueError(f"{n}: mask of shape {tuple(masks[n].shape)} for a weight of shape {tuple(p.shape)}")
    queue = list(params.items())  # prune_model's walk visits the Linears in this order

    def solver(W, G, pattern):
        name, p = queue.pop(0)
        if not torch.equal(W, p.detach().to(W.dtype)):  # the walk and the queue must agree, matrix by matrix
            raise RuntimeError(f"prune_with_masks: expected {name} next, got another matrix")
        keep = masks[name].to(device=W.device, dtype=torch.bool)
        new = refit(W, keep, G, damp=damp) if reconstruct else W * keep
        return SolverResult(torch.where(keep, new, torch.zeros_like(new)), keep,
                            {"reconstruct": reconstruct, "kept": int(keep.sum())})

    name = "given-mask+lstsq" if reconstruct else "given-mask"
    return prune_model(model, calib_ids, Method(name, solver), parse_pattern("unstructured", 0.0),
                       device=device, batch_size=batch_size, progress=progress)


def save_masks(masks: dict[str, torch.Tensor], path) -> Path:
    """Write boolean masks to ``path`` (torch format, one bit per weight), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    packed = {}
    for n, m in masks.items():
        flat = m.detach().to("cpu", torch.bool).flatten()
        pad = (-flat.numel()) % 8
        flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
        packed[n] = {"shape": list(m.shape), "bits": (flat * weights).sum(dim=1, dtype=torch.uint8)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": "minisparse-masks-1", "masks": packed}, tmp)
    os.replace(tmp, path)
    return path


def load_masks(path) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks`."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != "minisparse-masks-1":
        raise ValueError(f"{path}: not a mask file written by minisparse.engine.save_masks")
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    out = {}
    for n, entry in data["masks"].items():
        shape = tuple(entry["shape"])
        count = math.prod(shape)
        flat = (entry["bits"].reshape(-1, 1) & bits) != 0
        out[n] = flat.flatten()[:count].reshape(shape)
    return out
