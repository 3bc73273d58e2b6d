"""Greedy methods on *identical* (W, G): the layer-wise error of magnitude, Wanda, RIA and SparseGPT when
every method is handed the very same weight matrix and the very same Gram matrix.

The baseline table (benchmarks/baseline.py) prunes sequentially: layer l of a method sees the outputs of
that method's own pruned layers 0..l-1, so two methods' layer-wise errors at layer l are measured on
different G. This script removes that difference. One forward pass of the *dense* SmolLM2-135M over the
baseline's calibration batch (128 windows of 512 tokens, seed 0, calibration half) accumulates G = X Xᵀ
for the input of every decoder Linear at once; then each method prunes each of the 210 matrices from
(W, G) and the relative error ||WX - ŴX||² / ||WX||² = tr(ΔW G ΔWᵀ) / tr(W G Wᵀ) is recorded.

    .venv/bin/python benchmarks/greedy_same_g.py                       # 50/60/70/80% and 2:4
    .venv/bin/python benchmarks/greedy_same_g.py --settings 0.7 --calib-samples 16   # a quick look

Writes benchmarks/results/greedy_same_g.json (per matrix and setting: every method's relative error) and
prints, per setting, on how many matrices SparseGPT's error is below each other method's.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import pattern_args, write_json  # noqa: E402

import minisparse as ms  # noqa: E402
from minisparse.engine import GramCollector  # noqa: E402
from minisparse.methods import get_method  # noqa: E402
from minisparse.models import decoder_layers, prunable_linears  # noqa: E402
from minisparse.objective import relative_error  # noqa: E402
from minisparse.patterns import is_feasible, num_pruned, parse_pattern  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("magnitude", "wanda", "ria", "sparsegpt")


def dense_grams(model, calib: torch.Tensor, batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W, G) for every decoder Linear of the unpruned model, from one forward pass with hooks."""
    linears = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in prunable_linears(layer).items():
            linears[f"{i}.{name}"] = lin
    collector = GramCollector(linears, torch.float32)
    with torch.no_grad(), collector:
        for start in tqdm(range(0, calib.shape[0], batch_size), desc="dense forward, G of every Linear"):
            model(calib[start:start + batch_size])
    return {n: (lin.weight.detach().clone(), collector.gram(n)) for n, lin in linears.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4"],
                    help="sparsities (unstructured) or N:M (default: %(default)s)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results" / "greedy_same_g.json"))
    args = ap.parse_args(argv)
    patterns = {s: parse_pattern(*pattern_args(s)) for s in args.settings}  # bad settings fail before loading

    lm = ms.load_model("smollm2-135m")
    calib = ms.calibration_batch(lm.tokenizer, ms.load_text("wikipedia", "calib"), args.calib_samples, args.seqlen,
                                 args.seed, lm.bos)
    t0 = time.perf_counter()
    grams = dense_grams(lm.model, calib, args.batch_size)
    forward_seconds = time.perf_counter() - t0
    print(f"G for {len(grams)} matrices in {forward_seconds:.0f} s", flush=True)

    results = {}
    for setting, pattern in patterns.items():
        rows, seconds = [], {m: 0.0 for m in METHODS}
        for name, (W, G) in tqdm(grams.items(), desc=f"setting {setting}"):
            row = {"matrix": name, "shape": list(W.shape)}
            for m in METHODS:
                t = time.perf_counter()
                out = get_method(m).solver(W, G, pattern)
                seconds[m] += time.perf_counter() - t
                mask = out.mask
                assert is_feasible(mask, pattern) and int((~mask).sum()) == num_pruned(pattern, W.shape), (name, m)
                row[m] = relative_error(W, out.weight, G)
            rows.append(row)
        wins = {m: sum(r["sparsegpt"] < r[m] for r in rows) for m in METHODS if m != "sparsegpt"}
        worst = {m: max(rows, key=lambda r: r["sparsegpt"] / max(r[m], 1e-30)) for m in wins}
        results[setting] = {"matrices": rows, "sparsegpt_below": wins, "n": len(rows), "solver_seconds": seconds,
                            "worst_ratio": {m: {"matrix": w["matrix"], "sparsegpt": w["sparsegpt"], m: w[m]}
                                            for m, w in worst.items()}}
        print(f"{setting}: SparseGPT's error below " +
              ", ".join(f"{m} on {k}/{len(rows)}" for m, k in wins.items()) +
              "; largest SparseGPT/other ratios: " +
              ", ".join(f"{m} {w['sparsegpt'] / w[m]:.3f} ({w['matrix']})" for m, w in worst.items()), flush=True)
    out = {"model": "smollm2-135m", "calib_samples": args.calib_samples, "seqlen": args.seqlen, "seed": args.seed,
           "g_from": "dense model, one forward pass (identical G for every method)",
           "forward_seconds": forward_seconds, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "machine": platform.platform(), "settings": results}
    write_json(Path(args.out), out)
    print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
