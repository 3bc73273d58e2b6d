r"""ELSA beyond one GPU: the ADMM hooks and the training loop on FSDP2-sharded parameters.

``torch.distributed.fsdp.fully_shard`` turns each parameter into a DTensor sharded along dim 0 over a
1-D device mesh: every rank holds a block of whole output rows. The training loop and :class:`ADMM`
(:mod:`minisparse.admm`) then work on each rank's local shard, and this module supplies the few places
where a rank needs more than its own rows:

- the projection: per-row and N:M patterns act within a row, so a rank projects its own rows; the
  unstructured pattern keeps the top-k scores of a whole matrix, so the scores are all-gathered (one
  matrix at a time), the single-process :func:`~minisparse.patterns.topk_mask` runs on the gathered
  matrix, and each rank keeps its rows of the mask (same ties as one process);
- ELSA-L's FP8 scale of z (one per tensor): the absolute maximum is all-reduced;
- residuals and norms: the per-rank sums of squares are all-reduced;
- gradients: FSDP2 reduce-scatters the mean gradient; clipping is ``clip_grad_norm_`` on DTensors.

Everything else (z, u, Adam's moments, the Fisher score ``h ⊙ v²``) lives in the local shard. A
process without sharded parameters never calls a collective, so single-process runs are unchanged.

Run it with ``torchrun --nproc-per-node N -m minisparse.distributed --help``.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .patterns import Pattern, topk_mask

__all__ = ["is_sharded", "local", "shard_mesh", "sharded_topk_mask", "all_reduce_sum", "global_amax",
           "all_finite", "shard_model", "main"]


def _dtensor_type():
    # A DTensor can only exist once torch.distributed.tensor has been imported; checking sys.modules keeps
    # single-process runs from importing (and paying for) the distributed stack.
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else mod.DTensor


def is_sharded(t: Any) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter, its gradient or optimizer state)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def shard_mesh(params: dict[str, nn.Parameter]):
    """The 1-D device mesh the parameters are sharded over, or None if none is a DTensor.

    Raises ValueError for layouts the hooks do not handle: a mix of sharded and plain weights, several
    meshes, a 2-D mesh (HSDP), or a replicated placement.
    """
    sharded = {n: p for n, p in params.items() if is_sharded(p)}
    if not sharded:
        return None
    if len(sharded) != len(params):
        plain = next(n for n in params if n not in sharded)
        raise ValueError(f"{plain} is a plain tensor while other trained weights are FSDP2-sharded DTensors; "
                         "shard the whole model (minisparse.distributed.shard_model) or none of it")
    mesh = next(iter(sharded.values())).device_mesh
    for n, p in sharded.items():
        if p.device_mesh != mesh:
            raise ValueError(f"{n} is sharded over a different device mesh; use one mesh for the whole model")
        if len(p.placements) != 1 or not p.placements[0].is_shard():
            raise ValueError(f"{n} has placements {p.placements}; only plain FSDP2 (one mesh dimension, "
                             "Shard placement) is supported, not HSDP or replicated parameters")
    return mesh


def sharded_topk_mask(score: torch.Tensor, pattern: Pattern, layout: torch.Tensor | None) -> torch.Tensor:
    """:func:`~minisparse.patterns.topk_mask` of this rank's rows of a matrix sharded like ``layout``.

    ``score`` is the local shard; ``layout`` is the parameter (a DTensor) or None / a plain tensor, in which
    case this is ``topk_mask(score, pattern)``. Row-wise patterns on dim-0 shards stay local; otherwise the
    score is gathered, ranked as in one process, and the rank's rows of the mask returned.
    """
    if layout is None or not is_sharded(layout):
        return topk_mask(score, pattern)
    from torch.distributed.tensor import DTensor, Replicate

    pattern.check_shape(tuple(layout.shape))
    if pattern.kind != "unstructured" and layout.placements[0].dim == 0:
        if score.numel() == 0:  # an uneven split can leave a rank without rows
            return torch.zeros_like(score, dtype=torch.bool)
        return topk_mask(score, pattern)
    mesh = layout.device_mesh
    full = DTensor.from_local(score, mesh, layout.placements, run_check=False, shape=layout.shape,
                              stride=layout.stride()).full_tensor()
    mask = topk_mask(full, pattern)
    del full
    return DTensor.from_local(mask, mesh, [Replicate()], run_check=False).redistribute(
        mesh, layout.placements).to_local()


def all_reduce_sum(values: Iterable[float], mesh) -> list[float]:
    """Sum Python floats over the ranks of ``mesh`` (one collective); unchanged if ``mesh`` is None."""
    values = [float(v) for v in values]
    if mesh is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=mesh.device_type)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return t.tolist()


def global_amax(t: torch.Tensor, mesh=None) -> torch.Tensor:
    """max |t| over the whole tensor (all ranks' shards when ``mesh`` is given), as a float32 scalar."""
    if mesh is None:
        return t.detach().abs().max().float()
    import torch.distributed as dist

    amax = t.detach().abs().max().float() if t.numel() else torch.zeros((), dtype=torch.float32, device=t.device)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return amax


def all_finite(p: torch.Tensor) -> bool:
    """True if every entry of ``p`` is finite; for a DTensor, on every rank (so all ranks agree)."""
    if not is_sharded(p):
        return bool(torch.isfinite(p).all())
    import torch.distributed as dist

    ok = torch.tensor(int(bool(torch.isfinite(local(p)).all())), device=p.device_mesh.device_type)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=p.device_mesh.get_group())
    return bool(ok)


def shard_model(model: nn.Module, mesh=None, mp_policy=None) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head), over ``mesh``
    (default: all ranks of the default process group on the model's device type). Returns the model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .models import decoder_layers

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (torchrun, or "
                           "torch.distributed.init_process_group)")
    if mesh is None:
        # An explicit mesh: fully_shard's default picks CUDA whenever it is present, even for a CPU model.
        kind = next(model.parameters()).device.type
        kind = "cuda" if kind == "meta" and torch.cuda.is_available() else ("cpu" if kind == "meta" else kind)
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


# -- command line: torchrun --nproc-per-node N -m minisparse.distributed ... --------------------------------

_DESCRIPTION = """\
ELSA / ELSA-L (ADMM on the model's loss) with the model sharded over all ranks by FSDP2.

Launch one process per GPU with torchrun; every rank loads nothing but the model's configuration,
rank 0 reads the weights and broadcasts them shard by shard. Each step draws --batch-size windows of
--seqlen tokens from the calibration text (the same windows as a single-process run with the same
seed) and gives each rank batch_size / world of them. The pruned model is written by rank 0 to --out
as a Hugging Face checkpoint with report.json; evaluate it with `minisparse eval OUT`.
"""

_EPILOG = """\
examples:
  torchrun --nproc-per-node 8 -m minisparse.distributed --model Qwen/Qwen2.5-14B --pattern 2:4 \\
      --steps 4096 --batch-size 16 --seqlen 2048 --low-precision --out qwen14b-elsa-l-24
  torchrun --nproc-per-node 2 -m minisparse.distributed --model smollm2-135m --sparsity 0.5 \\
      --steps 64 --batch-size 4 --seqlen 256 --out smollm-elsa50      (CPU: gloo backend)

memory per rank (bytes per trained weight / world, plus one gathered layer and the activations):
  ELSA   float32 weights: 4 weight + 4 gradient + 8 Adam + 4 z + 4 u = 24
  ELSA-L float32 weights: 4 + 4 + 2 (8-bit Adam) + 1 (FP8 z) + 2 (BF16 u) = 13
There is no checkpoint/resume option: a sharded run cannot be resumed (the single-process CLI can).
"""


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m minisparse.distributed",
                                description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundled name, checkpoint directory or hub id")
    p.add_argument("--out", required=True, help="output directory (written atomically by rank 0)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--pattern", default="unstructured", help="unstructured, row or N:M (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction pruned (not with N:M)")
    p.add_argument("--steps", type=int, default=256, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="global windows per step, divisible by the number of ranks (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.0, help="warm-up fraction of the steps (default: %(default)s)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, 0 for none (default: %(default)s)")
    p.add_argument("--lam", type=float, default=0.01, help="ADMM penalty (default: %(default)s)")
    p.add_argument("--lam-final", type=float, default=None, help="final penalty of --schedule increasing")
    p.add_argument("--schedule", default="constant", choices=["constant", "increasing"])
    p.add_argument("--interval", type=int, default=32, help="steps between z/u updates (default: %(default)s)")
    p.add_argument("--projection", default="fisher", choices=["fisher", "magnitude"])
    p.add_argument("--low-precision", action="store_true",
                   help="ELSA-L: FP8 z, BF16 u and (unless --optimizer is given) 8-bit AdamW")
    p.add_argument("--optimizer", default=None, choices=["adamw", "adamw8bit"],
                   help="default: adamw8bit with --low-precision, else adamw")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the sharded (trained) weights (default: %(default)s)")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the gathered weights in forward/backward; auto: bfloat16 on GPUs, else --dtype")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--calib-text", default="wikipedia", help="training text (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args) -> None:
    from pathlib import Path

    from .admm import elsa
    from .data import TEXTS
    from .patterns import parse_pattern

    pattern = parse_pattern(args.pattern, args.sparsity)
    elsa(None, None, pattern, lam=args.lam, interval=args.interval, projection=args.projection,
         schedule=args.schedule, lam_final=args.lam_final, low_precision=args.low_precision,
         optimizer=args.optimizer, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
         warmup=args.warmup, clip=args.clip, seqlen=args.seqlen, log_every=args.log_every)
    if args.calib_text.strip().lower() not in TEXTS:
        raise ValueError(f"--calib-text {args.calib_text!r} is not known; choose one of: {', '.join(TEXTS)}")
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ValueError(f"--out {out} already exists; choose a new directory or pass --force to replace it")


def _load_sharded(name: str, dtype, compute_dtype, device, mesh):
    """Rank 0 reads the checkpoint; every rank builds the model on the meta device, shards it, and
    receives its shards (and the buffers) from rank 0. Returns (model, tokenizer, rank-0 copy or None)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import load_model

    rank = dist.get_rank()
    box: list[Any] = [None]
    full = None
    if rank == 0:
        full = load_model(name, dtype=dtype, device="cpu")
        box[0] = full.source
    dist.broadcast_object_list(box, src=0)
    tok = full.tokenizer if full is not None else AutoTokenizer.from_pretrained(box[0])
    config = AutoConfig.from_pretrained(box[0])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    shard_model(model, mesh, mp)
    model.to_empty(device=device)
    state = full.model.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    src = dict(full.model.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for n, b in model.named_buffers():  # includes non-persistent buffers (rotary frequencies)
            if rank == 0:
                b.copy_(src[n])
            dist.broadcast(b, src=0, group=mesh.get_group())
    model.eval()
    return model, tok, full


def main(argv: list[str] | None = None) -> int:
    import json
    import os
    import time
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from .admm import elsa
    from .cli import _atomic_dir
    from .data import load_text, tokenize
    from .models import save_checkpoint, uses_bos
    from .patterns import parse_pattern

    args = build_parser().parse_args(argv)
    if args.optimizer is None:
        args.optimizer = "adamw8bit" if args.low_precision else "adamw"
    try:
        _check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:  # plain `python -m minisparse.distributed`: a world of one
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks; "
                             f"use a multiple of {world}")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        mesh = init_device_mesh(device.type, (world,))
        dtype = getattr(torch, args.dtype)
        compute = getattr(torch, args.compute_dtype) if args.compute_dtype != "auto" else (
            torch.bfloat16 if cuda else dtype)
        wall = time.perf_counter()
        model, tok, full = _load_sharded(args.model, dtype, compute, device, mesh)
        stream = tokenize(tok, load_text(args.calib_text, "calib"))
        bos_id = tok.bos_token_id if uses_bos(tok) else None
        report = elsa(model, stream, parse_pattern(args.pattern, args.sparsity), lam=args.lam,
                      interval=args.interval, projection=args.projection, schedule=args.schedule,
                      lam_final=args.lam_final, low_precision=args.low_precision, optimizer=args.optimizer,
                      lr=args.lr, steps=args.steps, batch_size=args.batch_size, warmup=args.warmup,
                      clip=args.clip, grad_checkpointing=args.grad_checkpointing, log_every=args.log_every,
                      seqlen=args.seqlen, seed=args.seed, bos_id=bos_id, progress=not args.no_progress and rank == 0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            full.model.load_state_dict(state)
            with _atomic_dir(Path(args.out).expanduser(), args.force) as tmp:
                save_checkpoint(full.model, full.tokenizer, tmp)
                report.update(model=args.model, pattern=str(parse_pattern(args.pattern, args.sparsity)),
                              world_size=world, device=str(device), dtype=args.dtype, compute_dtype=str(compute),
                              wall_seconds=time.perf_counter() - wall, peak_gpu_mb_per_rank=peaks,
                              torch_version=torch.__version__)
                (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
            print(json.dumps({k: report[k] for k in ("model", "pattern", "world_size", "tokens", "train_seconds",
                                                      "wall_seconds")}))
        dist.barrier()
    except ValueError as err:
        print(f"error (rank {dist.get_rank()}): {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
