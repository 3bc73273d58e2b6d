"""Where does SparseGPT's lead over a learned mask come from: the mask, or the weight update?

SparseGPT both chooses a 2:4 mask and re-fits the kept weights; Wanda and ProxSparse only choose a mask.
For each source of masks this script measures, on the bundled SmolLM2-135M, two models with the same
masks:

- ``mask_only``: the mask applied to the original weights (what Wanda and ProxSparse do);
- ``refit``: the kept weights re-fitted by least squares on the calibration inputs, layer by layer
  (:func:`minisparse.engine.prune_with_masks`, ridge 0.01 as SparseGPT's), the update SparseGPT makes,
  here for any mask.

A source is a layer-wise method name (its masks come from a run of that method, whose own perplexity is
recorded too) or a mask file written by ``benchmarks/e2e.py --save-masks``. Protocol as
benchmarks/baseline.py: 128 calibration windows of 512 tokens (seed 0) of the calibration half; perplexity
on 100 windows of 512 tokens of the evaluation half. One JSON per source under benchmarks/results/refit/:

    .venv/bin/python benchmarks/refit.py --sources sparsegpt wanda
    .venv/bin/python benchmarks/refit.py --sources benchmarks/results/e2e/masks/<run>.pt
    .venv/bin/python benchmarks/refit.py --summarize
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from _common import write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "refit"


def _recording(method_name: str, names: list[str], masks: dict):
    """The registered solver ``method_name``, recording each matrix's mask under its parameter name."""
    from minisparse.methods import Method, get_method

    inner = get_method(method_name)
    queue = list(names)  # prune_model visits the matrices in prunable_parameters' order

    def solver(W, G, pattern, **kw):
        result = inner.solver(W, G, pattern, **kw)
        masks[queue.pop(0)] = result.mask.detach().to("cpu", torch.bool).clone()
        return result

    return Method(inner.name, solver, kind=inner.kind)


def run(source: str, args) -> Path:
    from minisparse import load_model, load_text
    from minisparse.data import calibration_batch
    from minisparse.engine import load_masks, prune_model, prune_with_masks
    from minisparse.evaluate import perplexity
    from minisparse.train import prunable_parameters

    is_file = source.endswith(".pt")
    name = Path(source).stem if is_file else f"{source}-2of4"
    path = Path(args.out_dir) / f"{name}.json"
    if path.exists() and not args.redo:
        return path
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    calib = calibration_batch(tok, load_text("wikipedia", "calib"), args.calib_samples, 512, args.seed, lm.bos)
    eval_text = load_text("wikipedia", "eval")
    params = prunable_parameters(model)
    original = {n: p.detach().clone() for n, p in params.items()}

    def restore():
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])

    def ppl():
        return perplexity(model, tok, eval_text, 512, args.eval_windows, progress=True)["ppl"]

    shown = os.path.relpath(Path(source).resolve(), HERE.parent) if is_file else source  # repo-relative
    result = {"source": shown, "pattern": "2:4", "calibration": {"samples": args.calib_samples, "seqlen": 512,
                                                                  "seed": args.seed, "text": "wikipedia"},
              "eval": {"windows": args.eval_windows, "seqlen": 512, "text": "wikipedia", "part": "eval"},
              "damp": args.damp, "own_ppl": None}
    if is_file:
        masks = load_masks(source)
    else:
        masks: dict[str, torch.Tensor] = {}
        prune_model(model, calib, _recording(source, list(params), masks), "2:4", progress=True)
        result["own_ppl"] = ppl()
        print(f"{source} 2:4: own {result['own_ppl']:.2f}", flush=True)
    bad = [n for n, m in masks.items() if (m.reshape(-1, 4).sum(dim=1) > 2).any()]
    if bad:
        raise ValueError(f"{source}: masks of {bad[:3]} are not 2:4")
    restore()
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    result["mask_only_ppl"] = ppl()
    print(f"{name}: mask only {result['mask_only_ppl']:.2f}", flush=True)
    restore()
    t1 = time.perf_counter()
    report = prune_with_masks(model, calib, masks, reconstruct=True, damp=args.damp, progress=True)
    result["refit_seconds"] = time.perf_counter() - t1
    result["refit_ppl"] = ppl()
    print(f"{name}: refit {result['refit_ppl']:.2f}", flush=True)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    result.update(sparsity=1 - kept / total,
                  mean_rel_error_refit=sum(m["rel_error"] for m in report.matrices) / len(report.matrices),
                  wall_seconds=time.perf_counter() - t0, torch_threads=torch.get_num_threads())
    write_json(path, result)
    return path


def summarize(out: Path) -> Path:
    rows = []
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        rows.append({"source": r["source"], "own_ppl": round(r["own_ppl"], 3) if r["own_ppl"] else "",
                     "mask_only_ppl": round(r["mask_only_ppl"], 3), "refit_ppl": round(r["refit_ppl"], 3),
                     "sparsity": round(r["sparsity"], 6), "refit_seconds": round(r["refit_seconds"], 1)})
    return write_csv(rows, out.with_suffix(".csv"), "source")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["sparsegpt", "wanda"],
                    help="layer-wise method names and/or mask files from benchmarks/e2e.py --save-masks")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--summarize", action="store_true")
    ap.add_argument("--out-dir", default=str(OUT))
    args = ap.parse_args()
    if not args.summarize:
        for source in args.sources:
            print(run(source, args), flush=True)
    print(summarize(Path(args.out_dir)))


if __name__ == "__main__":
    main()
