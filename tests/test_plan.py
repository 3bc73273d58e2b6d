"""The memory model behind `minisparse plan`: parameter counts, terms, and the command line."""
from __future__ import annotations

import json

import pytest

from minisparse.cli import main
from minisparse.plan import KNOWN_CONFIGS, model_shape, plan


@pytest.mark.parametrize("name,params", [
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),  # the published parameter counts
    ("meta-llama/Llama-3.1-8B", 8_030_261_248),
])
def test_parameter_counts_match_the_published_ones(name, params):
    assert model_shape(KNOWN_CONFIGS[name]).params == params


def test_parameter_count_of_the_bundled_model_is_exact(smollm):
    shape = model_shape(smollm.model.config.to_dict())
    assert shape.params == sum(p.numel() for p in smollm.model.parameters())
    from minisparse.train import prunable_parameters

    assert shape.prunable_params == sum(p.numel() for p in prunable_parameters(smollm.model).values())


def test_terms_add_up_and_grow_with_the_calibration_set():
    a = plan("llama-2-7b", "sparsegpt", calib_samples=64, seqlen=2048, dtype="bfloat16", device="cuda")
    b = plan("llama-2-7b", "sparsegpt", calib_samples=128, seqlen=2048, dtype="bfloat16", device="cuda")
    assert a["device_peak_bytes"] == sum(a["terms"].values()) + 500 * 2**20
    assert b["terms"]["hidden_states"] == 2 * a["terms"]["hidden_states"]
    assert b["terms"]["hidden_states"] == 2 * 128 * 2048 * 4096 * 2
    assert b["terms"]["gram_matrices"] == 4 * (3 * 4096**2 + 11008**2)


def test_low_precision_admm_state_is_smaller():
    full = plan("llama-2-7b", "elsa", steps_batch=1, seqlen=2048, dtype="bfloat16", device="cuda",
                grad_checkpointing=True)
    low = plan("llama-2-7b", "elsa-l", steps_batch=1, seqlen=2048, dtype="bfloat16", device="cuda",
               grad_checkpointing=True)
    p = full["prunable_params"]
    assert full["terms"]["admm_z_u"] == 8 * p and low["terms"]["admm_z_u"] == 3 * p
    assert full["terms"]["adam_moments"] == 8 * p and low["terms"]["adam_moments"] == 2 * p
    assert low["device_peak_bytes"] < 80 * 2**30 < full["device_peak_bytes"]


def test_bad_model_and_method_fail_clearly(capsys):
    assert main(["plan", "--model", "no-such-config", "--method", "wanda"]) == 2
    assert "cannot read a model config" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--method", "obs"]) == 2
    assert "unknown method 'obs'" in capsys.readouterr().err


def test_cli_prints_json(capsys):
    assert main(["plan", "--model", "gemma-2-27b", "--method", "wanda", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["head_dim"] == 128 and out["shape"]["tied"] is True
    assert out["host_peak_bytes"] > out["params"] * 2  # the bf16 model waits in host memory
