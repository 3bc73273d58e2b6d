"""SparseFW on the bundled SmolLM2-135M: perplexity, per-matrix error reduction, and the iteration curve.

Same protocol as benchmarks/baseline.py: 128 calibration windows of 512 tokens (seed 0) from the
calibration half of the bundled Wikipedia, perplexity on 100 windows of 512 tokens of the evaluation
half. Each (warm start, alpha, iterations, setting) writes its own JSON under
benchmarks/results/sparsefw/ as soon as it finishes; finished runs are skipped, so the benchmark runs
in parts across sessions:

    .venv/bin/python benchmarks/sparsefw.py --settings 0.6 2:4 --alphas 0.9
    .venv/bin/python benchmarks/sparsefw.py --curve --layers 3 15 27     # layer error vs iterations
    .venv/bin/python benchmarks/sparsefw.py --timing --layers 3 --iterations 100 --settings 0.6 2:4
    .venv/bin/python benchmarks/sparsefw.py --summarize                  # rebuild sparsefw.csv

Every run goes through minisparse.pipeline.prune_and_evaluate, the function behind `minisparse prune`:

    minisparse prune --method sparsefw --sparsity 0.6 -o alpha=0.9 -o warm_start=wanda -o iterations=200 --out DIR

The curve mode runs the solver alone on the Gram matrices of a few decoder layers of the *unpruned*
model (no perplexity) and records, every few iterations, the relaxed objective, the duality gap and the
objective of the rounded mask, relative to the warm start.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from _common import pattern_args, tag, write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "sparsefw"
BASELINE = HERE / "results" / "baseline"








def run_name(warm: str, alpha: float, iterations: int, step: str, setting: str) -> str:
    return f"{warm}-a{alpha:g}-T{iterations}-{step}-{tag(setting)}"


def runs(args) -> None:
    from minisparse.pipeline import prune_and_evaluate

    for setting in args.settings:
        for warm in args.warm_starts:
            for alpha in args.alphas:
                path = OUT / f"{run_name(warm, alpha, args.iterations, args.step, setting)}.json"
                if path.exists() and not args.redo:
                    continue
                pattern, sparsity = pattern_args(setting)
                options = {"alpha": alpha, "warm_start": warm, "iterations": args.iterations, "step": args.step}
                _, result = prune_and_evaluate("smollm2-135m", "sparsefw", pattern, sparsity,
                                               calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed,
                                               eval_windows=args.eval_windows, evaluate_dense=False,
                                               solver_options=options, progress=True)
                result["torch_threads"] = torch.get_num_threads()
                write_json(path, result)
                print(path.name, "ppl", round(result["pruned_ppl"], 2), "prune s", round(result["prune_seconds"]),
                      flush=True)


def curve(args) -> None:
    from minisparse import calibration_batch, collect_grams, load_model, load_text, parse_pattern, sparsefw

    lm = load_model("smollm2-135m")
    ids = calibration_batch(lm.tokenizer, load_text("wikipedia", "calib"), args.calib_samples, args.seqlen,
                            seed=args.seed, bos=lm.bos)
    for setting in args.settings:
        pattern, sparsity = pattern_args(setting)
        pat = parse_pattern(pattern, sparsity)
        for layer in args.layers:
            path = OUT / "curve" / f"layer{layer}-{tag(setting)}-T{args.iterations}-{args.step}.json"
            if path.exists() and not args.redo:
                continue
            grams = collect_grams(lm.model, ids, layer)
            out = {"layer": layer, "setting": setting, "iterations": args.iterations, "step": args.step,
                   "calib": f"{args.calib_samples}x{args.seqlen} seed {args.seed}", "matrices": {}}
            for name, (W, G) in grams.items():
                for warm in args.warm_starts:
                    for alpha in args.alphas:
                        t0 = time.perf_counter()
                        res = sparsefw(W, G, pat, iterations=args.iterations, alpha=alpha, warm_start=warm,
                                       step=args.step, trace_every=args.trace_every, trace_rounded=True)
                        s = res.stats
                        out["matrices"][f"{name}|{warm}|{alpha:g}"] = {
                            k: s[k] for k in ("objective_dense", "objective_warm", "objective_relaxed",
                                              "objective_rounded", "lower_bound", "gap", "seconds_per_iteration",
                                              "matmul_seconds", "iteration_over_matmul", "trace")}
                        print(layer, name, warm, alpha, f"reduction {s['reduction_rounded']:.3f}",
                              f"{time.perf_counter() - t0:.1f}s", flush=True)
            write_json(path, out)


def timing(args) -> None:
    """Seconds per FW iteration against one dense W @ G, for every matrix of a few layers."""
    from minisparse import calibration_batch, collect_grams, load_model, load_text, parse_pattern, sparsefw

    lm = load_model("smollm2-135m")
    ids = calibration_batch(lm.tokenizer, load_text("wikipedia", "calib"), 16, 256, seed=args.seed, bos=lm.bos)
    rows = []
    for layer in args.layers:
        for name, (W, G) in collect_grams(lm.model, ids, layer).items():
            for setting in args.settings:
                pattern, sparsity = pattern_args(setting)
                for alpha in args.alphas:
                    s = sparsefw(W, G, parse_pattern(pattern, sparsity), iterations=args.iterations, alpha=alpha,
                                 step=args.step).stats
                    rows.append({"layer": layer, "matrix": name, "shape": list(W.shape), "setting": setting,
                                 "alpha": alpha, "seconds_per_iteration": s["seconds_per_iteration"],
                                 "matmul_seconds": s["matmul_seconds"], "ratio": s["iteration_over_matmul"],
                                 "updates": {k: s[k] for k in ("dense_updates", "direct_updates", "delta_updates")}})
                    print(rows[-1], flush=True)
    import platform
    write_json(OUT / "timing.json", {"rows": rows, "iterations": args.iterations, "threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "machine": platform.platform(),
                                 "load_average": list(os.getloadavg())})


def summarize() -> Path:
    rows = []
    for path in sorted(OUT.glob("*-fw-*.json")):  # one file per run; timing.json and curve/ are not runs
        r = json.loads(path.read_text())
        mats = r["engine"]["matrices"]
        opts = r["solver_options"]
        red = [m["stats"]["reduction_vs_warm"] for m in mats]
        red_r = [m["stats"]["reduction_rounded"] for m in mats]
        ratio = [m["stats"]["iteration_over_matmul"] for m in mats if m["stats"].get("iteration_over_matmul")]
        spi = [m["stats"]["seconds_per_iteration"] for m in mats if m["stats"].get("seconds_per_iteration")]
        setting = r["pattern"].replace("unstructured:", "")
        warm_file = BASELINE / f"{opts['warm_start']}-{tag(setting)}.json"
        warm_ppl = json.loads(warm_file.read_text())["pruned_ppl"] if warm_file.exists() else None
        rows.append({
            "warm_start": opts["warm_start"], "alpha": opts["alpha"], "iterations": opts["iterations"],
            "step": opts.get("step", "fw"), "pattern": r["pattern"], "ppl": round(r["pruned_ppl"], 3),
            "warm_ppl": round(warm_ppl, 3) if warm_ppl else "",
            "median_reduction": round(statistics.median(red), 4), "mean_reduction": round(statistics.mean(red), 4),
            "median_reduction_rounded": round(statistics.median(red_r), 4),
            "used_warm": sum(m["stats"]["used"] == "warm" for m in mats), "matrices": len(mats),
            "mean_rel_error": round(statistics.mean(m["rel_error"] for m in mats), 5),
            "median_seconds_per_iteration": round(statistics.median(spi), 5) if spi else "",
            "median_iteration_over_matmul": round(statistics.median(ratio), 3) if ratio else "",
            "prune_seconds": round(r["prune_seconds"], 1), "threads": r.get("torch_threads", ""),
            "calib": f'{r["calibration"]["samples"]}x{r["calibration"]["seqlen"]} seed {r["calibration"]["seed"]}',
        })
    target = HERE / "results" / "sparsefw.csv"
    return write_csv(rows, target, "warm_start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["0.6", "2:4"], help="sparsities (unstructured) or N:M")
    ap.add_argument("--warm-starts", nargs="+", default=["wanda"], choices=["wanda", "ria", "magnitude"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.9])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--step", default="fw", choices=["fw", "line"])
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=100)
    ap.add_argument("--curve", action="store_true", help="layer error against iterations on a few layers")
    ap.add_argument("--timing", action="store_true", help="seconds per iteration against one W @ G, per matrix")
    ap.add_argument("--layers", nargs="+", type=int, default=[3, 15, 27])
    ap.add_argument("--trace-every", type=int, default=25)
    ap.add_argument("--redo", action="store_true", help="rerun runs that already have a result")
    ap.add_argument("--summarize", action="store_true", help="only rebuild sparsefw.csv")
    args = ap.parse_args()
    if args.curve:
        curve(args)
        return
    if args.timing:
        timing(args)
        return
    if not args.summarize:
        runs(args)
    print(summarize())


if __name__ == "__main__":
    main()
