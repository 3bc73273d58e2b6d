"""The command line on the bundled model: a checkpoint transformers loads, a report we can reproduce,
and bad input that fails fast with a clear message and no output directory."""
import json
import subprocess
import sys

import pytest
import torch

from minisparse.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minisparse", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "sparsity must lie in [0, 1)"),
    (["--sparsity", "-0.2"], "sparsity must lie in [0, 1)"),
    (["--pattern", "4:4"], "needs 0 < N < M"),
    (["--pattern", "2:5"], "not divisible by M=5"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "fixes the sparsity at 0.5"),
    (["--method", "obs-magic", "--sparsity", "0.5"], "unknown method 'obs-magic'; choose one of"),
    (["--model", "no-such-model", "--sparsity", "0.5"], "unknown model 'no-such-model'"),
    (["--sparsity", "0.5", "--calib-samples", "0"], "--calib-samples must be an integer >= 1"),
    (["--sparsity", "0.5", "--calib-text", "nowhere"], "--calib-text 'nowhere' is not known"),
    (["--sparsity", "0.5", "--seqlen", "1000000", "--calib-samples", "1"], "too short for a window"),
    (["--method", "sparsefw", "--sparsity", "0.5", "-o", "alfa=1"], "has no option 'alfa'; its options"),
    (["--method", "sparsefw", "--sparsity", "0.5", "-o", "alpha=2"], "alpha (the fraction of kept weights"),
    (["--method", "sparsefw", "--pattern", "2:4", "-o", "warm_start=obs"], "warm_start must be one of"),
    (["--method", "wanda", "--sparsity", "0.5", "-o", "per"], "written KEY=VALUE"),
    (["--method", "proxsparse", "--sparsity", "0.5"], "ProxSparse learns 2:4 masks"),
    (["--method", "proxsparse", "--pattern", "2:4", "-o", "lam1=-2"], "lam1 must be a finite number"),
])
def test_bad_input_fails_fast_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["prune", *args, "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial directory either


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", "--sparsity", "0.5", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_help_explains_the_commands():
    res = _run("prune", "--help")
    assert res.returncode == 0
    for flag in ("--pattern", "--calib-samples", "--seqlen", "--seed", "--device", "--out", "N:M"):
        assert flag in res.stdout


@pytest.mark.slow
def test_prune_writes_a_checkpoint_that_transformers_loads_and_eval_reproduces(tmp_path):
    out = tmp_path / "pruned"
    res = _run("prune", "--model", "smollm2-135m", "--method", "magnitude", "--pattern", "2:4",
               "--calib-samples", "2", "--seqlen", "32", "--eval-windows", "3", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "method", "pattern", "requested_sparsity", "measured_sparsity", "dense_ppl", "pruned_ppl",
                "eval", "calibration", "wall_seconds", "peak_rss_mb"):
        assert key in report
    assert report["eval"]["windows"] == 3 and report["eval"]["seqlen"] == 32
    assert report["calibration"] == {"text": "wikipedia", "part": "calib", "samples": 2, "seqlen": 32, "seed": 0,
                                     "tokens": 64}
    assert report["pruned_ppl"] > report["dense_ppl"]

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    # 2:4 prunes exactly half; the 4-bit dense weights hold a few exact zeros of their own (< 1e-5)
    assert 0.5 <= zeros / sum(w.numel() for w in weights) < 0.5 + 1e-5
    assert report["measured_sparsity"] == pytest.approx(zeros / sum(w.numel() for w in weights))
    assert all(((w.reshape(-1, 4) == 0).sum(1) >= 2).all() for w in weights)

    again = _run("eval", str(out), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ppl"] == pytest.approx(report["pruned_ppl"], rel=1e-4)


@pytest.mark.slow
def test_solver_options_reach_the_solver_and_the_report(tmp_path):
    out = tmp_path / "fw"
    res = _run("prune", "--method", "sparsefw", "--pattern", "2:4", "-o", "iterations=3", "-o", "alpha=0.5",
               "-o", "warm_start=ria", "--calib-samples", "2", "--seqlen", "32", "--eval-windows", "2",
               "--skip-dense-eval", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["solver_options"] == {"iterations": 3, "alpha": 0.5, "warm_start": "ria"}
    stats = [m["stats"] for m in report["engine"]["matrices"]]
    assert len(stats) == 30 * 7
    assert all(s["iterations"] == 3 and s["alpha"] == 0.5 and s["warm_start"] == "ria" for s in stats)
    assert all(s["objective"] <= s["objective_warm"] * (1 + 1e-6) for s in stats)
    assert abs(report["measured_sparsity"] - 0.5) < 1e-3


@pytest.mark.slow
def test_proxsparse_from_the_cli_learns_a_24_mask_of_the_original_weights(tmp_path):
    out = tmp_path / "prox"
    res = _run("prune", "--method", "proxsparse", "--pattern", "2:4", "-o", "steps=2", "-o", "batch_size=1",
               "-o", "lam1=1.0", "-o", "log_every=1", "--seqlen", "32", "--eval-windows", "2",
               "--skip-dense-eval", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "proxsparse"
    assert abs(report["measured_sparsity"] - 0.5) < 1e-3
    log = report["engine"]["training"]["log"]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    assert report["calibration"]["tokens"] == 2 * 32
