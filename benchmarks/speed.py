"""Inference speed and memory of pruned weights: dense against sparse kernels, measured.

CPU (this machine): every Linear shape of SmolLM2-135M (576x576, 192x576, 1536x576, 576x1536) in float32
at 50-95% unstructured sparsity, dense ``F.linear`` against torch's sparse CSR (``minisparse.SparseLinear``),
for one token (decode) and 512 tokens (prefill), with 1 and 2 threads; then the whole SmolLM2-135M pruned by
magnitude, all decoder Linears swapped for CSR, prefill of 512 tokens and decode of one token after a
512-token prompt (KV cache), after checking that the sparse model's logits equal the dense pruned model's.

GPU (where one is present; skipped with a message otherwise): Llama-2-7B's shapes (4096x4096, 11008x4096,
4096x11008) in bfloat16 from random weights, 2:4 through ``torch.sparse.to_sparse_semi_structured``
(cuSPARSELt/CUTLASS) and CSR at 70-95%, at 1, 16 and 2048 tokens.

Times are medians of repeated calls after warm-up. The machine may be shared: the load average is
recorded before and after each section. Anchors from the papers: ProxSparse reports 1.3-1.35x on 2:4
linear layers and 1.26x end to end (A100); ELSA 2.56x at 90% and 3.98x at 95% for decode on LLaMA-2-7B
with a dedicated sparse kernel. Results: benchmarks/results/speed_cpu.json (+ .csv), speed_gpu.json.

    .venv/bin/python benchmarks/speed.py            # CPU, about 5 minutes
    .venv/bin/python benchmarks/speed.py --quick    # a smoke run
    .venv/bin/python benchmarks/speed.py --gpu      # on a CUDA machine
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
SMOL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def median_time(fn, repeats: int, warmup: int = 3, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_pruned(shape, sparsity: float, dtype, device, gen) -> torch.Tensor:
    import minisparse as ms

    w = torch.randn(shape, generator=gen).to(dtype)
    return ms.magnitude(w, None, ms.parse_pattern("unstructured", sparsity)).weight.to(device) if sparsity else w.to(device)


def cpu_layers(sparsities, tokens_list, threads_list, repeats) -> list[dict]:
    from minisparse.sparse_linear import SparseLinear, sparse_bytes

    gen = torch.Generator().manual_seed(0)
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for shape in SMOL_SHAPES:
            for s in sparsities:
                w = random_pruned(shape, s, torch.float32, "cpu", gen)
                sp = SparseLinear(w, None, "csr")
                for n in tokens_list:
                    x = torch.randn(n, shape[1], generator=gen)
                    torch.testing.assert_close(sp(x), F.linear(x, w), rtol=1e-4, atol=1e-4)
                    dense = median_time(lambda: F.linear(x, w), repeats)
                    csr = median_time(lambda: sp(x), repeats)
                    rows.append({"device": "cpu", "threads": threads, "shape": f"{shape[0]}x{shape[1]}", "dtype": "float32",
                                 "sparsity": s, "tokens": n, "kernel": "csr", "dense_us": dense * 1e6,
                                 "sparse_us": csr * 1e6, "speedup": dense / csr, **{f"bytes_{k}": v for k, v in sparse_bytes(w).items()}})
                    print(f"  {threads}t {shape[0]:5d}x{shape[1]:<5d} s={s:.2f} n={n:4d}: dense {dense * 1e6:9.1f} us, "
                          f"csr {csr * 1e6:9.1f} us, speedup {dense / csr:5.2f}", flush=True)
    return rows


def cpu_model(sparsities, threads_list, repeats, prompt: int = 512) -> list[dict]:
    import minisparse as ms
    from minisparse.sparse_linear import sparsify_model

    rows = []
    lm = ms.load_model("smollm2-135m")
    ids = ms.eval_windows(lm.tokenizer, ms.load_text("wikipedia", "eval"), prompt + 1, 1)
    prompt_ids, next_id = ids[:, :prompt], ids[:, prompt:prompt + 1]
    dense_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for s in [0.0] + list(sparsities):
        lm.model.load_state_dict(dense_state)
        if s:
            pat = ms.parse_pattern("unstructured", s)
            with torch.no_grad():
                for layer in ms.decoder_layers(lm.model):
                    for lin in ms.prunable_linears(layer).values():
                        lin.weight.copy_(ms.magnitude(lin.weight, None, pat).weight)
        variants = [("dense", lm.model)]
        if s:
            import copy

            sparse_model = copy.deepcopy(lm.model)
            sparsify_model(sparse_model, "csr")
            variants.append(("csr", sparse_model))
        with torch.no_grad():
            ref = lm.model(input_ids=prompt_ids[:, :64], use_cache=False).logits
            for name, model in variants[1:]:
                out = model(input_ids=prompt_ids[:, :64], use_cache=False).logits
                # same model, another kernel: equal up to float32 summation order, which 30 layers amplify
                torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-2)
            for threads in threads_list:
                torch.set_num_threads(threads)
                for name, model in variants:
                    cache = model(input_ids=prompt_ids, use_cache=True).past_key_values

                    def decode():
                        # a fresh copy of the cache each call, so every call decodes at position `prompt`
                        import copy as _c

                        model(input_ids=next_id, past_key_values=_c.deepcopy(cache), use_cache=True)

                    prefill = median_time(lambda: model(input_ids=prompt_ids, use_cache=False), max(3, repeats // 10), warmup=1)
                    copy_only = median_time(lambda: __import__("copy").deepcopy(cache), repeats)
                    dec = median_time(decode, repeats) - copy_only
                    rows.append({"device": "cpu", "threads": threads, "model": "smollm2-135m", "sparsity": s,
                                 "kernel": name, "prefill_ms": prefill * 1e3, "decode_ms": dec * 1e3, "prompt": prompt})
                    print(f"  model s={s:.2f} {name:5s} {threads}t: prefill {prefill * 1e3:8.1f} ms, decode {dec * 1e3:7.2f} ms",
                          flush=True)
    return rows


def gpu_layers(sparsities, repeats) -> list[dict]:
    from minisparse.sparse_linear import SparseLinear

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in LLAMA7B_SHAPES:
        w24 = random_pruned(shape, 0.0, torch.bfloat16, "cpu", gen)
        import minisparse as ms

        w24 = ms.magnitude(w24.float(), None, ms.parse_pattern("2:4")).weight.to(torch.bfloat16).to(dev)
        cases = [("2:4", 0.5, w24)] + [("csr", s, random_pruned(shape, s, torch.bfloat16, dev, gen)) for s in sparsities]
        for kind, s, w in cases:
            try:
                sp = SparseLinear(w, None, kind)
            except (RuntimeError, ValueError) as err:
                print(f"  {kind} on {shape}: not available ({err})")
                continue
            for n in (1, 16, 2048):
                x = torch.randn(n, shape[1], device=dev, dtype=torch.bfloat16)
                try:
                    dense = median_time(lambda: F.linear(x, w), repeats, sync=sync)
                    sparse = median_time(lambda: sp(x), repeats, sync=sync)
                except RuntimeError as err:
                    print(f"  {kind} {shape} n={n}: failed ({err})")
                    continue
                rows.append({"device": torch.cuda.get_device_name(), "shape": f"{shape[0]}x{shape[1]}", "dtype": "bfloat16",
                             "sparsity": s, "tokens": n, "kernel": kind, "dense_us": dense * 1e6, "sparse_us": sparse * 1e6,
                             "speedup": dense / sparse})
                print(f"  {kind:4s} {shape} s={s:.2f} n={n:5d}: dense {dense * 1e6:9.1f} us, sparse {sparse * 1e6:9.1f} us, "
                      f"speedup {dense / sparse:5.2f}", flush=True)
    return rows


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two sparsities, few repeats, no full model")
    ap.add_argument("--gpu", action="store_true", help="run the CUDA section (Llama-2-7B shapes, bf16)")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    sparsities = [0.5, 0.9] if args.quick else [0.5, 0.7, 0.8, 0.9, 0.95]
    repeats = 5 if args.quick else args.repeats
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here; the GPU section runs only on a machine with one")
        load0 = os.getloadavg()
        rows = gpu_layers([0.7, 0.8, 0.9, 0.95], repeats)
        write_json(HERE / "results" / "speed_gpu.json", {"machine": machine(), "load": [load0, os.getloadavg()],
                                                         "layers": rows, "command": " ".join(sys.argv)})
        return
    result = {"machine": machine(), "command": " ".join(sys.argv), "quick": args.quick}
    print("Linear layers (CPU, float32)")
    load0 = os.getloadavg()
    result["layers"] = cpu_layers(sparsities, [1, 512], [1, 2], repeats)
    result["layers_load"] = [load0, os.getloadavg()]
    name = "speed_cpu_quick" if args.quick else "speed_cpu"
    write_json(HERE / "results" / f"{name}.json", result)  # the layer rows survive a failure below
    if not args.quick:
        print("SmolLM2-135M, magnitude-pruned, all decoder Linears as CSR")
        load0 = os.getloadavg()
        result["model"] = cpu_model([0.5, 0.7, 0.9, 0.95], [1, 2], repeats)
        result["model_load"] = [load0, os.getloadavg()]
    write_json(HERE / "results" / f"{name}.json", result)
    write_csv(result["layers"], HERE / "results" / f"{name}.csv", "threads")
    print(HERE / "results" / f"{name}.json")


if __name__ == "__main__":
    main()
