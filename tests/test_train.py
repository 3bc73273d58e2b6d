"""The end-to-end training loop and ProxSparse on tiny real architectures: schedule, batches, what is
trained, exact resume, and the learned 2:4 masks applied to the original weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from conftest import tiny_model

from minisparse import parse_pattern, topk_mask
from minisparse.proxsparse import ProxSparseHooks, group_is_24, proxsparse
from minisparse.train import (HookWrapper, TrainConfig, batch_for_step, distillation_loss, lr_at, prunable_parameters,
                              train)


def _stream(n=4000, period=7, seed=0):
    """A learnable token stream: a short random motif repeated, with a little noise."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 256, (period,), generator=g)
    s = motif.repeat(n // period + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.05
    s[noise] = torch.randint(0, 256, (int(noise.sum()),), generator=g)
    return s


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=20, lr=1.0, warmup=0.1)
    lrs = [lr_at(t, cfg) for t in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(1.0 / 18)
    assert lr_at(20, cfg) == 0.0


def test_batches_depend_on_seed_and_step_only():
    s = _stream()
    cfg = TrainConfig(batch_size=3, seqlen=16, seed=5)
    a, b = batch_for_step(s, 4, cfg), batch_for_step(s, 4, cfg)
    assert torch.equal(a, b) and a.shape == (3, 16)
    assert not torch.equal(a, batch_for_step(s, 5, cfg))
    cfg_bos = TrainConfig(batch_size=2, seqlen=16, seed=5, bos=True)
    assert bool((batch_for_step(s, 0, cfg_bos, bos_id=1)[:, 0] == 1).all())
    with pytest.raises(ValueError, match="too short"):
        batch_for_step(s[:10], 0, cfg)


def test_training_lowers_the_loss_and_touches_only_the_prunable_weights():
    model = tiny_model("llama")
    emb = model.get_input_embeddings().weight.detach().clone()
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    flags = [p.requires_grad for p in model.parameters()]
    rep = train(model, _stream(), TrainConfig(steps=40, batch_size=4, seqlen=32, lr=3e-3, log_every=10),
                progress=False)
    assert rep.log[-1]["loss"] < rep.log[0]["loss"] - 0.3
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert all(not torch.equal(p, before[n]) for n, p in prunable_parameters(model).items())
    assert [p.requires_grad for p in model.parameters()] == flags


class _Stop(Exception):
    pass


class _StopAt(HookWrapper):
    """Raise after step ``at``: a process killed in the middle of a run."""

    def __init__(self, inner, at):
        super().__init__(inner)
        self.at = at

    def after_step(self, step, params, lr, opt):
        super().after_step(step, params, lr, opt)
        if step == self.at:
            raise _Stop


def test_resume_from_a_checkpoint_ends_exactly_where_an_uninterrupted_run_does(tmp_path):
    s = _stream()
    kw = dict(steps=12, batch_size=2, seqlen=24, lr=2e-3, log_every=3)
    full = tiny_model("qwen2", seed=1)
    ref_hooks = ProxSparseHooks(lam1=0.5, lam2=0.1)
    ref = train(full, s, TrainConfig(**kw), ref_hooks, progress=False)

    part = tiny_model("qwen2", seed=1)
    cfg = TrainConfig(**kw, checkpoint_every=4, checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(_Stop):
        train(part, s, cfg, _StopAt(ProxSparseHooks(lam1=0.5, lam2=0.1), at=9), progress=False)
    again = tiny_model("qwen2", seed=1)  # a fresh process would reload the model
    rep = train(again, s, cfg, ProxSparseHooks(lam1=0.5, lam2=0.1), progress=False)
    assert rep.resumed_from == 8
    for (n, p), (_, q) in zip(prunable_parameters(full).items(), prunable_parameters(again).items()):
        assert torch.equal(p, q), n
    assert [r["loss"] for r in rep.log] == [r["loss"] for r in ref.log]
    assert [r["mask_change"] for r in rep.log] == [r["mask_change"] for r in ref.log]

    other = TrainConfig(**{**kw, "lr": 1e-3}, checkpoint_every=4, checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="different configuration"):
        train(tiny_model("qwen2", seed=1), s, other, progress=False)


def test_a_resumed_run_reports_its_whole_training_time(tmp_path):
    # the time spent before the checkpoint is carried over: a run resumed once reports both segments
    s = _stream()
    cfg = TrainConfig(steps=8, batch_size=2, seqlen=24, lr=2e-3, log_every=2, checkpoint_every=4,
                      checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(_Stop):
        train(tiny_model("qwen2", seed=1), s, cfg, _StopAt(ProxSparseHooks(lam1=0.5), at=5), progress=False)
    path = tmp_path / "ck" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and 0 < state["seconds"] < 600
    state["seconds"] = 1000.0  # as if the first segment had taken 1000 s
    torch.save(state, path)
    rep = train(tiny_model("qwen2", seed=1), s, cfg, ProxSparseHooks(lam1=0.5), progress=False)
    assert rep.resumed_from == 4
    assert 1000.0 < rep.seconds < 1600.0
    secs = [r["seconds"] for r in rep.log]
    assert [r["step"] for r in rep.log] == [2, 4, 6, 8]
    assert secs[1] < 1000.0 < secs[2] <= secs[3] <= rep.seconds  # the log's clock continues after the resume


def test_distillation_loss_is_the_mean_kl_from_the_teacher_per_predicted_token():
    teacher = tiny_model("llama", seed=2).eval()
    student = tiny_model("llama", seed=3).eval()
    batch = _stream()[:2 * 16].reshape(2, 16)
    with torch.no_grad():
        assert float(distillation_loss(teacher(input_ids=batch).logits, teacher, batch)) == pytest.approx(0, abs=1e-6)
        got = float(distillation_loss(student(input_ids=batch).logits, teacher, batch))
        p = torch.softmax(teacher(input_ids=batch).logits[:, :-1].double(), -1)
        q = torch.softmax(student(input_ids=batch).logits[:, :-1].double(), -1)
        want = float((p * (p.log() - q.log())).sum(-1).mean())  # 2 x 15 predicted tokens
    assert want > 0.01 and got == pytest.approx(want, rel=1e-4)


def test_kd_training_starts_at_zero_loss_and_resumes_exactly(tmp_path):
    model = tiny_model("llama", seed=4)
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    cfg = TrainConfig(steps=6, batch_size=2, seqlen=24, lr=3e-3, log_every=1, loss="kd")
    rep = train(model, _stream(), cfg, ProxSparseHooks(lam1=0.5), progress=False)
    losses = [r["loss"] for r in rep.log]
    # step 0: the trained model is the teacher; afterwards the prox pulls it away and the KL is positive
    assert losses[0] == pytest.approx(0, abs=1e-6) and losses[1] > 0 and min(losses[2:]) > 1e-3
    assert all(not torch.equal(p, before[n]) for n, p in prunable_parameters(model).items())
    # resumed from a checkpoint, a kd run ends where an uninterrupted one does (the teacher is the fresh model)
    ck = TrainConfig(**{**cfg.__dict__, "checkpoint_every": 2, "checkpoint_dir": str(tmp_path / "ck")})
    with pytest.raises(_Stop):
        train(tiny_model("llama", seed=4), _stream(), ck, _StopAt(ProxSparseHooks(lam1=0.5), at=3), progress=False)
    again = tiny_model("llama", seed=4)
    rep2 = train(again, _stream(), ck, ProxSparseHooks(lam1=0.5), progress=False)
    assert rep2.resumed_from == 2 and [r["loss"] for r in rep2.log] == losses
    for (n, p), (_, q) in zip(prunable_parameters(model).items(), prunable_parameters(again).items()):
        assert torch.equal(p, q), n
    # a kd run's checkpoint is not resumed as an lm run
    with pytest.raises(ValueError, match="different configuration"):
        train(tiny_model("llama", seed=4), _stream(), TrainConfig(**{**ck.__dict__, "loss": "lm"}), progress=False)
    with pytest.raises(ValueError, match="loss must be 'lm'"):
        TrainConfig(loss="mse").check()


def test_proxsparse_frozen_weight_gradient_equals_autograd_of_the_added_loss():
    from minisparse.prox import reg_frozen
    torch.manual_seed(0)
    W0 = {"a": torch.randn(8, 12), "b": torch.randn(4, 8) * 0.05}
    params = {n: nn.Parameter(w.clone()) for n, w in W0.items()}
    hooks = ProxSparseHooks(lam1=0.1, lam2=0.7, eps=0.1)
    hooks.setup(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.03 * torch.randn_like(p))
    ref = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    (0.7 * sum(reg_frozen(ref[n], W0[n], 0.1) for n in ref)).backward()
    for p in params.values():
        p.grad = torch.full_like(p, 0.25)  # the loss gradient is kept, the regularizer's added to it
    hooks.before_step(0, params)
    for n in params:
        torch.testing.assert_close(params[n].grad, ref[n].grad + 0.25, rtol=1e-6, atol=1e-7)
        assert (params[n].grad - 0.25).abs().max() > 1e-4  # the regularizer moved the gradient
    assert hooks.extra_loss(params) is None  # and is not added a second time through the loss


def test_proxsparse_learns_24_and_keeps_the_original_weights_on_the_mask():
    model = tiny_model("llama", seed=2)
    original = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    out = proxsparse(model, _stream(), "2:4", lam1=5.0, lr=3e-3, steps=20, batch_size=2, seqlen=32,
                     log_every=5, progress=False)
    log = out["log"]
    assert log[-1]["frac_24"] > log[0]["frac_24"]
    assert out["learned_exact_24"] > 0.5
    for n, p in prunable_parameters(model).items():
        mask = p != 0
        assert bool(group_is_24(p).all()), n  # at most 2 of every 4 survive
        assert int(mask.sum()) == p.numel() // 2  # exactly 2 (the original weights have no zeros)
        assert torch.equal(p[mask], original[n][mask])  # no weight update, only a mask


def test_proxsparse_without_regularisation_or_learning_is_magnitude_24():
    model = tiny_model("mistral", seed=3)
    original = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    proxsparse(model, _stream(), "2:4", lam1=0.0, lr=1e-12, steps=2, batch_size=1, seqlen=16, progress=False)
    pat = parse_pattern("2:4")
    for n, p in prunable_parameters(model).items():
        assert torch.equal(p, original[n] * topk_mask(original[n].abs(), pat)), n


def test_proxsparse_refit_keeps_the_learned_mask_and_refits_the_kept_weights_by_least_squares():
    import copy

    from minisparse.engine import collect_grams
    from minisparse.objective import reconstruct
    from minisparse.train import TrainConfig, batch_for_step

    model = tiny_model("llama", seed=4)
    dense = copy.deepcopy(model)
    original = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    kw = dict(lam1=5.0, lr=3e-3, steps=10, batch_size=2, seqlen=32, progress=False)
    plain = copy.deepcopy(model)
    proxsparse(plain, _stream(), "2:4", **kw)
    out = proxsparse(model, _stream(), "2:4", refit=True, refit_samples=6, **kw)
    assert out["refit"]["samples"] == 6 and 0 < out["refit"]["mean_rel_error"] < 1
    mine, theirs = prunable_parameters(model), prunable_parameters(plain)
    for n in original:
        assert torch.equal(mine[n] != 0, theirs[n] != 0), n  # the same learned mask
        assert not torch.equal(mine[n], theirs[n]), n  # ... with re-fitted values
    # layer 0 sees the dense model's inputs: its q_proj is the least-squares fit on the refit windows
    calib = batch_for_step(_stream(), 10, TrainConfig(batch_size=6, seqlen=32, seed=0))
    _, G = collect_grams(dense, calib, 0)["self_attn.q_proj"]
    name = "layers.0.self_attn.q_proj"
    want = reconstruct(original[name], theirs[name] != 0, G, damp=0.01)
    torch.testing.assert_close(mine[name].detach(), want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kwargs,needle", [
    ({"lam1": -1.0}, "lam1"), ({"lam2": float("nan")}, "lam2"), ({"lam_schedule": "cosine"}, "lam_schedule"),
    ({"steps": 0}, "steps"), ({"warmup": 1.0}, "warmup"), ({"lr": 0.0}, "lr"),
    ({"refit_samples": 0}, "refit_samples"), ({"refit_damp": -0.1}, "refit_damp"),
])
def test_proxsparse_rejects_bad_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        proxsparse(None, None, "2:4", **kwargs)


def test_proxsparse_is_24_only():
    with pytest.raises(ValueError, match="2:4"):
        proxsparse(None, None, parse_pattern("unstructured", 0.5))


def test_fixed_mask_fine_tuning_keeps_pruned_weights_at_zero():
    from minisparse.train import FixedMask

    model = tiny_model("llama", seed=6)
    with torch.no_grad():
        for p in prunable_parameters(model).values():
            p.mul_(topk_mask(p.abs(), parse_pattern("unstructured", 0.7)))
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    train(model, _stream(), TrainConfig(steps=6, batch_size=2, seqlen=16, lr=1e-2, weight_decay=0.1),
          FixedMask(), progress=False)
    for n, p in prunable_parameters(model).items():
        assert torch.equal(p == 0, before[n] == 0), n  # the same mask
        assert not torch.equal(p, before[n]), n  # the kept weights were trained
