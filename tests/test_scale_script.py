"""benchmarks/scale_gpu.py, the GPU benchmark of a 7B-shaped model, exercised at tiny scale on the CPU."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "vocab_size": 512})


def _script():
    spec = importlib.util.spec_from_file_location("scale_gpu", ROOT / "benchmarks" / "scale_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method, extra", [("sparsegpt", ["--calib-samples", "4"]), ("elsa-l", ["--batch-size", "2"])])
def test_tiny_run_prunes_and_records_the_plan(tmp_path, method, extra):
    res = _script().run(["--device", "cpu", "--dtype", "bfloat16", "--config-override", TINY, "--num-layers", "2",
                         "--seqlen", "32", "--sparsity", "0.6", "--method", method, "--out-dir", str(tmp_path), *extra])
    saved = json.loads(next(tmp_path.glob(f"*-{method}-L2-cpu.json")).read_text())
    assert saved["method"] == method and saved["config"]["num_hidden_layers"] == 2
    assert abs(saved["measured_sparsity"] - 0.6) < 1e-3  # the model really was pruned
    assert saved["plan"]["host_peak_bytes"] > 0 and saved["host_peak_bytes"] > 0
    assert saved["host_ratio_predicted_over_measured"] == pytest.approx(
        saved["plan"]["host_peak_bytes"] / saved["host_peak_bytes"])
    if method == "elsa-l":
        assert res["admm_state_bytes_per_param"] == pytest.approx(3.0, abs=0.01)  # FP8 z + BF16 u


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        _script().run(["--method", "wanda", "--out-dir", str(tmp_path)])
