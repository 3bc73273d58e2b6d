"""The engine hands each solver the right G: checked against hooks on a plain full forward pass."""
import pytest
import torch

from minisparse.engine import prune_model
from minisparse.methods import Method, SolverResult
from minisparse.models import decoder_layers, prunable_linears
from minisparse.patterns import parse_pattern, topk_mask
from conftest import FAMILIES, tiny_model


def _recording(method_name: str = "record", prune: bool = False):
    seen = {}

    def solver(W, G, pattern):
        seen.setdefault("calls", []).append((W.clone(), G.clone()))
        mask = topk_mask(W.abs(), pattern) if prune else torch.ones_like(W, dtype=torch.bool)
        return SolverResult(W * mask, mask)

    return Method(method_name, solver), seen


def _reference_grams(model, ids):
    """G for every (layer, linear) from hooks on an ordinary forward of the whole model."""
    grams, handles = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in prunable_linears(layer).items():
            def hook(mod, args, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_grams_equal_a_full_forward(family):
    """Identity solver: every G the engine builds equals the one from a plain forward pass, for every
    layer, which holds only if positions, masks (sliding windows too) and layer outputs are right."""
    model = tiny_model(family)
    ids = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = _reference_grams(model, ids)
    method, seen = _recording()
    report = prune_model(model, ids, method, parse_pattern("2:4"), batch_size=2, progress=False)
    keys = [(m["layer"], m["name"]) for m in report.matrices]
    assert len(keys) == 3 * 7
    for key, (_, G) in zip(keys, seen["calls"]):
        torch.testing.assert_close(G.double(), ref[key], rtol=2e-4, atol=1e-3)


def test_later_layers_see_the_pruned_outputs():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    method, seen = _recording(prune=True)
    report = prune_model(model, ids, method, parse_pattern("2:4"), batch_size=4, progress=False)
    ref = _reference_grams(model, ids)  # the final, pruned model
    # q_proj of each layer reads the layer input, which only depends on the (pruned) earlier layers
    for (m, (_, G)) in zip(report.matrices, seen["calls"]):
        if m["name"].endswith("q_proj"):
            torch.testing.assert_close(G.double(), ref[(m["layer"], m["name"])], rtol=2e-4, atol=1e-3)
    for layer in decoder_layers(model):
        for lin in prunable_linears(layer).values():
            assert ((lin.weight.reshape(-1, 4) == 0).sum(dim=1) >= 2).all()
            # pruned entries are +0.0, never -0.0, so a compressed checkpoint round-trips bit for bit
            assert not torch.signbit(lin.weight[lin.weight == 0]).any()


def test_magnitude_on_the_real_model_first_layers(smollm):
    import copy

    model = copy.deepcopy(smollm.model)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    report = prune_model(model, ids, "magnitude", "unstructured", sparsity=0.6, layers=[0, 1], progress=False)
    assert len(report.matrices) == 14
    assert report.sparsity == pytest.approx(0.6, abs=1e-6)
    for m in report.matrices:
        assert m["sparsity"] == pytest.approx(0.6, abs=1e-5)
        assert 0 < m["rel_error"] < 1
    untouched = decoder_layers(model)[2].mlp.up_proj.weight
    assert torch.equal(untouched, decoder_layers(smollm.model)[2].mlp.up_proj.weight)


def test_nan_weights_are_rejected_before_anything_changes():
    model = tiny_model("llama")
    before = decoder_layers(model)[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        decoder_layers(model)[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 2 mlp.down_proj.*NaN"):
        prune_model(model, torch.zeros(2, 8, dtype=torch.long), "magnitude", "2:4", progress=False)
    assert torch.equal(decoder_layers(model)[0].self_attn.q_proj.weight, before)


def test_nm_that_does_not_divide_the_width_is_rejected():
    model = tiny_model("llama")  # widths 64 and 96
    with pytest.raises(ValueError, match="not divisible by M=5"):
        prune_model(model, torch.zeros(2, 8, dtype=torch.long), "magnitude", "2:5", progress=False)


def test_nan_activations_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[3] = float("inf")
    ids = torch.full((2, 8), 3, dtype=torch.long)
    with pytest.raises(ValueError, match="Gram matrix .* NaN or inf"):
        prune_model(model, ids, "magnitude", "2:4", progress=False)


def _random_24_masks(model, seed=0):
    from minisparse.train import prunable_parameters

    g = torch.Generator().manual_seed(seed)
    return {n: topk_mask(torch.rand(p.shape, generator=g), parse_pattern("2:4"))
            for n, p in prunable_parameters(model).items()}


def test_prune_with_masks_applies_each_mask_to_its_own_matrix_and_refits_by_least_squares():
    import copy

    from minisparse.engine import prune_with_masks
    from minisparse.objective import reconstruct, relative_error
    from minisparse.train import prunable_parameters

    model = tiny_model("llama", seed=2)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    masks = _random_24_masks(model)  # a different random mask for every matrix: a mix-up would show
    dense = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    G0 = _reference_grams(model, ids)  # layer 0 sees the dense model's inputs in both walks

    only = copy.deepcopy(model)
    prune_with_masks(only, ids, masks, reconstruct=False, batch_size=2, progress=False)
    for n, p in prunable_parameters(only).items():
        assert torch.equal(p, dense[n] * masks[n])

    report = prune_with_masks(model, ids, masks, damp=0.01, batch_size=2, progress=False)
    for n, p in prunable_parameters(model).items():
        assert torch.equal(p != 0, masks[n]), n  # the kept weights are re-fitted, never pruned or added
    for m in report.matrices:
        if m["layer"] == 0:
            n = f"layers.0.{m['name']}"
            G = G0[(0, m["name"])].float()
            want = reconstruct(dense[n], masks[n], G, damp=0.01)
            got = prunable_parameters(model)[n].detach()
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
            # least squares beats keeping the original values on the same inputs
            assert relative_error(dense[n], got, G) < relative_error(dense[n], dense[n] * masks[n], G)


def test_prune_with_masks_rejects_masks_that_do_not_fit_and_changes_nothing():
    from minisparse.engine import prune_with_masks
    from minisparse.train import prunable_parameters

    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    ids = torch.zeros(2, 8, dtype=torch.long)
    masks = _random_24_masks(model)
    name = next(iter(masks))
    with pytest.raises(ValueError, match="missing .*" + name.replace(".", r"\.")):
        prune_with_masks(model, ids, {k: v for k, v in masks.items() if k != name}, progress=False)
    with pytest.raises(ValueError, match="mask of shape"):
        prune_with_masks(model, ids, {**masks, name: masks[name][:, :4]}, progress=False)
    for n, p in prunable_parameters(model).items():
        assert torch.equal(p, before[n])


def test_masks_round_trip_through_a_file(tmp_path):
    from minisparse.engine import load_masks, save_masks

    g = torch.Generator().manual_seed(3)
    masks = {"a": torch.rand(5, 7, generator=g) > 0.5, "b": torch.rand(3, 8, generator=g) > 0.3,
             "c": torch.ones(1, 1, dtype=torch.bool)}
    path = save_masks(masks, tmp_path / "sub" / "m.pt")
    back = load_masks(path)
    assert set(back) == set(masks) and all(torch.equal(back[k], masks[k]) for k in masks)
    assert not list((tmp_path / "sub").glob("*.tmp"))
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a mask file"):
        load_masks(tmp_path / "other.pt")
