"""One pruning run, end to end: load, sample calibration text, prune, evaluate. The CLI and the
benchmark scripts both call :func:`prune_and_evaluate`, so their numbers come from the same code."""
from __future__ import annotations

import platform
import resource
import time
from typing import Any

import torch

from .data import calibration_batch, load_text, tokenize
from .engine import check_prunable, prune_model
from .evaluate import perplexity
from .methods import Method, get_method
from .models import LoadedModel, load_model
from .patterns import Pattern, parse_pattern

__all__ = ["prune_and_evaluate", "peak_memory"]


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated device memory."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss_kb / 1024 if platform.system() != "Darwin" else rss_kb / 2**20}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def prune_and_evaluate(model: str | LoadedModel = "smollm2-135m", method: str | Method = "magnitude",
                       pattern: str | Pattern = "unstructured", sparsity: float | None = None, *,
                       calib_samples: int = 128, seqlen: int = 512, calib_text: str = "wikipedia", seed: int = 0,
                       eval_text: str = "wikipedia", eval_seqlen: int | None = None,
                       eval_windows: int | None = 100, eval_batch_size: int = 4, evaluate_dense: bool = True,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       batch_size: int = 8, solver_options: dict | None = None,
                       progress: bool = True) -> tuple[LoadedModel, dict[str, Any]]:
    """Prune a model with a layer-wise method and evaluate it; returns the pruned model and the report.

    The report holds the model, method, pattern, requested and measured sparsity, dense and pruned
    perplexity with their protocol, the calibration settings, times and peak memory.
    """
    from . import __version__

    wall = time.perf_counter()
    pat = parse_pattern(pattern, sparsity)
    meth = method if isinstance(method, Method) else get_method(method)
    device = torch.device(device)
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    check_prunable(lm.model, pat)
    calib = calibration_batch(lm.tokenizer, load_text(calib_text, "calib"), calib_samples, seqlen, seed, lm.bos)
    text = load_text(eval_text, "eval")
    eval_seqlen = eval_seqlen or seqlen

    def evaluate() -> dict:
        return perplexity(lm.model, lm.tokenizer, text, eval_seqlen, eval_windows, eval_batch_size,
                          text_name=eval_text, progress=progress)

    dense = evaluate() if evaluate_dense else None
    if meth.kind == "end2end":
        # End-to-end methods train on the calibration half's token stream, window by window.
        stream = tokenize(lm.tokenizer, load_text(calib_text, "calib"))
        t0 = time.perf_counter()
        training = meth.solver(lm.model, stream, pat, seqlen=seqlen, seed=seed,
                               bos_id=lm.tokenizer.bos_token_id if lm.bos else None, progress=progress,
                               **(solver_options or {}))
        report = _EndToEndReport(lm.model, pat, training, time.perf_counter() - t0)
    else:
        report = prune_model(lm.model, calib, meth, pat, device=device, batch_size=batch_size,
                             solver_options=solver_options, progress=progress)
    pruned = evaluate()
    result = {
        "minisparse_version": __version__,
        "model": lm.name, "model_source": lm.source, "dtype": str(dtype).replace("torch.", ""),
        "device": str(device), "method": meth.name, "pattern": str(pat), "solver_options": solver_options or {},
        "requested_sparsity": pat.sparsity, "measured_sparsity": report.sparsity,
        "dense_ppl": dense["ppl"] if dense else None, "pruned_ppl": pruned["ppl"],
        "eval": {k: pruned[k] for k in ("text", "part", "seqlen", "windows", "tokens", "bos")},
        "calibration": {"text": calib_text, "part": "calib", "samples": calib_samples, "seqlen": seqlen,
                        "seed": seed, "tokens": int(calib.numel())},
        "load_seconds": lm.load_seconds, "prune_seconds": report.total_seconds,
        "eval_seconds": {"dense": dense["seconds"] if dense else None, "pruned": pruned["seconds"]},
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "wall_seconds": time.perf_counter() - wall,
        **peak_memory(device),
        "engine": report.to_dict(),
    }
    if meth.kind == "end2end":
        result["calibration"].update(samples=None, tokens=report.training["tokens"],
                                     note="end-to-end: steps x batch_size windows drawn from the calibration half")
    return lm, result


class _EndToEndReport:
    """The parts of a PruneReport an end-to-end run can fill: per-matrix sparsity and the training log."""

    def __init__(self, model, pattern, training: dict, seconds: float):
        from .models import decoder_layers, prunable_linears

        self.training = training
        self.total_seconds = seconds
        self.matrices = []
        for i, layer in enumerate(decoder_layers(model)):
            for name, lin in prunable_linears(layer).items():
                zeros = int((lin.weight == 0).sum())
                self.matrices.append({"layer": i, "name": name, "shape": list(lin.weight.shape),
                                      "numel": lin.weight.numel(), "zeros": zeros,
                                      "sparsity": zeros / lin.weight.numel()})
        self.sparsity = sum(m["zeros"] for m in self.matrices) / max(1, sum(m["numel"] for m in self.matrices))

    def to_dict(self) -> dict:
        return {"matrices": self.matrices, "training": self.training, "total_seconds": self.total_seconds}
