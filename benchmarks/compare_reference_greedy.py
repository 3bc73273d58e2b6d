"""Compare minisparse's SparseGPT and Wanda with the authors' reference implementations.

The reference code is *not* part of minisparse: check it out anywhere (outside this repository) and
point the script at it::

    git clone https://github.com/IST-DASLab/sparsegpt /tmp/ref_sparsegpt
    git clone https://github.com/locuslab/wanda /tmp/ref_wanda
    python benchmarks/compare_reference_greedy.py --sparsegpt-dir /tmp/ref_sparsegpt --wanda-dir /tmp/ref_wanda

For every shape (d_out x d_in) and pattern the script builds one weight W and one set of calibration
inputs X, then runs

- the reference ``SparseGPT.fasterprune`` (``sparsegpt.py``) on an ``nn.Linear`` holding W, with its
  Hessian ``H`` set to ``2/nsamples · X Xᵀ``, the normalisation its ``add_batch`` accumulates
  (nsamples is a power of two, so H is G scaled exactly), against ``minisparse.greedy.sparsegpt(W, G)``
  with ``G = X Xᵀ``; damping is relative to mean diag, so both see the same ridge;
- the reference ``lib.prune.prune_wanda`` (the whole function: its forward hooks, its ``WrappedGPT``
  statistics and its masking) on a stand-in one-layer "model" whose calibration input is X, against
  ``minisparse.greedy.wanda(W, G)``.

Nothing of the reference repositories is edited; CUDA-only calls (``torch.cuda.synchronize``) and the
data loading of ``prune_wanda`` are patched at run time, inside this process.

It reports the fraction of identical mask entries, the pruned counts, the largest absolute weight
difference, both relative layer errors ``||WX - ŴX||² / ||WX||²`` and the time of both, and writes
``benchmarks/results/reference_greedy.json``.

Inputs: by default random *correlated* activations (a few shared latent factors, log-normal channel
scales and a few outlier channels, like LLM activations); ``--real`` adds real layers of the bundled
SmolLM2-135M (q_proj 576x576, gate_proj 1536x576, down_proj 576x1536 of one decoder layer) with
activations of a text file (``--text-file``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from minisparse.greedy import sparsegpt, wanda
from minisparse.objective import gram, relative_error
from minisparse.patterns import is_feasible, num_pruned, parse_pattern

HERE = Path(__file__).resolve().parent
SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (d_out, d_in): SmolLM2-135M's q/o, gate/up, down


# ------------------------------------------------------------------------------------------------
# loading the reference code (read-only, from the given checkouts)
# ------------------------------------------------------------------------------------------------

def _git_head(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_reference_sparsegpt(path: Path):
    """The ``SparseGPT`` class of IST-DASLab/sparsegpt (its ``sparsegpt.py`` does ``from quant import *``)."""
    if not (path / "sparsegpt.py").exists():
        raise SystemExit(f"--sparsegpt-dir {path}: no sparsegpt.py there (clone IST-DASLab/sparsegpt)")
    sys.path.insert(0, str(path))
    try:
        spec = importlib.util.spec_from_file_location("reference_sparsegpt", path / "sparsegpt.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path))
    return module.SparseGPT


def load_reference_wanda(path: Path):
    """The ``lib.prune`` module of locuslab/wanda. Its ``lib.data`` imports ``datasets`` at module level;
    when that package is absent a stub stands in (the data loaders are never called here)."""
    if not (path / "lib" / "prune.py").exists():
        raise SystemExit(f"--wanda-dir {path}: no lib/prune.py there (clone locuslab/wanda)")
    if importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("datasets is stubbed out by compare_reference_greedy.py")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        prune = importlib.import_module("lib.prune")
    finally:
        sys.path.remove(str(path))
    return prune


@contextlib.contextmanager
def cpu_safe_cuda(device: torch.device):
    """Make the reference code's unconditional CUDA calls no-ops when running on the CPU."""
    if device.type == "cuda":
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.empty_cache
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.empty_cache = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# running both implementations
# ------------------------------------------------------------------------------------------------

def run_reference_sparsegpt(SparseGPT, W, G, nsamples, pattern, blocksize, percdamp, device):
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False).to(device)
    layer.weight.data = W.clone()
    ref = SparseGPT(layer)
    ref.H = G * (2.0 / nsamples)  # what its add_batch accumulates: 2/nsamples · Σ x xᵀ
    prunen, prunem = (pattern.m - pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
    with cpu_safe_cuda(device), contextlib.redirect_stdout(io.StringIO()):
        _sync(device)
        start = time.perf_counter()
        ref.fasterprune(pattern.sparsity, prunen=prunen, prunem=prunem, blocksize=blocksize,
                        percdamp=percdamp)
        _sync(device)
        seconds = time.perf_counter() - start
    return layer.weight.data.clone(), seconds


class _OneLayer(nn.Module):
    """A decoder "layer" holding one Linear, called the way prune_wanda calls a decoder layer."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x, attention_mask=None, position_ids=None):
        return (self.proj(x),)


class _OneLayerModel(nn.Module):
    """Just enough of a Hugging Face causal LM for ``prune_wanda``: model.layers, config, seqlen."""

    def __init__(self, linear: nn.Linear, seqlen: int):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_OneLayer(linear)])
        self.config = SimpleNamespace(use_cache=False)
        self.seqlen = seqlen
        self.hf_device_map = {}


def run_reference_wanda(prune, W, X, nsamples, seqlen, pattern, device):
    """Their prune_wanda, end to end, on a one-Linear model fed with the calibration inputs X."""
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False).to(device)
    layer.weight.data = W.clone()
    model = _OneLayerModel(layer, seqlen)
    inps = X.reshape(nsamples, seqlen, W.shape[1])
    outs = torch.zeros(nsamples, seqlen, W.shape[0], device=device)
    saved = prune.get_loaders, prune.prepare_calibration_input
    prune.get_loaders = lambda *a, **k: (None, None)
    prune.prepare_calibration_input = lambda model, dataloader, dev: (inps.clone(), outs.clone(), None, None)
    args = SimpleNamespace(nsamples=nsamples, seed=0, sparsity_ratio=pattern.sparsity, use_variant=False)
    prune_n, prune_m = (pattern.m - pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
    try:
        with cpu_safe_cuda(device), contextlib.redirect_stdout(io.StringIO()):
            _sync(device)
            start = time.perf_counter()
            prune.prune_wanda(args, model, None, device=device, prune_n=prune_n, prune_m=prune_m)
            _sync(device)
            seconds = time.perf_counter() - start
    finally:
        prune.get_loaders, prune.prepare_calibration_input = saved
    return layer.weight.data.clone(), seconds


def run_reference_wanda_statistics(prune, W, X, nsamples, seqlen, device) -> float:
    """Time of prune_wanda's calibration part alone (two forward passes, WrappedGPT statistics)."""
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False).to(device)
    layer.weight.data = W.clone()
    wrapped = prune.WrappedGPT(layer)
    handle = layer.register_forward_hook(lambda _, inp, out: wrapped.add_batch(inp[0].data, out.data))
    inps = X.reshape(nsamples, seqlen, W.shape[1])
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for j in range(nsamples):
            layer(inps[j].unsqueeze(0))
    handle.remove()
    with torch.no_grad():
        for j in range(nsamples):
            layer(inps[j].unsqueeze(0))
    _sync(device)
    return time.perf_counter() - start


def _timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, min(times)


def compare(ours, W, G, ref_weight, pattern, blocksize=None):
    # the reference returns no mask: a weight it pruned is 0. Random W has no exact zeros and a kept weight
    # stays non-zero (SparseGPT updates it); real W may hold a few zeros (see zero_weights_in_W).
    ref_mask = ref_weight != 0
    mine = ours.mask
    d_out, d_in = W.shape
    out = {
        "zero_weights_in_W": int((W == 0).sum()),  # such a weight, if kept by the reference, reads as pruned
        "mask_agreement": float((mine == ref_mask).float().mean()),
        "mask_mismatches": int((mine != ref_mask).sum()),
        "mask_mismatches_where_W_nonzero": int(((mine != ref_mask) & (W != 0)).sum()),
        "pruned_expected": num_pruned(pattern, (d_out, d_in)),
        "pruned_minisparse": int((~mine).sum()),
        "pruned_reference": int((~ref_mask).sum()),
        "reference_feasible": is_feasible(ref_mask, pattern),
        "max_abs_weight_diff": float((ours.weight - ref_weight).abs().max()),
        "max_abs_weight": float(W.abs().max()),
        "rel_error_minisparse": relative_error(W.cpu(), ours.weight.cpu(), G.cpu()),
        "rel_error_reference": relative_error(W.cpu(), ref_weight.cpu(), G.cpu()),
    }
    both = mine & ref_mask
    out["max_abs_weight_diff_on_common_mask"] = float((ours.weight - ref_weight)[both].abs().max())
    if blocksize is not None:
        out["mismatches_per_block"] = [int((mine != ref_mask)[:, i:i + blocksize].sum())
                                       for i in range(0, d_in, blocksize)]
        out["reference_pruned_per_block"] = [int((~ref_mask)[:, i:i + blocksize].sum())
                                             for i in range(0, d_in, blocksize)]
        out["minisparse_pruned_per_block"] = [int((~mine)[:, i:i + blocksize].sum())
                                              for i in range(0, d_in, blocksize)]
    return out


# ------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------

def minisparse_with_reference_counts(W, G, pattern, blocksize, damp, counts):
    """Diagnostic: minisparse's SparseGPT sweep made to prune the reference's per-block counts.

    Uses two private helpers of minisparse.greedy on purpose: it isolates the one deliberate
    difference (how many weights each block prunes) from everything else.
    """
    from minisparse import greedy as g

    H = G.clone()
    dead = torch.diagonal(H) == 0
    H.diagonal()[dead] = 1
    W = W.clone()
    W[:, dead] = 0
    U = g._inverse_cholesky_upper(H, damp)
    weight, mask, _ = g._sparsegpt_pass(W, U, pattern, blocksize, counts)
    return weight, mask


def synthetic_problem(d_out, d_in, tokens, seed, device):
    """W ~ N(0, 1/d_in) and LLM-like correlated inputs: 16 shared latent factors plus noise, log-normal
    channel scales and four outlier channels 20x larger."""
    gen = torch.Generator().manual_seed(seed * 7919 + d_out * 31 + d_in)
    factors = torch.randn(tokens, 16, generator=gen) @ torch.randn(16, d_in, generator=gen) / 4
    X = factors + torch.randn(tokens, d_in, generator=gen)
    X = X * torch.exp(0.5 * torch.randn(d_in, generator=gen))
    X[:, torch.randperm(d_in, generator=gen)[:4]] *= 20
    W = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
    return W.to(device), X.to(device)


def real_problems(text_file: Path, tokens: int, layer_index: int, device):
    """Three Linear layers of SmolLM2-135M's decoder layer ``layer_index`` and their real inputs."""
    from minisparse.models import decoder_layers, load_model

    loaded = load_model("smollm2-135m", device=device)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(text_file.read_text(errors="ignore"), return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise SystemExit(f"--text-file has {ids.numel()} tokens; --tokens {tokens} needs more text")
    layer = decoder_layers(model)[layer_index]
    names = {"self_attn.q_proj": None, "mlp.gate_proj": None, "mlp.down_proj": None}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name, module in layer.named_modules():
        if name in names:
            names[name] = module
            handles.append(module.register_forward_hook(
                lambda m, inp, out, name=name: captured[name].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        for start in range(0, tokens, 512):
            model(ids[start:min(start + 512, tokens)].unsqueeze(0).to(device))
    for h in handles:
        h.remove()
    out = []
    for name, module in names.items():
        X = torch.cat(captured[name])[:tokens].float()
        out.append((f"smollm2-135m.layers.{layer_index}.{name}", module.weight.data.float().clone(), X))
    return out


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsegpt-dir", type=Path, required=True, help="checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--wanda-dir", type=Path, required=True, help="checkout of locuslab/wanda")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "reference_greedy.json")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (nsamples x seqlen)")
    parser.add_argument("--nsamples", type=int, default=64, help="sequences (a power of two keeps 2/n exact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timing: best (min) of this many runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--real", action="store_true", help="also compare on real SmolLM2-135M layers")
    parser.add_argument("--text-file", type=Path, help="text whose activations feed --real")
    parser.add_argument("--layer", type=int, default=3, help="decoder layer for --real")
    args = parser.parse_args(argv)
    if args.tokens % args.nsamples:
        raise SystemExit("--tokens must be a multiple of --nsamples")
    if args.real and args.text_file is None:
        raise SystemExit("--real needs --text-file")
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seqlen = args.tokens // args.nsamples
    torch.backends.cuda.matmul.allow_tf32 = False  # as the reference sets on import

    SparseGPT = load_reference_sparsegpt(args.sparsegpt_dir.resolve())
    prune = load_reference_wanda(args.wanda_dir.resolve())

    problems = [(f"synthetic {d_out}x{d_in}",) + synthetic_problem(d_out, d_in, args.tokens, args.seed, device)
                for d_out, d_in in SHAPES]
    if args.real:
        problems += real_problems(args.text_file, args.tokens, args.layer, device)

    cases = []
    for name, W, X in problems:
        G = gram(X)
        for pattern in (parse_pattern("unstructured", 0.5), parse_pattern("2:4")):
            # --- SparseGPT; timings interleaved (reference, ours, reference, ...) so that load from
            # other work on the machine hits both alike
            ref_w, _ = run_reference_sparsegpt(SparseGPT, W, G, args.nsamples, pattern, args.blocksize,
                                               args.damp, device)  # warm-up
            sparsegpt(W, G, pattern, damp=args.damp, blocksize=args.blocksize)  # warm-up
            ref_times, our_times = [], []
            for _ in range(args.repeats):
                ref_w, t = run_reference_sparsegpt(SparseGPT, W, G, args.nsamples, pattern,
                                                   args.blocksize, args.damp, device)
                ref_times.append(t)
                ours, t = _timed(lambda: sparsegpt(W, G, pattern, damp=args.damp, blocksize=args.blocksize),
                                 device, 1)
                our_times.append(t)
            t_ours = min(our_times)
            case = {"problem": name, "shape": list(W.shape), "pattern": str(pattern), "method": "sparsegpt",
                    **compare(ours, W, G, ref_w, pattern,
                              blocksize=args.blocksize if pattern.kind == "unstructured" else None),
                    "seconds_minisparse": t_ours, "seconds_reference": min(ref_times),
                    "seconds_minisparse_all": our_times, "seconds_reference_all": ref_times,
                    "cholesky_retries": ours.stats["cholesky_retries"]}
            if pattern.kind == "unstructured":
                # the same sweep, pruning the reference's count in each block (int(s·numel)+1, plus
                # threshold ties): isolates the exact-sparsity rule as the only source of mismatches
                w2, m2 = minisparse_with_reference_counts(W, G, pattern, args.blocksize, args.damp,
                                                          case["reference_pruned_per_block"])
                case["with_reference_block_counts"] = {
                    "mask_agreement": float((m2 == (ref_w != 0)).float().mean()),
                    "mask_mismatches": int((m2 != (ref_w != 0)).sum()),
                    "max_abs_weight_diff": float((w2 - ref_w).abs().max()),
                }
            cases.append(case)
            print(_line(case), flush=True)
            # --- Wanda (its unstructured mode prunes int(sparsity*d_in) per row: our per="row")
            ref_times, stat_times, our_times = [], [], []
            for _ in range(args.repeats):
                ref_w, t = run_reference_wanda(prune, W, X, args.nsamples, seqlen, pattern, device)
                ref_times.append(t)
                stat_times.append(run_reference_wanda_statistics(prune, W, X, args.nsamples, seqlen, device))
                ours, t = _timed(lambda: wanda(W, G, pattern), device, 1)
                our_times.append(t)
            t_stats, t_ours = min(stat_times), min(our_times)
            _, t_gram = _timed(lambda: gram(X), device, args.repeats)
            case = {"problem": name, "shape": list(W.shape), "pattern": str(pattern), "method": "wanda",
                    **compare(ours, W, G, ref_w, pattern),
                    "seconds_minisparse": t_ours, "seconds_minisparse_gram": t_gram,
                    "seconds_reference": min(ref_times),
                    "seconds_minisparse_all": our_times, "seconds_reference_all": ref_times,
                    "seconds_reference_calibration_part": t_stats,
                    "seconds_reference_scoring_and_mask": max(min(ref_times) - t_stats, 0.0)}
            if pattern.kind == "unstructured":
                row = wanda(W, G, parse_pattern("row", pattern.sparsity))
                case["row_pattern_mask_agreement"] = float((row.mask == (ref_w != 0)).float().mean())
            cases.append(case)
            print(_line(case), flush=True)

    result = {
        "description": "minisparse.greedy vs the reference SparseGPT (IST-DASLab/sparsegpt, "
                       "SparseGPT.fasterprune) and Wanda (locuslab/wanda, lib.prune.prune_wanda) on the "
                       "same W and calibration inputs",
        "meta": {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu_threads": torch.get_num_threads(), "load_average_at_end": list(os.getloadavg()), "tokens": args.tokens, "nsamples": args.nsamples,
            "seed": args.seed, "repeats": args.repeats, "blocksize": args.blocksize, "damp": args.damp,
            "sparsegpt_commit": _git_head(args.sparsegpt_dir), "wanda_commit": _git_head(args.wanda_dir),
            "timing": "best (min) wall seconds over the repeats, after a warm-up (the machine may be shared); minisparse sparsegpt/wanda get G = X Xᵀ (seconds_minisparse_gram "
                      "is its cost), the reference fasterprune gets H, prune_wanda runs its calibration "
                      "(two forward passes + statistics) and its scoring; "
                      "seconds_reference_scoring_and_mask = prune_wanda minus its calibration part",
        },
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


def _line(c: dict) -> str:
    return (f"{c['method']:9s} {c['problem']:40s} {c['pattern']:16s} agree={c['mask_agreement']:.6f} "
            f"mism={c['mask_mismatches']:4d} pruned ours/ref/exp={c['pruned_minisparse']}/{c['pruned_reference']}/"
            f"{c['pruned_expected']} maxdiff={c['max_abs_weight_diff']:.2e} "
            f"relerr ours/ref={c['rel_error_minisparse']:.5f}/{c['rel_error_reference']:.5f} "
            f"t ours/ref={c['seconds_minisparse']:.3f}/{c['seconds_reference']:.3f}s")


if __name__ == "__main__":
    main()
