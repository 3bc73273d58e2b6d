"""benchmarks/scale_gpu.py, the GPU benchmark of a 7B-shaped model, exercised at tiny scale on the CPU in bf16."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minisparse.patterns import is_feasible, parse_pattern
from minisparse.train import prunable_parameters

ROOT = Path(__file__).resolve().parent.parent
TINY = json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "vocab_size": 512})
BASE = ["--device", "cpu", "--dtype", "bfloat16", "--config-override", TINY, "--num-layers", "2", "--seqlen", "32",
        "--no-progress"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("scale_gpu", ROOT / "benchmarks" / "scale_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_pruned(model, pattern) -> None:
    params = prunable_parameters(model)
    assert len(params) == 2 * 7 and all(p.dtype == torch.bfloat16 for p in params.values())
    for name, p in params.items():
        assert is_feasible(p.detach() != 0, pattern), name  # exactly the pattern's zeros, every matrix


def _check_common(saved: dict, method: str) -> None:
    assert saved["method"] == method and saved["config"]["num_hidden_layers"] == 2
    assert saved["config"]["hidden_size"] == 64 and saved["dtype"] == "bfloat16" and saved["status"] == "ok"
    assert saved["torch"] == torch.__version__ and saved["gpu"] is None
    assert saved["command"].startswith("python benchmarks/scale_gpu.py --device cpu")
    # the predicted-vs-measured host peak is there (a tiny model is all runtime: no tight ratio asserted)
    assert saved["plan"]["host_peak_bytes"] > 0 and saved["host_peak_bytes"] > 0 and saved["plan"]["terms"]
    assert saved["measured_over_predicted"]["host"] == pytest.approx(
        saved["host_peak_bytes"] / saved["plan"]["host_peak_bytes"])


def test_layerwise_case_prunes_and_records_time_and_plan(script, tmp_path):
    result, model = script.main([*BASE, "--method", "sparsegpt", "--sparsity", "0.6", "--calib-samples", "4",
                                 "--batch-size", "2", "--out-dir", str(tmp_path)], return_model=True)
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["llama-2-7b-sparsegpt-L2-s0.6-n4x32-b2-bfloat16-cpu.json"]
    saved = json.loads(files[0].read_text())
    assert saved == json.loads(json.dumps(result))
    _check_common(saved, "sparsegpt")
    _check_pruned(model, parse_pattern("unstructured", 0.6))
    assert saved["model_sparsity"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len(saved["layer_seconds"]) == 2 and all(s > 0 for s in saved["layer_seconds"])
    assert saved["seconds_per_layer"] == pytest.approx(saved["layer_seconds"][1])
    assert set(saved["plan"]["terms"]) >= {"layer_weights", "hidden_states", "gram_matrices", "solver_workspace"}
    assert saved["calib_tokens"] == 4 * 32 and len(saved["matrices"]) == 14


def test_elsa_l_case_trains_in_bf16_and_times_steps(script, tmp_path):
    result, model = script.main([*BASE, "--method", "elsa-l", "--pattern", "2:4", "--steps", "3", "--interval", "2",
                                 "--batch-size", "2", "--out-dir", str(tmp_path)], return_model=True)
    saved = json.loads(next(tmp_path.glob("llama-2-7b-elsa-l-L2-2of4-steps3-b2x32-i2-bfloat16-cpu.json")).read_text())
    _check_common(saved, "elsa-l")
    _check_pruned(model, parse_pattern("2:4"))
    assert saved["admm_state_bytes_per_param"] == pytest.approx(3.0, abs=0.01)  # FP8 z + BF16 u
    assert [s["z_update"] for s in saved["steps"]] == [False, True, False]
    assert saved["step_seconds"] == pytest.approx((saved["steps"][1]["seconds"] + saved["steps"][2]["seconds"]) / 2)
    assert saved["z_update_seconds"] == saved["steps"][1]["after_step_seconds"] > 0
    assert saved["tokens"] == 3 * 2 * 32 and all(torch.isfinite(torch.tensor(r["loss"])) for r in saved["log"])
    assert {"adam_moments", "admm_z_u", "activations"} <= set(saved["plan"]["terms"])


def test_cuda_without_a_gpu_is_a_clear_error(script, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this project's CPU machine
    with pytest.raises(SystemExit, match=r"no CUDA device.*--device cpu"):
        script.main(["--method", "wanda", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_bad_arguments_fail_before_building(script, tmp_path, capsys):
    for bad, says in ((["--method", "elsa-l", "--steps", "1"], "--steps must be >= 2"),
                      (["--method", "elsa-l", "-o", "steps=5"], "use --steps"),
                      (["--method", "sparsefw", "-o", "alpha=2", "-o", "nonsense=1"], "no option 'nonsense'")):
        with pytest.raises(SystemExit):
            script.main([*BASE, *bad, "--out-dir", str(tmp_path)])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has only 32 layers"):
        script.main(["--device", "cpu", "--num-layers", "40", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_random_model_is_seeded_tied_and_keeps_its_buffers(script):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {"model_type": "llama", **json.loads(TINY), "num_hidden_layers": 2, "tie_word_embeddings": True}
    a, b = (script.build_model(config, torch.bfloat16, seed=3, workers=w) for w in (1, 3))
    other = script.build_model(config, torch.bfloat16, seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), other.parameters()):
        assert p.dtype == torch.bfloat16 and not p.is_meta and torch.equal(p, q), name  # threads do not matter
        if p.ndim == 2:
            assert not torch.equal(p, r) and abs(float(p.detach().float().std()) - 0.02) < 0.004, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name  # RMSNorm weights
    assert a.lm_head.weight is a.model.embed_tokens.weight
    cfg = dict(config)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert len(list(a.buffers())) == len(list(reference.buffers())) > 0
    for (name, buf), ref in zip(a.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buf, ref, msg=name)  # the rotary frequencies, built normally
