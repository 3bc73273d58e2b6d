import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import minisparse as ms
from minisparse.sparse_linear import SparseLinear, sparse_bytes, sparsify_model


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_equals_the_dense_pruned_layer(sparsity, bias):
    g = torch.Generator().manual_seed(int(sparsity * 100) + bias)
    lin = torch.nn.Linear(24, 10, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 24, generator=g))
        if sparsity:
            lin.weight.copy_(ms.magnitude(lin.weight, None, ms.parse_pattern("unstructured", sparsity)).weight)
    sp = SparseLinear.from_linear(lin)
    for shape in [(1, 24), (7, 24), (2, 3, 24)]:  # one token, a batch, a batch of sequences
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    assert sp.weight.layout == torch.sparse_csr and sp.weight._nnz() == int((lin.weight != 0).sum())


def test_sparse_bytes_counts_values_indices_and_row_pointers():
    w = torch.zeros(4, 8)
    w[0, 1], w[3, 7] = 1.0, -2.0
    b = sparse_bytes(w)
    assert b == {"dense": 128, "csr": 2 * (4 + 8) + 5 * 8, "nnz": 2}


def test_sparsified_model_gives_the_same_logits():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    pat = ms.parse_pattern("unstructured", 0.7)
    with torch.no_grad():
        for layer in ms.decoder_layers(model):
            for lin in ms.prunable_linears(layer).values():
                lin.weight.copy_(ms.magnitude(lin.weight, None, pat).weight)
        ids = torch.randint(0, 64, (2, 16))
        ref = model(input_ids=ids).logits
        assert sparsify_model(model) == 2 * 7
        kinds = {type(m) for layer in model.model.layers for n, m in layer.named_modules() if n.endswith("_proj")}
        assert kinds == {SparseLinear}
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_bad_requests_are_clear():
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        SparseLinear(torch.randn(4, 8), None, "2:4")
    with pytest.raises(ValueError, match="kind must be one of"):
        SparseLinear(torch.randn(4, 8), None, "bsr")
    with pytest.raises(ValueError, match="2-D"):
        SparseLinear(torch.randn(4, 8, 2), None, "csr")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_24_on_cuda():
    w = ms.magnitude(torch.randn(128, 128), None, ms.parse_pattern("2:4")).weight.half().cuda()
    sp = SparseLinear(w, None, "2:4")
    x = torch.randn(32, 128, dtype=torch.half, device="cuda")
    torch.testing.assert_close(sp(x), torch.nn.functional.linear(x, w), rtol=1e-2, atol=1e-2)
