"""Check the memory model of `minisparse plan` against measured peak RSS on this CPU.

Each measurement runs in a fresh subprocess (peak RSS is per process): load a model, draw the
calibration batch, prune with the engine (no evaluation), report ``ru_maxrss``. Models: randomly
initialised Llama-shaped configs of several sizes (saved once as checkpoints with the bundled
tokenizer) and the bundled SmolLM2-135M. The prediction is ``plan(...)["host_peak_bytes"]`` for the same
settings; the runtime constant is measured first by a process that imports everything and loads the
tokenizer. End-to-end methods (elsa, elsa-l, proxsparse) run three training steps instead of pruning.
Results go to benchmarks/results/memory.json; rows of an earlier run that this run does not repeat are kept.

    .venv/bin/python benchmarks/bench_memory.py                 # every case
    .venv/bin/python benchmarks/bench_memory.py --cases e2e     # only the end-to-end methods
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "memory.json"

CONFIGS = {
    "llama-h256-l4": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4),
    "llama-h512-l6": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                          num_key_value_heads=4),
    "llama-h1024-l4": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=8),
}

CHILD = r"""
import json, sys, torch
mode, path, method, n, seqlen = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import minisparse as ms
from transformers import AutoTokenizer
if mode == "runtime":
    tok = AutoTokenizer.from_pretrained(path)
    text = ms.load_text("wikipedia", "calib")
    ids = ms.tokenize(tok, text)  # every run tokenizes its calibration text
elif mode == "train":
    # end-to-end: `n` is the training batch; a few steps reach the steady-state peak (moments allocated)
    lm = ms.load_model(path)
    stream = ms.tokenize(lm.tokenizer, ms.load_text("wikipedia", "calib"))
    from minisparse.admm import elsa
    from minisparse.proxsparse import proxsparse
    if method == "proxsparse":
        proxsparse(lm.model, stream, "2:4", steps=3, batch_size=n, seqlen=seqlen, progress=False)
    else:
        elsa(lm.model, stream, ms.parse_pattern("unstructured", 0.5), steps=3, batch_size=n, seqlen=seqlen, interval=2,
                low_precision=method == "elsa-l", optimizer="adamw8bit" if method == "elsa-l" else "adamw",
                progress=False)
else:
    lm = ms.load_model(path)
    text = ms.load_text("wikipedia", "calib")
    ids = ms.calibration_batch(lm.tokenizer, text, n, seqlen, seed=0, bos=lm.bos)
    opts = {"iterations": 5} if method == "sparsefw" else {}
    ms.prune_model(lm.model, ids, method, "unstructured", sparsity=0.5, progress=False, solver_options=opts)
# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child forked from a big parent would
# report the parent's peak
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"peak_rss_bytes": int(hwm) * 1024}))
"""


def _child(*args: str) -> int:
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if res.returncode:
        raise RuntimeError(f"measurement {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def _make_checkpoints(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import minisparse as ms

    lm = ms.load_model("smollm2-135m")
    out = {}
    for name, kw in CONFIGS.items():
        d = root / name
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(lm.tokenizer), max_position_embeddings=2048, tie_word_embeddings=True, **kw)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
        out[name] = d
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", choices=["all", "layerwise", "e2e"], default="all")
    args = ap.parse_args()
    from minisparse.models import BUNDLED, cache_dir  # noqa: F401
    from minisparse.plan import plan

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = _make_checkpoints(Path(tmp))
        smol_dir = Path(cache_dir()) / "models" / "smollm2-135m"
        runtime = _child("runtime", str(smol_dir), "-", "0", "0")
        print("runtime", runtime / 2**20, "MiB", flush=True)
        cases = [(name, str(path), m, n, L) for name, path in ckpts.items()
                 for m, n, L in (("wanda", 32, 256), ("sparsegpt", 32, 256), ("sparsefw", 16, 512))]
        cases += [("smollm2-135m", "smollm2-135m", m, n, L) for m, n, L in (("wanda", 32, 512), ("sparsegpt", 64, 512))]
        # end-to-end methods: n = windows per training step
        cases += [(name, str(path), m, 2, 256) for name, path in ckpts.items() for m in ("elsa", "elsa-l", "proxsparse")]
        cases += [("smollm2-135m", "smollm2-135m", m, 1, 256) for m in ("elsa", "elsa-l", "proxsparse")]
        is_e2e = lambda m: m in ("elsa", "elsa-l", "proxsparse")  # noqa: E731
        cases = [c for c in cases if args.cases == "all" or (args.cases == "e2e") == is_e2e(c[2])]
        for name, path, method, n, L in cases:
            e2e = method in ("elsa", "elsa-l", "proxsparse")
            measured = _child("train" if e2e else "prune", path, method, str(n), str(L))
            cfg_src = path if name != "smollm2-135m" else "smollm2-135m"
            pred = plan(cfg_src, method, calib_samples=n, seqlen=L, batch_size=8, steps_batch=n, runtime_bytes=runtime)
            rows.append({"model": name, "method": method, "calib_samples": None if e2e else n,
                         "batch": n if e2e else None, "seqlen": L,
                         "measured_bytes": measured, "predicted_bytes": pred["host_peak_bytes"],
                         "ratio": pred["host_peak_bytes"] / measured, "terms": pred["terms"]})
            print(name, method, n, L, f"measured {measured / 2**20:.0f} MiB predicted "
                  f"{pred['host_peak_bytes'] / 2**20:.0f} MiB ratio {rows[-1]['ratio']:.3f}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    key = lambda r: (r["model"], r["method"], r.get("calib_samples"), r.get("batch"), r["seqlen"])  # noqa: E731
    if OUT.exists():
        done = {key(r) for r in rows}
        rows = [r for r in json.loads(OUT.read_text())["rows"] if key(r) not in done] + rows
    OUT.write_text(json.dumps({"runtime_bytes": runtime, "rows": rows, "machine": platform.platform(),
                               "cpu_count": os.cpu_count(), "max_ratio_error": max(abs(r["ratio"] - 1) for r in rows)},
                              indent=1) + "\n")
    print(OUT)


if __name__ == "__main__":
    main()
