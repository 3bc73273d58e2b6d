"""ADMM (ELSA, ELSA-L) and the 8-bit AdamW: exact supports on sparse least squares, residuals, the dual
rescaling, low-precision states, and the end-to-end method on tiny real architectures."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_model

from minisparse import is_feasible, parse_pattern
from minisparse.admm import ADMM, FP8, elsa, penalty_at, state_bytes
from minisparse.optim8 import AdamW8bit, dequantize_signed, dequantize_unsigned, quantize_signed, quantize_unsigned
from minisparse.train import TrainConfig, prunable_parameters, train


def _sparse_ls(seed, n=12, k=4, m=30):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    A[:, 1] = A[:, 0] + 0.3 * A[:, 1]  # correlated columns make greedy supports wrong more often
    xt = torch.zeros(n, dtype=torch.float64)
    xt[torch.randperm(n, generator=g)[:k]] = torch.randn(k, generator=g, dtype=torch.float64) * 2
    b = A @ xt + 0.8 * torch.randn(m, generator=g, dtype=torch.float64)
    return A, b


def _ls_on(A, b, S):
    S = sorted(S)  # same support, same float result, whatever order it came in
    xs = torch.linalg.lstsq(A[:, S], b).solution
    return float(((A[:, S] @ xs - b) ** 2).sum())


def _admm_ls(A, b, k, steps=3000, **options):
    """ADMM hooks around SGD (lr 0.5/L) on ||Ax - b||², from the dense least-squares solution; returns the
    final feasible x (one row) and the hooks."""
    n = A.shape[1]
    x = torch.nn.Parameter(torch.linalg.lstsq(A, b).solution.reshape(1, -1).clone())
    admm = ADMM("unstructured", 1 - k / n, interval=10, schedule="increasing", steps=steps, **options)
    params = {"x": x}
    admm.setup(params)
    lr = 0.5 / float(torch.linalg.matrix_norm(A, 2) ** 2)
    opt = torch.optim.SGD([x], lr=lr)
    for t in range(steps):
        opt.zero_grad()
        ((A @ x.reshape(-1) - b) ** 2).sum().backward()
        admm.before_step(t, params)
        opt.step()
        admm.after_step(t, params, lr, opt)  # lr is used by the decoupled penalty only
    return admm.project(x.detach()).reshape(-1), admm


def _admm_support(A, b, k, low=False, steps=3000):
    x, admm = _admm_ls(A, b, k, steps, lam=1.0, lam_final=100.0, low_precision=low)
    return (x != 0).nonzero().reshape(-1).tolist(), admm


def test_admm_finds_the_best_support_of_small_sparse_least_squares():
    n, k = 12, 4
    ratios, mag_ratios = [], []
    for seed in range(6):
        A, b = _sparse_ls(seed, n, k)
        best = min(_ls_on(A, b, S) for S in itertools.combinations(range(n), k))
        S, admm = _admm_support(A, b, k)
        assert len(S) == k
        ratios.append(_ls_on(A, b, S) / best)
        x0 = torch.linalg.lstsq(A, b).solution
        mag_ratios.append(_ls_on(A, b, torch.topk(x0.abs(), k).indices.tolist()) / best)
        assert admm.last["primal_residual"] < 1e-6  # x and z agree at the end
    assert max(ratios) < 1 + 1e-9, ratios  # the exact optimum on every instance
    assert sum(ratios) <= sum(mag_ratios) * (1 + 1e-12)


def test_decoupled_penalty_is_the_exact_proximal_step_and_stays_out_of_the_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.nn.Parameter(torch.randn(4, 8, generator=g))
    params = {"x": x}
    admm = ADMM("unstructured", 0.5, lam=50.0, interval=1000, penalty="decoupled")
    admm.setup(params)
    admm.u["x"] = torch.randn(4, 8, generator=g)
    x.grad = torch.ones_like(x)
    admm.before_step(0, params)
    assert torch.equal(x.grad, torch.ones_like(x))  # nothing added to the gradient
    x0, z, u, lr = x.detach().clone(), admm.z["x"].clone(), admm.u["x"].clone(), 1e-3
    with torch.no_grad():
        admm.after_step(0, params, lr, None)
    gamma = lr * 50.0
    expect = (x0 + gamma * (z - u)) / (1 + gamma)  # argmin_x 1/2||x - x0||^2 + gamma/2 ||x - z + u||^2
    torch.testing.assert_close(x.detach(), expect, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # it is the minimiser: the gradient of the prox objective vanishes there
        grad = (x - x0) + gamma * (x - z + u)
    assert float(grad.abs().max()) < 1e-6


def test_decoupled_admm_with_adam_reaches_a_feasible_point_and_good_supports():
    """Adam normalises the gradient, so a penalty added to it moves a weight ~lr per step whatever lam is;
    the decoupled proximal step contracts x - (z - u) geometrically. Same Adam, same steps: the decoupled
    form ends feasible (tiny primal residual) with supports at least as good as magnitude's."""
    n, k, steps = 12, 4, 600
    ratios, mag_ratios = [], []
    for seed in range(6):
        A, b = _sparse_ls(seed, n, k)
        best = min(_ls_on(A, b, S) for S in itertools.combinations(range(n), k))
        x0 = torch.linalg.lstsq(A, b).solution
        x = torch.nn.Parameter(x0.reshape(1, -1).clone())
        params = {"x": x}
        admm = ADMM("unstructured", 1 - k / n, lam=20.0, interval=10, schedule="increasing", steps=steps,
                    lam_final=2000.0, penalty="decoupled")
        admm.setup(params)
        opt = torch.optim.Adam([x], lr=0.01)
        for t in range(steps):
            opt.zero_grad()
            ((A @ x.reshape(-1) - b) ** 2).sum().backward()
            admm.before_step(t, params)
            opt.step()
            with torch.no_grad():
                admm.after_step(t, params, 0.01, opt)
        S = (admm.project(x.detach()) != 0).reshape(-1).nonzero().reshape(-1).tolist()
        assert len(S) == k
        assert admm.last["primal_residual"] < 1e-3, admm.last
        ratios.append(_ls_on(A, b, S) / best)
        mag_ratios.append(_ls_on(A, b, torch.topk(x0.abs(), k).indices.tolist()) / best)
    # ties (same support) must compare equal: a 1-ulp rounding difference once failed CI here
    assert sum(ratios) <= sum(mag_ratios) * (1 + 1e-12), (ratios, mag_ratios)


def test_low_precision_states_are_fp8_and_bf16_and_track_full_precision():
    A, b = _sparse_ls(3)
    S, admm = _admm_support(A, b, 4)
    S_low, low = _admm_support(A, b, 4, low=True)
    assert low.z["x"].dtype == FP8 and low.u["x"].dtype == torch.bfloat16
    assert admm.z["x"].dtype == torch.float64  # full precision keeps the parameter's dtype
    assert sorted(S_low) == sorted(S)
    assert low.bytes_per_param() < 3.5  # 1 (z) + 2 (u) + a per-tensor scale


def test_error_feedback_keeps_the_exact_target_and_the_exact_dual():
    """One z-update of ELSA-L with and without error feedback from the same state: the stored dual on the
    pruned entries is the same, and the x-update's target ẑ - u on the kept entries is the exact z."""
    assert ADMM("unstructured", 0.5, low_precision=True).error_feedback  # ELSA-L's default
    assert not ADMM("unstructured", 0.5).error_feedback
    g = torch.Generator().manual_seed(5)
    x = torch.nn.Parameter(torch.randn(8, 32, generator=g) * torch.rand(8, 32, generator=g))
    plain, fb = (ADMM("unstructured", 0.75, lam=1.0, interval=1, low_precision=True, error_feedback=e) for e in (False, True))
    for a in (plain, fb):
        a.setup({"x": x})
    z0 = plain.project(x.detach())
    assert torch.allclose((fb._get_z("x") - fb._get_u("x"))[z0 != 0], z0[z0 != 0], rtol=2**-10, atol=0)  # from setup on
    for step in range(3):  # the second and third updates read back the dual that feedback stored
        with torch.no_grad():
            x.add_(0.1 * torch.randn(8, 32, generator=g))
            u_exact = plain._get_u("x")  # what the dual is before this update (plain ELSA-L stores it as is)
            z_exact = plain.project(x.detach() + u_exact)
            plain.after_step(step, {"x": x})
            fb.after_step(step, {"x": x})
        kept = z_exact != 0
        assert torch.equal(fb._get_z("x") != 0, kept)
        assert torch.equal(fb._get_u("x")[~kept], plain._get_u("x")[~kept])  # the true dual where pruned
        target_fb = (fb._get_z("x") - fb._get_u("x"))[kept]
        target_plain = (plain._get_z("x") - plain._get_u("x"))[kept]
        err_plain = (target_plain - z_exact[kept]).abs().max()
        err_fb = (target_fb - z_exact[kept]).abs().max()
        assert err_plain > 1e-3  # FP8: a rounding of a few percent
        assert err_fb < err_plain / 100  # only BF16's rounding of the rounding error is left


def test_error_feedback_elsa_l_ends_next_to_elsa_on_sparse_least_squares():
    """Without feedback ELSA-L's kept weights stop on the FP8 grid (one rounding, ~1e-2 relative); with it they
    end next to ELSA's, same support."""
    n, k, m, steps = 40, 10, 80, 1500
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(m, n, generator=g, dtype=torch.float64)
        x_true = torch.zeros(n, dtype=torch.float64)
        x_true[:k] = 3 * torch.randn(k, generator=g, dtype=torch.float64)
        b = A @ x_true + 0.5 * torch.randn(m, generator=g, dtype=torch.float64)
        L = float(torch.linalg.matrix_norm(A, 2) ** 2)
        finals = {name: _admm_ls(A, b, k, steps, lam=0.01 * L, lam_final=10 * L, penalty="decoupled", **kw)[0]
                  for name, kw in (("elsa", {}), ("plain", {"low_precision": True, "error_feedback": False}),
                                   ("feedback", {"low_precision": True, "error_feedback": True}))}
        e = finals["elsa"]
        d_plain = float((finals["plain"] - e).norm() / e.norm())
        d_fb = float((finals["feedback"] - e).norm() / e.norm())
        assert torch.equal(finals["feedback"] != 0, e != 0)
        assert d_fb < 1e-3 and d_fb < d_plain / 10, (d_fb, d_plain)


def test_dual_is_rescaled_when_the_penalty_changes():
    x = torch.nn.Parameter(torch.randn(4, 8))
    admm = ADMM("2:4", lam=1.0, interval=1, schedule="increasing", steps=10, lam_final=10.0)
    admm.setup({"w": x})
    admm.u["w"] = torch.randn(4, 8)
    lam_u = admm.lam * admm.u["w"].clone()
    with torch.no_grad():
        x.copy_(admm.z["w"])  # x = z: the z-update then keeps z and u unchanged up to the rescaling
    admm.after_step(0, {"w": x})
    z = admm.z["w"]
    expected_u = lam_u / admm.lam + x.detach() - z
    assert admm.lam == pytest.approx(penalty_at(1, 1.0, "increasing", 10, 10.0))
    assert torch.allclose(admm.u["w"], expected_u, atol=1e-6)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.7), ("row", 0.5), ("2:4", None)])
def test_finalize_is_feasible(pattern, sparsity):
    x = torch.nn.Parameter(torch.randn(8, 16))
    admm = ADMM(pattern, sparsity)
    admm.setup({"w": x})
    admm.finalize({"w": x})
    assert is_feasible(x.detach() != 0, parse_pattern(pattern, sparsity))


def test_fisher_projection_uses_the_second_moment():
    x = torch.nn.Parameter(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    opt = torch.optim.Adam([x])
    x.grad = torch.tensor([[10.0, 10.0, 0.01, 0.01]])
    opt.step()
    admm = ADMM("2:4", projection="fisher")
    admm.bind(opt)
    kept = admm.project(x.detach(), x) != 0
    assert kept.tolist() == [[True, True, False, False]]  # large curvature beats large magnitude
    assert (ADMM("2:4").project(x.detach(), x) != 0).tolist() == [[False, False, True, True]]


def test_8bit_quantizers_round_trip_within_their_resolution():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1000, generator=g) * torch.logspace(-4, 0, 1000)
    q, a = quantize_signed(t)
    back = dequantize_signed(q, a, t)
    assert q.dtype == torch.int8 and back.shape == t.shape
    assert float((back - t).abs().max()) <= float(a.max()) * (1 / 127) * 2
    v = t.abs()
    qv, av = quantize_unsigned(v)
    assert qv.dtype == torch.uint8
    back_v = dequantize_unsigned(qv, av, v)
    scale = av.repeat_interleave(256)[: v.numel()]
    code = 255 * (v / scale) ** 0.25  # 8 bits of v^(1/4): relative error about 4 * 0.5 / code
    assert bool(((back_v - v).abs() <= v * 2.2 / code + 1e-12).all())


def test_adamw8bit_tracks_adamw_and_stores_two_bytes_per_parameter():
    g = torch.Generator().manual_seed(1)
    H = torch.randn(256, 256, generator=g)
    H = H @ H.T / 256 + 0.1 * torch.eye(256)
    c = torch.randn(256, generator=g)
    runs = {}
    for name, cls in (("fp32", torch.optim.AdamW), ("8bit", AdamW8bit)):
        x = torch.nn.Parameter(torch.zeros(256))
        opt = cls([x], lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            (0.5 * x @ H @ x - c @ x).backward()
            opt.step()
        runs[name] = (x.detach().clone(), opt)
    opt_val = torch.linalg.solve(H, c)
    err = lambda v: float(torch.linalg.norm(v - opt_val) / torch.linalg.norm(opt_val))  # noqa: E731
    assert err(runs["8bit"][0]) < max(3 * err(runs["fp32"][0]), 0.05)
    assert runs["8bit"][1].state_bytes() == 256 * 2 + 2 * 4  # one byte per moment + one scale per block


def test_state_bytes_model():
    full, low = state_bytes(False, 32), state_bytes(True, 8)
    assert full["total"] == 4 + 4 + 8 + 4 + 4
    assert low["total"] == 4 + 4 + 2 + 1 + 2


def test_elsa_on_a_tiny_model_is_feasible_and_resumes_exactly(tmp_path):
    s = torch.arange(3000) % 97
    kw = dict(pattern="unstructured", lam=0.05, interval=2, steps=8, batch_size=2, seqlen=24, lr=1e-3, log_every=2,
              low_precision=True, optimizer="adamw8bit", progress=False)
    a = tiny_model("llama", seed=4)
    out = elsa(a, s, parse_pattern("unstructured", 0.6), **{k: v for k, v in kw.items() if k != "pattern"})
    for n, p in prunable_parameters(a).items():
        assert is_feasible(p != 0, parse_pattern("unstructured", 0.6)), n
    assert out["log"][-1]["mass_outside"] < out["log"][0]["mass_outside"] or out["log"][0]["mass_outside"] < 0.5
    assert "primal_residual" in out["log"][-1]

    b = tiny_model("llama", seed=4)
    ck = str(tmp_path / "ck")
    args = {k: v for k, v in kw.items() if k != "pattern"}
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(b, s, 5, ck, args)
    c = tiny_model("llama", seed=4)
    elsa(c, s, parse_pattern("unstructured", 0.6), checkpoint_every=2, checkpoint_dir=ck, **args)
    for (n, p), (_, q) in zip(prunable_parameters(a).items(), prunable_parameters(c).items()):
        assert torch.equal(p, q), n


def _interrupt_after(model, s, step, ck, args):
    """Run elsa but raise KeyboardInterrupt after ``step`` optimizer steps (a killed process)."""
    import minisparse.admm as admm_mod

    orig = admm_mod.ADMM.after_step

    def after(self, t, params, lr=0.0, optimizer=None):
        orig(self, t, params, lr, optimizer)
        if t + 1 == step:
            raise KeyboardInterrupt

    admm_mod.ADMM.after_step = after
    try:
        elsa(model, s, parse_pattern("unstructured", 0.6), checkpoint_every=2, checkpoint_dir=ck, **args)
    finally:
        admm_mod.ADMM.after_step = orig


@pytest.mark.parametrize("kwargs,needle", [
    ({"lam": 0.0}, "penalty lam"), ({"interval": 0}, "interval"), ({"projection": "hessian"}, "projection"),
    ({"schedule": "cosine"}, "schedule"), ({"optimizer": "sgd"}, "optimizer"), ({"penalty": "l1"}, "penalty must"),
    ({"error_feedback": True}, "needs low_precision"),
])
def test_elsa_rejects_bad_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        elsa(None, None, parse_pattern("unstructured", 0.5), **kwargs)


def test_train_rejects_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        train(tiny_model("llama"), torch.arange(100), TrainConfig(optimizer="lion"), progress=False)
