"""ELSA on FSDP2-sharded parameters: two CPU processes (gloo) end where one process does.

Two ranks shard a tiny random Llama with ``fully_shard`` and run ELSA; the gathered weights must equal
a single-process run of the same configuration (same masks exactly, weights to float64 rounding) for
the unstructured, per-row and 2:4 patterns, magnitude and Fisher projections, ELSA-L's FP8 z (one scale
per tensor, taken over both shards) and the 8-bit AdamW. The model is float64 so that the only
difference, the order in which the two half-batch gradients are summed, cannot flip a mask.
"""
from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.multiprocessing as mp

from minisparse import parse_pattern, topk_mask
from minisparse.admm import ADMM, elsa
from minisparse.train import prunable_parameters

WORLD = 2
COMMON = dict(lam=0.05, interval=2, steps=6, batch_size=2, seqlen=24, lr=2e-3, clip=0.1, log_every=3,
              progress=False)
CASES = [
    dict(pattern=("unstructured", 0.5), projection="fisher", low_precision=False, optimizer="adamw"),
    dict(pattern=("unstructured", 0.6), projection="magnitude", low_precision=True, optimizer="adamw8bit"),
    dict(pattern=("row", 0.5), projection="fisher", low_precision=True, optimizer="adamw8bit",
         schedule="increasing", lam_final=0.5),
    dict(pattern=("2:4", None), projection="magnitude", low_precision=False, optimizer="adamw"),
    dict(pattern=("2:4", None), projection="fisher", low_precision=True, optimizer="adamw"),
]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(torch.float64)


def _stream():
    return torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(3))


def _run_case(model, case):
    kw = {**COMMON, **{k: v for k, v in case.items() if k != "pattern"}}
    return elsa(model, _stream(), parse_pattern(*case["pattern"]), **kw)


def _helper_checks(mesh):
    """Local masks and amax of small unevenly sharded matrices (with ties), for the parent to compare."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from minisparse.distributed import global_amax, local, sharded_topk_mask

    out = []
    g = torch.Generator().manual_seed(5)
    for shape in ((7, 8), (1, 8)):  # 4 + 3 rows, and 1 + 0 rows
        full = torch.randint(0, 3, shape, generator=g).double()  # many ties across the shard boundary
        dt = distribute_tensor(full, mesh, [Shard(0)])
        masks = {p: sharded_topk_mask(local(dt), parse_pattern(*p), dt)
                 for p in (("unstructured", 0.5), ("row", 0.5), ("2:4", None))}
        out.append({"full": full, "masks": masks, "amax": float(global_amax(local(dt), mesh))})
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from minisparse.distributed import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (world,))  # explicit: fully_shard's default mesh prefers CUDA
        res: dict = {"helpers": _helper_checks(mesh), "cases": [], "errors": []}
        model = shard_model(_model(), mesh)
        params = prunable_parameters(model)
        admm = ADMM("unstructured", 0.5, low_precision=True)
        admm.setup(params)
        res["setup"] = {n: (tuple(admm.z[n].shape), admm.z[n].dtype, float(admm.z_scale[n]),
                            tuple(admm.u[n].shape)) for n in params}
        for kw in (dict(checkpoint_every=2, checkpoint_dir=f"{out_dir}/ck"), dict(batch_size=3)):
            try:
                _run_case(model, {**CASES[0], **kw})
            except ValueError as err:
                res["errors"].append(str(err))
        for case in CASES:
            model = shard_model(_model(), mesh)
            out = _run_case(model, case)
            res["cases"].append({"weights": {n: p.full_tensor() for n, p in prunable_parameters(model).items()},
                                 "log": out["log"]})
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _launch(tmp_path, timeout=240.0):
    ctx = mp.start_processes(_worker, args=(WORLD, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {timeout:.0f} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_fsdp2_elsa_on_two_ranks_equals_one_process(tmp_path):
    ranks = _launch(tmp_path)

    # the distributed helpers: local masks of uneven shards (one rank holding no row) with ties
    for i, check in enumerate(ranks[0]["helpers"]):
        for pat, mask0 in check["masks"].items():
            both = torch.cat([mask0, ranks[1]["helpers"][i]["masks"][pat]])
            assert torch.equal(both, topk_mask(check["full"], parse_pattern(*pat))), (check["full"].shape, pat)
        assert ranks[0]["helpers"][i]["amax"] == ranks[1]["helpers"][i]["amax"] == float(check["full"].abs().max())

    # z and u live in the local shard (half the rows); ELSA-L's FP8 scale is one per tensor, over both shards
    ref = ADMM("unstructured", 0.5, low_precision=True)
    ref_params = prunable_parameters(_model())
    ref.setup(ref_params)
    for n, p in ref_params.items():
        (zs0, zdt, scale0, us0), (zs1, _, scale1, _) = ranks[0]["setup"][n], ranks[1]["setup"][n]
        assert zs0 == us0 and zs0[0] + zs1[0] == p.shape[0] and zs0[0] == p.shape[0] // 2, n
        assert zdt == torch.float8_e4m3fn
        assert scale0 == scale1 == pytest.approx(float(ref.z_scale[n]), rel=1e-6), n

    # resume is refused with sharded weights; the global batch must split evenly over the ranks
    assert "not supported with FSDP2" in ranks[0]["errors"][0]
    assert "not divisible by the 2 ranks" in ranks[0]["errors"][1]

    for case, got, other in zip(CASES, ranks[0]["cases"], ranks[1]["cases"], strict=True):
        assert all(torch.equal(got["weights"][n], w) for n, w in other["weights"].items())  # ranks agree
        model = _model()
        start = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
        out = _run_case(model, case)
        pat = parse_pattern(*case["pattern"])
        moved = 0
        for n, p in prunable_parameters(model).items():
            w = got["weights"][n]
            assert torch.equal(w != 0, p != 0), (case, n)  # the same mask
            torch.testing.assert_close(w, p.detach(), rtol=1e-9, atol=1e-12,
                                       msg=lambda m, where=(case, n): f"{where}: {m}")
            moved += not torch.equal(w, start[n] * topk_mask(start[n].abs(), pat))
        assert moved > 0, case  # training changed the weights, not just pruned them
        for a, b in zip(got["log"], out["log"], strict=True):
            assert a["step"] == b["step"]
            # transformers computes the loss from logits cast to float32 (loss_utils: logits.float()), even
            # for this float64 model, so two half-batch means and one full-batch mean agree to a few float32
            # ulps (1.1e-7 relative seen), not to float64 rounding; the residuals are float64 throughout
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (case, "loss")
            for k in ("primal_residual", "dual_residual", "mass_outside"):
                assert a[k] == pytest.approx(b[k], rel=1e-7, abs=1e-12), (case, k)


def test_distributed_cli_rejects_bad_arguments_before_starting_a_process_group(tmp_path, capsys):
    import torch.distributed as dist

    from minisparse.distributed import build_parser, main

    out = tmp_path / "out"
    assert main(["--model", "smollm2-135m", "--out", str(out), "--pattern", "2:4", "--sparsity", "0.3"]) == 2
    assert "contradicts" in capsys.readouterr().err
    out.mkdir()
    assert main(["--model", "smollm2-135m", "--out", str(out), "--sparsity", "0.5"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not dist.is_initialized()
    assert "torchrun" in build_parser().format_help()
