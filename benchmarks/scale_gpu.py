"""The same code at 7B: time and peak memory of pruning a randomly initialised model of a real shape,
against the memory model of `minisparse plan`.

Written for a lent GPU, where no model weights or tokenizer can be carried: the model is built from its
config (Llama-2-7B's by default, shipped in minisparse.plan) with random weights, and the calibration or
training tokens are random ids. Time and memory do not depend on the values; quality is not measured here.
``--num-layers`` truncates the depth to fit a short call: the time per layer and the device memory of the
layer-wise engine do not depend on depth (one layer at a time on the device); host memory does, and the
plan is computed for the same truncated config.

    # on a GPU machine (each well under 10 minutes on an H100):
    python benchmarks/scale_gpu.py --method wanda --num-layers 4
    python benchmarks/scale_gpu.py --method sparsegpt --num-layers 4
    python benchmarks/scale_gpu.py --method sparsefw --num-layers 2 -o iterations=50
    python benchmarks/scale_gpu.py --method elsa-l --steps 3 --batch-size 1 --seqlen 2048
    python benchmarks/scale_gpu.py --method elsa --steps 3 --batch-size 1 --seqlen 2048 --num-layers 16

Layer-wise methods run `minisparse.prune_model(..., device="cuda")`; ELSA / ELSA-L run `minisparse.admm.elsa`
on the model on the GPU in bf16 with gradient checkpointing (ELSA-L: FP8 z, BF16 u, 8-bit AdamW). Each case
writes benchmarks/results/scale/<model>-<method>-L<layers>-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
LAYERWISE = ("magnitude", "wanda", "ria", "sparsegpt", "sparsefw")
END2END = ("elsa", "elsa-l")


def host_peak_bytes() -> int:
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def build_model(config: dict, dtype: torch.dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", "llama")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", help="a config known to minisparse.plan, a config.json or a hub id")
    ap.add_argument("--config-override", default="{}", help="JSON merged into the config, e.g. for a tiny test")
    ap.add_argument("--method", default="sparsegpt", choices=LAYERWISE + END2END)
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (default: %(default)s)")
    ap.add_argument("--num-layers", type=int, default=None, help="truncate the depth (default: the full model)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="layer-wise: windows per forward; ELSA: windows per step")
    ap.add_argument("--steps", type=int, default=3, help="ELSA / ELSA-L optimizer steps")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="solver option")
    ap.add_argument("--out-dir", default=str(HERE / "results" / "scale"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import minisparse as ms
    from minisparse.methods import parse_option
    from minisparse.plan import load_config, plan

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine; this benchmark is meant for a GPU "
                         "(use --device cpu with a small --config-override to try it here)")
    config = {**load_config(args.model), **json.loads(args.config_override)}
    if args.num_layers:
        config["num_hidden_layers"] = args.num_layers
    dtype = getattr(torch, args.dtype)
    options = dict(parse_option(o) for o in args.option)
    pattern = ms.parse_pattern("unstructured", args.sparsity)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(config, dtype, args.seed)
    build_seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"model": args.model, "config": config, "method": args.method, "pattern": str(pattern),
              "dtype": args.dtype, "device": str(device), "command": " ".join(["benchmarks/scale_gpu.py"] + (argv or sys.argv[1:])),
              "build_seconds": build_seconds, "torch": torch.__version__, "machine": platform.platform(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "note": "random weights and random token ids: time and memory only, no quality"}
    t0 = time.perf_counter()
    if args.method in LAYERWISE:
        calib = torch.randint(0, config["vocab_size"], (args.calib_samples, args.seqlen), generator=gen)
        report = ms.prune_model(model, calib, args.method, pattern, device=device, batch_size=args.batch_size,
                                solver_options=options, progress=True)
        result.update(seconds=time.perf_counter() - t0, measured_sparsity=report.sparsity,
                      layer_seconds=report.to_dict().get("layer_seconds"))
        pred = plan(config, args.method, calib_samples=args.calib_samples, seqlen=args.seqlen, batch_size=args.batch_size,
                    dtype=args.dtype, device="cuda" if device.type == "cuda" else "cpu")
    else:
        from minisparse.admm import elsa

        low = args.method == "elsa-l"
        model.to(device)
        stream = torch.randint(0, config["vocab_size"], (max(4 * args.seqlen, 200_000),), generator=gen)
        out = elsa(model, stream, pattern, steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen,
                   interval=max(1, args.steps - 1), grad_checkpointing=True, low_precision=low,
                   optimizer="adamw8bit" if low else "adamw", log_every=1, progress=False, **options)
        seconds = time.perf_counter() - t0
        from minisparse.train import prunable_parameters

        params = prunable_parameters(model)
        zeros = sum(int((p == 0).sum()) for p in params.values())
        result.update(seconds=seconds, seconds_per_step_incl_first=seconds / args.steps,
                      measured_sparsity=zeros / sum(p.numel() for p in params.values()),
                      admm_state_bytes_per_param=out.get("admm_state_bytes_per_param"), tokens=out.get("tokens"))
        pred = plan(config, args.method, steps_batch=args.batch_size, seqlen=args.seqlen, dtype=args.dtype,
                    device="cuda" if device.type == "cuda" else "cpu", grad_checkpointing=True)
    result["host_peak_bytes"] = host_peak_bytes()
    if device.type == "cuda":
        result["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["device_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["device_ratio_predicted_over_reserved"] = pred["device_peak_bytes"] / result["device_peak_reserved_bytes"]
    result["plan"] = {"device_peak_bytes": pred["device_peak_bytes"], "host_peak_bytes": pred["host_peak_bytes"],
                      "terms": pred["terms"]}
    result["host_ratio_predicted_over_measured"] = pred["host_peak_bytes"] / result["host_peak_bytes"]
    name = f"{Path(args.model).name}-{args.method}-L{config['num_hidden_layers']}-{device.type}.json"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / name, result)
    gib = 2**30
    print(f"{args.model} ({config['num_hidden_layers']} layers) {args.method}: {result['seconds']:.1f} s, "
          f"host peak {result['host_peak_bytes'] / gib:.2f} GiB (plan {pred['host_peak_bytes'] / gib:.2f})"
          + (f", GPU peak reserved {result['device_peak_reserved_bytes'] / gib:.2f} GiB (plan "
             f"{pred['device_peak_bytes'] / gib:.2f})" if device.type == "cuda" else "") + f" -> {out_dir / name}")
    return result


if __name__ == "__main__":
    run()
