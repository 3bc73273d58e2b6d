"""The same code at 7B: time and peak memory of pruning a randomly initialised model of a real shape on one
GPU, against the memory model of `minisparse plan`.

Written for a lent GPU machine that has no network and receives at most a few MiB of files: no model weights
and no tokenizer can reach it. So:

- the model is built from its config (Llama-2-7B's by default, shipped in minisparse.plan) with random
  weights. Its parameters are created on the meta device (no memory, no default initialisation, which
  takes minutes at 7B), then allocated on the host in the requested dtype and filled with seeded normal
  values (std 0.02; norm weights 1, biases 0), one parameter at a time from its own generator, in a
  thread pool: the values do not depend on the number of threads. Buffers (the rotary frequencies) are
  built normally.
- calibration and training tokens are seeded random ids. Time and memory do not depend on the values
  (dense kernels, a fixed number of solver iterations); quality (perplexity, layer-wise error) is *not*
  measured here and means nothing on a random model.
- ``--num-layers N`` truncates the depth so that a case fits a short call. For the layer-wise engine the
  time per layer and the device memory do not depend on depth (one decoder layer on the device at a
  time); host memory and total time do. The plan is computed for the same truncated config, so the
  comparison stays like for like.

Layer-wise methods run ``minisparse.prune_model(model, calib, method, pattern, device=...)`` with the model on
the host (what ``minisparse prune --device cuda`` does). ELSA / ELSA-L build the model on the host, move it to
the device and run ``minisparse.admm.elsa`` with gradient checkpointing, in bf16; ELSA-L with FP8 z, BF16 u
and 8-bit AdamW, ELSA with float32 z and u and torch's AdamW. A step is timed from the model's forward to the
end of the optimizer step; the ADMM z/u update that follows every ``--interval`` steps is timed apart; the
first step (allocations, kernel selection) is excluded from the means.

Each case writes one JSON to benchmarks/results/scale/, named by model, method, depth, settings, dtype and
device, with the machine, the command line, the measurements, the plan and measured/predicted ratios, and
prints a table of every result in that folder (``--summarize`` prints only the table).

On a GPU machine (one NVIDIA H100 80 GB; each command is meant to take well under 10 minutes, mostly
building and filling the random model):

    python benchmarks/scale_gpu.py --model llama-2-7b --method wanda --num-layers 4
    python benchmarks/scale_gpu.py --model llama-2-7b --method sparsegpt --num-layers 4
    python benchmarks/scale_gpu.py --model llama-2-7b --method sparsefw --num-layers 2 -o iterations=50
    python benchmarks/scale_gpu.py --model llama-2-7b --method elsa-l --steps 3 --batch-size 1 --seqlen 2048
    python benchmarks/scale_gpu.py --model llama-2-7b --method elsa-l --steps 3 --batch-size 1 --seqlen 2048 --num-layers 16
    python benchmarks/scale_gpu.py --model llama-2-7b --method elsa --steps 3 --batch-size 1 --seqlen 2048 --num-layers 16
    python benchmarks/scale_gpu.py --model llama-2-7b --method wanda --placement device
    python benchmarks/scale_gpu.py --summarize

(layer-wise: 128 calibration windows of 2048 tokens by default, as in the papers. SparseFW runs 50
Frank-Wolfe iterations by default here, not the 500 of `minisparse prune` or the paper's 2000: its
per-matrix seconds per iteration are recorded, to scale up. ELSA keeps float32 z and u and cannot run at
full depth on 80 GB (`minisparse plan --model llama-2-7b --method elsa --batch-size 1 --grad-checkpointing`
predicts 123 GiB); at 16 of 32 layers it is compared with ELSA-L at the same depth. If a case runs out of
memory the script says so and writes nothing. The wanda case with --placement device keeps the whole
32-layer model on the GPU, as `minisparse prune --device cuda` does today, and is compared with the plan
plus the weights of the other layers.)

On a CPU, at tiny scale (what tests/test_scale_script.py runs):

    python benchmarks/scale_gpu.py --device cpu --dtype bfloat16 --num-layers 2 --calib-samples 4 --seqlen 32 \\
        --config-override '{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512}'
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
LAYERWISE = ("magnitude", "wanda", "ria", "sparsegpt", "sparsefw")
END2END = ("elsa", "elsa-l")
SPARSEFW_ITERATIONS = 50
# elsa() arguments this script sets from its own flags; passing them with -o would be ambiguous
_E2E_FIXED = {"steps": "--steps", "batch_size": "--batch-size", "seqlen": "--seqlen", "interval": "--interval",
              "grad_checkpointing": None, "low_precision": "--method elsa-l", "optimizer": "--method elsa-l",
              "log_every": None, "progress": "--no-progress", "seed": "--seed"}
GiB = 2**30


# -- host memory ------------------------------------------------------------------------------------------
def host_peak_bytes() -> int:
    """Peak resident set size of this process (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_host_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- the random model -------------------------------------------------------------------------------------
@contextmanager
def _parameters_on_meta():
    """Every nn.Parameter registered inside the block is moved to the meta device as it is registered,
    before the module's own initialisation runs, so that runs on meta (free). Buffers stay real."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            self._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_model(config: dict, dtype: torch.dtype, seed: int, device: str | torch.device = "cpu",
                std: float = 0.02, workers: int | None = None) -> nn.Module:
    """A causal LM of ``config``'s shape with seeded random weights on ``device`` (see the module docstring).

    Parameter k (in registration order) is drawn from its own generator seeded by (seed, k); tied
    parameters stay tied.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", "llama")
    hf_cfg = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k not in ("architectures",)})
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    device = torch.device(device)
    new_of: dict[int, nn.Parameter] = {}
    jobs: list[tuple[str, torch.Tensor]] = []
    for mod_name, mod in model.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in new_of:
                new_of[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                             requires_grad=p.requires_grad)
                jobs.append((f"{mod_name}.{name}", new_of[id(p)]))
            mod._parameters[name] = new_of[id(p)]

    def fill(job: tuple[int, tuple[str, torch.Tensor]]) -> None:
        k, (name, t) = job
        with torch.no_grad():
            if t.ndim < 2:
                t.fill_(1.0 if ("norm" in name.lower() and name.endswith("weight")) else 0.0)
            else:
                gen = torch.Generator(device=t.device).manual_seed(seed * 1_000_003 + k)
                t.normal_(0.0, std, generator=gen)

    with ThreadPoolExecutor(workers or max(1, torch.get_num_threads())) as pool:
        list(pool.map(fill, enumerate(jobs)))
    return model.eval()


def random_tokens(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# -- bookkeeping ------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return _slug(torch.cuda.get_device_name(device)).removeprefix("nvidia-")


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    return info


def result_name(args: argparse.Namespace, config: dict, device: torch.device) -> str:
    model = _slug(Path(args.model).name)
    pattern = args.pattern.replace(":", "of") if ":" in args.pattern else \
        f"{'s' if args.pattern == 'unstructured' else args.pattern}{args.sparsity:g}"
    if args.method in LAYERWISE:
        settings = f"n{args.calib_samples}x{args.seqlen}-b{args.batch_size}" + \
            ("-on-device" if args.placement == "device" else "")
    else:
        settings = f"steps{args.steps}-b{args.batch_size}x{args.seqlen}-i{args.interval}"
    opts = "".join(f"-{_slug(f'{k}{v}')}" for k, v in sorted(args.options.items()))
    return f"{model}-{args.method}-L{config['num_hidden_layers']}-{pattern}-{settings}{opts}-{args.dtype}-{device_tag(device)}.json"


def _scalar_stats(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, bool, str)) or v is None}


def _count_zeros(model: nn.Module) -> dict:
    from minisparse.train import prunable_parameters

    params = prunable_parameters(model)
    zeros = {n: int((p.detach() == 0).sum()) for n, p in params.items()}
    numel = {n: p.numel() for n, p in params.items()}
    return {"sparsity": sum(zeros.values()) / sum(numel.values()),
            "min_matrix_sparsity": min(zeros[n] / numel[n] for n in params),
            "max_matrix_sparsity": max(zeros[n] / numel[n] for n in params)}


# -- the two kinds of case ------------------------------------------------------------------------------
def _layerwise(args, model, config, device, pattern) -> dict:
    import minisparse as ms

    calib = random_tokens((args.calib_samples, args.seqlen), config["vocab_size"], args.seed + 1)
    if args.placement == "device":
        model.to(device)
    report = ms.prune_model(model, calib, args.method, pattern, device=device, batch_size=args.batch_size,
                            solver_options=args.options, progress=not args.no_progress)
    layers = report.layer_seconds
    steady = layers[1:] or layers
    return {"seconds": report.total_seconds, "capture_seconds": report.capture_seconds,
            "layer_seconds": layers, "seconds_per_layer": sum(steady) / len(steady),
            "seconds_per_layer_note": "mean over layers after the first (each includes moving the layer to the "
                                      "device and back, collecting G, the solver on 7 matrices, recomputing outputs)",
            "calib_tokens": report.calib_tokens, "reported_sparsity": report.sparsity,
            "matrices": [{"layer": m["layer"], "name": m["name"], "shape": m["shape"], "seconds": m["seconds"],
                          "sparsity": m["sparsity"], "stats": _scalar_stats(m["stats"])} for m in report.matrices]}


class _StepClock:
    """Timestamps (and, on CUDA, peak memory) at the start of each forward and at the end of each
    optimizer step, from a forward pre-hook on the model and torch's global optimizer step hooks."""

    def __init__(self, model: nn.Module, device: torch.device):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.device, self.cuda = device, device.type == "cuda"
        self.events: list[tuple[str, float, int, int]] = []
        self.handles = [model.register_forward_pre_hook(lambda *_: self.mark("forward")),
                        register_optimizer_step_post_hook(lambda *_: self.mark("optimizer_done"))]

    def mark(self, what: str) -> None:
        alloc = reserved = 0
        if self.cuda:
            torch.cuda.synchronize(self.device)
            alloc, reserved = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # the next reading is the peak since this mark
        self.events.append((what, time.perf_counter(), alloc, reserved))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _end2end(args, model, config, device, pattern) -> dict:
    from minisparse.admm import elsa

    low = args.method == "elsa-l"
    t0 = time.perf_counter()
    model.to(device)
    move_seconds = time.perf_counter() - t0
    weights_on_device = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    stream = random_tokens((max(4 * args.seqlen * args.batch_size, 100_000),), config["vocab_size"], args.seed + 1)
    clock = _StepClock(model, device)
    clock.mark("start")
    try:
        out = elsa(model, stream, pattern, steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen,
                   interval=args.interval, grad_checkpointing=True, low_precision=low,
                   optimizer="adamw8bit" if low else "adamw", log_every=args.steps, seed=args.seed,
                   progress=not args.no_progress, **args.options)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the loop is reported with its dtype context
        raise SystemExit(f"{args.method} failed inside minisparse's training loop with {args.dtype} parameters "
                         f"({type(err).__name__}: {err}). A memory error (e.g. a cuBLAS allocation failure): lower "
                         "--num-layers, --seqlen or --batch-size. Otherwise the loop (minisparse/train.py, admm.py, "
                         f"optim8.py) may mishandle {args.dtype}: tests/test_scale_script.py runs it in bfloat16 at "
                         "tiny scale on the CPU; run it to tell the two apart") from err
    finally:
        clock.close()
    clock.mark("end")
    ev = clock.events
    fwd = [i for i, e in enumerate(ev) if e[0] == "forward"]
    done = [i for i, e in enumerate(ev) if e[0] == "optimizer_done"]
    if len(fwd) != args.steps or len(done) != args.steps:
        raise SystemExit(f"expected {args.steps} forwards and optimizer steps, saw {len(fwd)} and {len(done)}: "
                         "the training loop's structure changed; update benchmarks/scale_gpu.py's step clock")
    steps = []
    for k in range(args.steps):
        f, d = fwd[k], done[k]
        nxt = fwd[k + 1] if k + 1 < args.steps else None
        rec = {"step": k, "seconds": ev[d][1] - ev[f][1], "z_update": (k + 1) % args.interval == 0}
        if nxt is not None:  # after the optimizer: ADMM's after_step (the z/u update every interval steps)
            rec["after_step_seconds"] = ev[nxt][1] - ev[d][1]
        if clock.cuda:
            rec["peak_allocated_bytes"] = max(e[2] for e in ev[f + 1:d + 1])
            rec["peak_reserved_bytes"] = max(e[3] for e in ev[f + 1:d + 1])
            if nxt is not None:
                rec["after_step_peak_allocated_bytes"] = ev[nxt][2]
        steps.append(rec)
    later = steps[1:]
    step_s = sum(s["seconds"] for s in later) / len(later)
    z_times = [s["after_step_seconds"] for s in later if s["z_update"] and "after_step_seconds" in s]
    plain = [s["after_step_seconds"] for s in later if not s["z_update"] and "after_step_seconds" in s]
    result = {"seconds": ev[-1][1] - ev[0][1], "move_to_device_seconds": move_seconds,
              "setup_seconds": ev[fwd[0]][1] - ev[0][1], "finalize_seconds": ev[-1][1] - ev[done[-1]][1],
              "step_seconds": step_s,
              "step_seconds_note": "mean over steps after the first, from the model's forward to the end of the "
                                   "optimizer step (forward, backward with recomputation, ADMM penalty gradient, "
                                   "clipping, optimizer)",
              "z_update_seconds": (sum(z_times) / len(z_times)) if z_times else None,
              "interval": args.interval, "steps": steps,
              "tokens_per_second": args.batch_size * args.seqlen / step_s,
              "admm_state_bytes_per_param": out.get("admm_state_bytes_per_param"),
              "log": out.get("log"), "tokens": out.get("tokens")}
    if z_times:
        base = sum(plain) / len(plain) if plain else 0.0
        result["amortised_step_seconds_at_interval_32"] = step_s + (result["z_update_seconds"] - base) / 32
    if clock.cuda:
        result["weights_on_device_bytes"] = weights_on_device
        phases = {"setup (optimizer, z0 = projection)": (ev[fwd[0]][2], ev[fwd[0]][3]),
                  "finalize (last after_step, final projection)": (ev[-1][2], ev[-1][3])}
        result["phase_peaks_bytes"] = {k: {"allocated": a, "reserved": r} for k, (a, r) in phases.items()}
        result["_peaks"] = (max(e[2] for e in ev), max(e[3] for e in ev))
    return result


# -- the command ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="benchmarks/scale_gpu.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b",
                    help="a config known to minisparse.plan (llama-2-7b, llama-2-13b, llama-3.1-8b, qwen2.5-14b, "
                         "gemma-2-27b), a config.json or a checkpoint directory (default: %(default)s)")
    ap.add_argument("--config-override", default="{}", help="JSON merged into the config, e.g. a tiny shape for tests")
    ap.add_argument("--method", default="sparsegpt", choices=LAYERWISE + END2END, help="(default: %(default)s)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="for unstructured and row patterns (default: %(default)s)")
    ap.add_argument("--pattern", default="unstructured", help="unstructured, row or N:M such as 2:4 (default: %(default)s)")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="keep only the first N decoder layers (default: all). Layer-wise time per layer and device "
                         "memory do not depend on depth; host memory and ELSA's device memory do")
    ap.add_argument("--calib-samples", type=int, default=128, help="layer-wise: calibration windows (default: %(default)s)")
    ap.add_argument("--placement", default="host", choices=["host", "device"],
                    help="layer-wise: where the model waits while one layer at a time is pruned on --device: host "
                         "(the engine's design and the plan's assumption) or device (what `minisparse prune "
                         "--device cuda` does today: the whole model loaded on the GPU) (default: %(default)s)")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="layer-wise: windows per forward (default 8); ELSA: windows per step (default 1)")
    ap.add_argument("--steps", type=int, default=3, help="ELSA: optimizer steps, at least 2 (default: %(default)s)")
    ap.add_argument("--interval", type=int, default=2,
                    help="ELSA: steps between z/u updates; 2 puts one update inside the timed steps (the method's "
                         "default is 32; the JSON gives the step time amortised at 32) (default: %(default)s)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(default: %(default)s)")
    ap.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help=f"a solver option (sparsefw: iterations={SPARSEFW_ITERATIONS} unless given) or an elsa "
                         "option such as lam=0.01, projection=magnitude")
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(HERE / "results" / "scale"), help="(default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--summarize", action="store_true", help="only print the table of the results in --out-dir")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from minisparse.methods import check_options, get_method, parse_option
    from minisparse.patterns import parse_pattern

    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.summarize:
        return args
    if args.batch_size is None:
        args.batch_size = 8 if args.method in LAYERWISE else 1
    for name, low in (("calib_samples", 1), ("seqlen", 2), ("batch_size", 1), ("interval", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}; got {getattr(args, name)}")
    if args.method in END2END and args.steps < 2:
        ap.error(f"--steps must be >= 2 for {args.method} (the first step is excluded from the timing); got {args.steps}")
    if args.num_layers is not None and args.num_layers < 1:
        ap.error(f"--num-layers must be >= 1; got {args.num_layers}")
    try:
        args.pattern_obj = parse_pattern(args.pattern, None if ":" in args.pattern else args.sparsity)
        args.options = dict(parse_option(o) for o in args.option)
    except ValueError as err:
        ap.error(str(err))
    if args.method == "sparsefw":
        args.options.setdefault("iterations", SPARSEFW_ITERATIONS)
    if args.method in END2END:
        fixed = sorted(set(args.options) & set(_E2E_FIXED))
        if fixed:
            ap.error(f"-o {', '.join(fixed)}: set by this script" +
                     "".join(f"; use {_E2E_FIXED[k]}" for k in fixed if _E2E_FIXED[k]))
    try:
        check_options(get_method("elsa" if args.method in END2END else args.method), args.options, args.pattern_obj)
    except ValueError as err:
        ap.error(str(err))
    try:
        args.device_obj = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a device; use cuda, cuda:N or cpu")
    if args.device_obj.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False). The benchmark is meant for a GPU machine; to try it "
                         "here, use --device cpu with a tiny shape, e.g. --config-override "
                         "'{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_attention_heads\": 4, "
                         "\"num_key_value_heads\": 4, \"vocab_size\": 512}' --num-layers 2 --seqlen 32 "
                         "--calib-samples 4")
    if args.device_obj.type not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda, cuda:N or cpu; got {args.device!r}")
    if args.device_obj.type == "cuda" and args.device_obj.index is not None \
            and args.device_obj.index >= torch.cuda.device_count():
        ap.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return args


def measure(args: argparse.Namespace) -> tuple[dict, nn.Module]:
    """Run one case; returns the result (as written to JSON) and the pruned model."""
    from minisparse.plan import CUDA_CONTEXT_BYTES, load_config, plan

    device = args.device_obj
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        config = {**load_config(args.model), **json.loads(args.config_override)}
    except json.JSONDecodeError as err:
        raise SystemExit(f"--config-override is not valid JSON ({err}); e.g. '{{\"hidden_size\": 64}}'") from None
    except ValueError as err:
        raise SystemExit(f"--model {args.model}: {err}") from None
    if args.num_layers:
        if args.num_layers > int(config["num_hidden_layers"]):
            raise SystemExit(f"--num-layers {args.num_layers}: {args.model} has only {config['num_hidden_layers']} layers")
        config["num_hidden_layers"] = args.num_layers
        if "layer_types" in config:
            config["layer_types"] = list(config["layer_types"])[:args.num_layers]
    dtype = getattr(torch, args.dtype)
    host_reset = reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_model(config, dtype, args.seed, "cpu", std=args.init_std)
    build_seconds = time.perf_counter() - t0
    result = {"model": args.model, "config": config, "method": args.method, "pattern": str(args.pattern_obj),
              "options": args.options, "dtype": args.dtype, "device": str(device),
              "command": shlex.join(["python", "benchmarks/scale_gpu.py", *args.argv]),
              "settings": {**({"calib_samples": args.calib_samples, "placement": args.placement}
                              if args.method in LAYERWISE else
                              {"steps": args.steps, "interval": args.interval}),
                           "seqlen": args.seqlen, "batch_size": args.batch_size, "seed": args.seed,
                           "init_std": args.init_std},
              **machine_info(device), "attn_implementation": getattr(model.config, "_attn_implementation", None),
              "build_seconds": build_seconds,
              "note": "random weights (seeded normal) and random token ids: time and memory only, no quality"}
    print(f"built a random {args.model} ({config['num_hidden_layers']} layers, {args.dtype}) on the host in "
          f"{build_seconds:.1f} s", flush=True)
    if args.method in LAYERWISE:
        result.update(_layerwise(args, model, config, device, args.pattern_obj))
        pred = plan(config, args.method, calib_samples=args.calib_samples, seqlen=args.seqlen,
                    batch_size=args.batch_size, dtype=args.dtype, device="cuda" if device.type == "cuda" else "cpu")
        peaks = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)) \
            if device.type == "cuda" else None
    else:
        part = _end2end(args, model, config, device, args.pattern_obj)
        peaks = part.pop("_peaks", None)
        result.update(part)
        pred = plan(config, args.method, steps_batch=args.batch_size, seqlen=args.seqlen, dtype=args.dtype,
                    device="cuda" if device.type == "cuda" else "cpu", grad_checkpointing=True,
                    optimizer_bits=8 if args.method == "elsa-l" else 32)
    result["model_sparsity"] = _count_zeros(model)
    result["host_peak_bytes"] = host_peak_bytes()
    result["host_peak_reset"] = host_reset
    result["plan"] = {k: pred[k] for k in ("device_peak_bytes", "host_peak_bytes", "terms", "settings")}
    ratios = {"host": result["host_peak_bytes"] / pred["host_peak_bytes"]}
    if peaks is not None:
        free, total = torch.cuda.mem_get_info(device)
        result["device_peak_allocated_bytes"], result["device_peak_reserved_bytes"] = peaks
        result["device_used_at_end_bytes"] = total - free  # includes the CUDA context and the allocator's cache
        # torch's allocator never sees the CUDA context, so compare with the plan without it
        result["plan"]["device_peak_bytes_without_context"] = pred["device_peak_bytes"] - CUDA_CONTEXT_BYTES
        if args.method in LAYERWISE and args.placement == "device":  # + the rest of the model, on the GPU too
            rest = pred["params"] * (2 if args.dtype == "bfloat16" else 4) - pred["terms"]["layer_weights"]
            result["plan"]["device_peak_bytes_without_context"] += rest
            result["plan"]["model_on_device_bytes_added"] = rest
        ratios["device_allocated"] = peaks[0] / result["plan"]["device_peak_bytes_without_context"]
        ratios["device_reserved"] = peaks[1] / result["plan"]["device_peak_bytes_without_context"]
    result["measured_over_predicted"] = ratios
    result["status"] = "ok"
    return result, model


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def summary_table(results: list[dict]) -> str:
    head = ("model", "L", "method", "settings", "device", "s/layer|step", "GPU alloc", "reserved", "plan",
            "ratio", "host", "plan", "ratio")
    rows = [head]
    for r in results:
        s = r.get("settings", {})
        e2e = r["method"] in END2END
        settings = (f"{s.get('steps')} st, {s.get('batch_size')}x{s.get('seqlen')}" if e2e
                    else f"{s.get('calib_samples')}x{s.get('seqlen')} b{s.get('batch_size')}")
        ratio = r.get("measured_over_predicted", {})
        plan_dev = r["plan"].get("device_peak_bytes_without_context")
        rows.append((Path(r["model"]).name, str(r["config"]["num_hidden_layers"]), r["method"], settings,
                     (r.get("gpu") or r["device"])[:24],
                     _fmt(r.get("step_seconds") if e2e else r.get("seconds_per_layer"), ".3g"),
                     _fmt(r.get("device_peak_allocated_bytes", 0) / GiB if "device_peak_allocated_bytes" in r else None),
                     _fmt(r.get("device_peak_reserved_bytes", 0) / GiB if "device_peak_reserved_bytes" in r else None),
                     _fmt(plan_dev / GiB if plan_dev else None), _fmt(ratio.get("device_reserved"), ".3f"),
                     _fmt(r["host_peak_bytes"] / GiB), _fmt(r["plan"]["host_peak_bytes"] / GiB),
                     _fmt(ratio.get("host"), ".3f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i >= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return ("GiB; GPU ratio = peak reserved / plan without the CUDA context; host ratio = peak RSS / plan\n"
            + "\n".join(lines))


def load_results(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))]


def main(argv: list[str] | None = None, *, return_model: bool = False):
    """Run the case the arguments describe, write its JSON, print the table; returns the result dict
    (and the pruned model with ``return_model``)."""
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.summarize:
        print(summary_table(load_results(out_dir)))
        return None
    try:
        result, model = measure(args)
    except torch.OutOfMemoryError as err:
        raise SystemExit(f"{args.method} ran out of device memory ({str(err).splitlines()[0]}). The plan for this "
                         f"case: `minisparse plan --model {args.model} --method {args.method} ...`; use fewer "
                         "--num-layers, a smaller --seqlen or --batch-size") from None
    config = result["config"]
    target = out_dir / result_name(args, config, torch.device(result["device"]))
    result["result_file"] = target.name
    write_json(target, result)
    print(f"wrote {target}")
    print(summary_table(load_results(out_dir)))
    return (result, model) if return_model else result


if __name__ == "__main__":
    main()
