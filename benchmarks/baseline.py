"""Baseline table: magnitude, Wanda, RIA and SparseGPT on the bundled SmolLM2-135M.

Settings: 50/60/70/80% unstructured and 2:4; 128 calibration windows of 512 tokens (seed 0) from the
calibration half of the bundled Wikipedia; perplexity on 100 windows of 512 tokens of the evaluation half.
Each (method, setting) writes its own JSON under benchmarks/results/baseline/ as soon as it finishes, and
finished runs are skipped, so the benchmark can be run in parts:

    .venv/bin/python benchmarks/baseline.py                 # everything still missing
    .venv/bin/python benchmarks/baseline.py --methods wanda --settings 2:4
    .venv/bin/python benchmarks/baseline.py --summarize     # rebuild baseline.csv from the JSON files

Every run goes through minisparse.pipeline.prune_and_evaluate, the function behind `minisparse prune`,
so a row can be reproduced with e.g.
    minisparse prune --method wanda --pattern 2:4 --calib-samples 128 --seqlen 512 --seed 0 --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minisparse.evaluate import perplexity
from minisparse.models import load_model
from minisparse.pipeline import prune_and_evaluate

from _common import pattern_args, write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "baseline"
METHODS = ["magnitude", "wanda", "ria", "sparsegpt"]
SETTINGS = ["0.5", "0.6", "0.7", "0.8", "2:4"]






def summarize() -> Path:
    rows = []
    dense = json.loads((OUT / "dense.json").read_text()) if (OUT / "dense.json").exists() else None
    for path in sorted(OUT.glob("*.json")):
        if path.name == "dense.json":
            continue
        r = json.loads(path.read_text())
        errs = [m["rel_error"] for m in r["engine"]["matrices"]]
        rows.append({
            "method": r["method"], "pattern": r["pattern"], "requested_sparsity": r["requested_sparsity"],
            "measured_sparsity": round(r["measured_sparsity"], 6), "ppl": round(r["pruned_ppl"], 3),
            "dense_ppl": round(dense["ppl"], 3) if dense else "",
            "mean_rel_error": round(sum(errs) / len(errs), 5), "prune_seconds": round(r["prune_seconds"], 1),
            "seconds_per_layer": round(sum(r["engine"]["layer_seconds"]) / len(r["engine"]["layer_seconds"]), 2),
            "calib": f'{r["calibration"]["samples"]}x{r["calibration"]["seqlen"]} seed {r["calibration"]["seed"]}',
            "eval": f'{r["eval"]["windows"]}x{r["eval"]["seqlen"]}',
        })
    target = HERE / "results" / "baseline.csv"
    return write_csv(rows, target, "method")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--settings", nargs="+", default=SETTINGS, help="sparsities (unstructured) or N:M")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=100)
    ap.add_argument("--redo", action="store_true", help="rerun runs that already have a result")
    ap.add_argument("--redo-dense", action="store_true", help="re-measure the dense perplexity (dense.json)")
    ap.add_argument("--summarize", action="store_true", help="only rebuild baseline.csv")
    args = ap.parse_args()
    if not args.summarize:
        if not (OUT / "dense.json").exists() or args.redo_dense:
            lm = load_model("smollm2-135m")
            dense = perplexity(lm.model, lm.tokenizer, None, args.seqlen, args.eval_windows, progress=True)
            write_json(OUT / "dense.json", {**dense, "torch_threads": torch.get_num_threads()})
            print("dense", dense["ppl"], flush=True)
        for setting in args.settings:
            for method in args.methods:
                path = OUT / f"{method}-{setting.replace(':', 'of')}.json"
                if path.exists() and not args.redo:
                    continue
                pattern, sparsity = pattern_args(setting)
                _, result = prune_and_evaluate("smollm2-135m", method, pattern, sparsity,
                                               calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed,
                                               eval_windows=args.eval_windows, evaluate_dense=False, progress=True)
                write_json(path, result)
                print(method, setting, "ppl", round(result["pruned_ppl"], 2), "prune s", round(result["prune_seconds"]),
                      flush=True)
    print(summarize())


if __name__ == "__main__":
    main()
