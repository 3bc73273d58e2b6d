"""Shared fixtures: the bundled model (loaded once per session) and tiny randomly initialised decoders."""
from __future__ import annotations

import pytest
import torch
from hypothesis import settings as _hypothesis_settings

# Property tests check results, not speed: a per-example deadline turns a loaded CI machine into failures
# (a 0.8 ms example took 488 ms once beside benchmark jobs). Speed is measured by benchmarks/.
_hypothesis_settings.register_profile("minisparse", deadline=None)
_hypothesis_settings.load_profile("minisparse")


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M (real pretrained weights), float32 on CPU."""
    import minisparse.models as mm

    return mm.load_model("smollm2-135m")


def tiny_config(family: str):
    """A 2-3 layer decoder config of a real architecture, small enough to run in milliseconds."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=8)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]
