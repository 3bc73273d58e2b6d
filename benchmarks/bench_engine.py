"""Load time, per-layer engine time and peak memory of the layer-wise engine on a bundled model.

    .venv/bin/python benchmarks/bench_engine.py                       # SmolLM2-135M, magnitude and wanda
    .venv/bin/python benchmarks/bench_engine.py --calib-samples 32 --seqlen 512

Writes benchmarks/results/engine-<model>.json. Load times: 'cold' converts the bundled GGUF into the
safetensors cache (only measured with --cold, which uses a fresh temporary cache), 'warm' loads the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load_seconds(model: str, cache: str | None) -> float:
    env = dict(os.environ, **({"MINISPARSE_CACHE": cache} if cache else {}))
    code = f"import minisparse as ms; lm = ms.load_model({model!r}); print(lm.load_seconds)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda"])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--cold", action="store_true", help="also time the first load (GGUF conversion)")
    args = ap.parse_args()

    import minisparse as ms
    from minisparse.pipeline import peak_memory

    result = {"model": args.model, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            result["load_cold_seconds"] = _load_seconds(args.model, tmp)
    _load_seconds(args.model, None)  # make sure the cache exists
    result["load_warm_seconds"] = _load_seconds(args.model, None)
    lm = ms.load_model(args.model)
    calib = ms.calibration_batch(lm.tokenizer, ms.load_text("wikipedia", "calib"), args.calib_samples, args.seqlen,
                                 seed=0, bos=lm.bos)
    dense = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result["calibration"] = {"samples": args.calib_samples, "seqlen": args.seqlen, "tokens": int(calib.numel())}
    x = torch.randn(576, 576)
    start = time.perf_counter()
    for _ in range(10):
        x @ x
    result["matmul_576_seconds"] = (time.perf_counter() - start) / 10
    runs = {}
    for method in args.methods:
        lm.model.load_state_dict(dense)
        report = ms.prune_model(lm.model, calib, method, "2:4", progress=True)
        runs[method] = {
            "capture_seconds": report.capture_seconds, "total_seconds": report.total_seconds,
            "layer_seconds": report.layer_seconds,
            "mean_layer_seconds": sum(report.layer_seconds) / len(report.layer_seconds),
            "solver_seconds": sum(m["seconds"] for m in report.matrices),
        }
        print(method, {k: round(v, 2) for k, v in runs[method].items() if k != "layer_seconds"}, flush=True)
    result["runs"] = runs
    result.update(peak_memory(torch.device("cpu")))
    target = HERE / "results" / f"engine-{args.model}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print(target)


if __name__ == "__main__":
    main()
