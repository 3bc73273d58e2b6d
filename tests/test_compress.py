"""Compact sparse checkpoints: bit-exact round trips, exact sizes, pattern errors, models, the CLI."""
import json
import math
import struct

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import minisparse as ms
from minisparse import compress as C
from minisparse.cli import main
from conftest import tiny_config, tiny_model

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT = {torch.float32: np.int32, torch.bfloat16: np.int16, torch.float16: np.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return C._int_view(t.contiguous())


def canonical_bits(t: torch.Tensor) -> torch.Tensor:
    """The documented guarantee: every bit kept, except that zeros become +0.0."""
    out = bits(t).clone()
    out[t == 0] = 0
    return out


def random_bits(rng: np.random.Generator, shape, dtype) -> torch.Tensor:
    """Arbitrary bit patterns: NaNs with payloads, infinities, subnormals, both zeros, huge and tiny values."""
    it = _INT[dtype]
    raw = rng.integers(np.iinfo(it).min, np.iinfo(it).max, size=shape, dtype=it, endpoint=True)
    return torch.from_numpy(raw).view(dtype)


def signed_zeros(rng, shape, dtype) -> torch.Tensor:
    z = torch.zeros(shape, dtype=dtype)
    return torch.where(torch.from_numpy(rng.random(shape) < 0.5), -z, z)


# ----------------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------------

@given(st.integers(0, 70), st.integers(0, 2**31 - 1))
def test_pack_bits_is_numpys_little_endian_packbits_and_unpacks(count, seed):
    mask = np.random.default_rng(seed).random(count) < 0.5
    packed = C.pack_bits(torch.from_numpy(mask))
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count / 8)
    assert np.array_equal(packed.numpy(), np.packbits(mask, bitorder="little"))
    assert np.array_equal(C.unpack_bits(packed, count).numpy(), mask)


@given(st.sampled_from([1, 2, 3, 4, 5, 8]), st.integers(0, 50), st.integers(0, 2**31 - 1))
def test_index_fields_are_a_little_endian_bit_stream(bits, count, seed):
    idx = torch.from_numpy(np.random.default_rng(seed).integers(0, 2**bits, size=count))
    stream = np.array([(int(i) >> b) & 1 for i in idx for b in range(bits)], dtype=bool)  # lowest bit first
    packed = C._pack_indices(idx, bits)
    assert np.array_equal(packed.numpy(), np.packbits(stream, bitorder="little"))
    assert torch.equal(C._unpack_indices(packed, count, bits), idx.long())


def test_two_bit_indices_pack_four_to_a_byte():
    # groups of 4 keep positions (1, 3) and (0, 2): index stream 1, 3, 0, 2 -> 0b10_00_11_01
    w = torch.tensor([[0.0, 5.0, 0.0, -7.0, 2.0, 0.0, -3.0, 0.0]])
    parts = C.compress_tensor(w, C.Layout("nm", 2, 4))
    assert parts["indices"].tolist() == [1 | 3 << 2 | 0 << 4 | 2 << 6]
    assert parts["values"].tolist() == [[5.0, -7.0, 2.0, -3.0]]
    assert [C.index_bits(m) for m in (2, 4, 8, 16, 5)] == [1, 2, 3, 4, 3]


# ----------------------------------------------------------------------------------------------
# round trips, bit for bit
# ----------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.integers(1, 9), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_bitmask_round_trip_keeps_every_bit_but_the_sign_of_zero(dtype, rows, cols, sparsity, seed):
    rng = np.random.default_rng(seed)
    w = random_bits(rng, (rows, cols), dtype)
    pruned = torch.from_numpy(rng.random((rows, cols)) < sparsity)
    w = torch.where(pruned, signed_zeros(rng, (rows, cols), dtype), w)
    parts = C.compress_tensor(w, C.BITMASK)
    back = C.decompress_tensor(parts, C.BITMASK, w.shape, dtype)
    assert back.dtype == dtype and torch.equal(bits(back), canonical_bits(w))
    assert C.same_weights(w, back)
    assert parts["values"].dtype == dtype and parts["values"].numel() == int((w != 0).sum())


def _reference_nm_slots(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Stored slots, one group at a time: every non-zero, then the lowest-index zeros up to N."""
    groups = w.reshape(-1, m)
    slots = np.zeros(groups.shape, dtype=bool)
    for g, row in enumerate(groups):
        nz = row != 0
        slots[g] = nz
        for j in np.flatnonzero(~nz)[: n - nz.sum()]:
            slots[g, j] = True
    return slots.reshape(w.shape)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8), (5, 16)]),
       st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_nm_round_trip_keeps_kept_zeros_with_their_sign(dtype, nm, rows, groups, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    cols = groups * m
    w = random_bits(rng, (rows, cols), dtype)
    # each group keeps between 0 and N entries at random places; the rest are +0.0 or -0.0
    keep = np.zeros((rows * groups, m), dtype=bool)
    for g in range(rows * groups):
        keep[g, rng.permutation(m)[: rng.integers(0, n + 1)]] = True
    keep = torch.from_numpy(keep.reshape(rows, cols))
    w = torch.where(keep & (w != 0), w, signed_zeros(rng, (rows, cols), dtype))
    layout = C.choose_layout(w, f"{n}:{m}")
    assert layout == C.Layout("nm", n, m)
    parts = C.compress_tensor(w, layout)
    back = C.decompress_tensor(parts, layout, w.shape, dtype)
    slots = torch.from_numpy(_reference_nm_slots((w != 0).numpy().astype(np.int8), n, m))
    expected = torch.where(slots, bits(w), torch.zeros_like(bits(w)))  # stored slots keep every bit
    assert torch.equal(bits(back), expected)
    assert C.same_weights(w, back)
    assert parts["values"].shape == (rows, groups * n)
    assert parts["indices"].numel() == math.ceil(rows * groups * n * C.index_bits(m) / 8)


def test_negative_zero_and_nan_in_a_24_group():
    nan = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    w = torch.tensor([[-0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, -0.0, -0.0, -0.0, 1.0, 2.0]])
    w[0, 10] = nan[0]
    layout = C.choose_layout(w, "2:4")
    back = C.decompress_tensor(C.compress_tensor(w, layout), layout, w.shape, w.dtype)
    # group 1 stores -0.0 (slot 0) and +0.0 (slot 1); group 2 stores 5.0 and its first zero, so -0.0 at
    # position 7 comes back as +0.0; group 3 stores the NaN (bit for bit) and 2.0
    assert torch.signbit(back[0, 0]) and not torch.signbit(back[0, 7])
    assert bits(back)[0, 10] == 0x7FC00123 and back[0, 11] == 2.0
    assert C.same_weights(w, back)


def test_zeros_kept_by_the_solver_round_trip_in_unstructured_layouts():
    w = torch.tensor([[0.0, -0.0, 3.0, 0.0], [1.0, 0.0, 0.0, -2.0]], dtype=torch.bfloat16)
    back = C.decompress_tensor(C.compress_tensor(w, C.BITMASK), C.BITMASK, w.shape, w.dtype)
    assert torch.equal(back, w) and not torch.signbit(back[w == 0]).any()  # -0.0 reads back as +0.0


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------

def _stored(parts: dict) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_bitmask_bytes_follow_the_formula_and_beat_dense(dtype, sparsity):
    torch.manual_seed(0)
    w = ms.magnitude(torch.randn(96, 200), None, ms.parse_pattern("unstructured", sparsity)).weight.to(dtype)
    n, b, k = w.numel(), w.element_size(), int((w != 0).sum())
    assert k == n - round(sparsity * n)
    layout = C.choose_layout(w, "unstructured")
    assert layout == C.BITMASK
    stored = _stored(C.compress_tensor(w, layout))
    assert stored == math.ceil(n / 8) + k * b == C.layout_bytes(w.shape, layout, b, k)
    assert stored < n * b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_24_bytes_are_half_the_values_plus_an_eighth_byte_per_weight(dtype):
    torch.manual_seed(0)
    w = ms.magnitude(torch.randn(64, 96), None, ms.parse_pattern("2:4")).weight.to(dtype)
    n, b = w.numel(), w.element_size()
    layout = C.choose_layout(w)  # auto finds 2:4
    assert layout == C.Layout("nm", 2, 4)
    stored = _stored(C.compress_tensor(w, layout))
    assert stored == n * b // 2 + n // 8 == C.layout_bytes(w.shape, layout, b)
    assert stored < n * b


def test_auto_layout_picks_the_smallest():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    assert C.choose_layout(w) == C.DENSE  # nothing pruned: a bitmask only adds bytes
    assert C.choose_layout(ms.magnitude(w, None, ms.parse_pattern("unstructured", 0.5)).weight) == C.BITMASK
    # 1:4 also satisfies 2:4, but a bitmask stores 1 value per group instead of 2
    assert C.choose_layout(ms.magnitude(w, None, ms.parse_pattern("1:4")).weight) == C.BITMASK
    assert C.choose_layout(ms.magnitude(w, None, ms.parse_pattern("2:4")).weight) == C.Layout("nm", 2, 4)
    assert C.choose_layout(torch.arange(6)) == C.DENSE  # integer tensors are never sparse-coded


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def test_a_matrix_that_breaks_the_declared_pattern_is_refused():
    w = torch.ones(4, 8)
    w[:, 1::2] = 0  # 2 non-zeros per group of 4 ...
    w[2, 1] = 3.0   # ... except one group with 3
    with pytest.raises(ValueError, match=r"does not satisfy the 2:4 pattern.*row 2, inputs 0\.\.3 hold 3"):
        C.choose_layout(w, "2:4", "q_proj.weight")
    with pytest.raises(ValueError, match="multiple of 4"):
        C.choose_layout(torch.zeros(2, 6), "2:4")
    with pytest.raises(ValueError, match="not known"):
        C.parse_layout_rule("diagonal")
    with pytest.raises(ValueError, match="0 < N < M"):
        C.parse_layout_rule("4:4")


def test_corrupt_payloads_fail_loudly():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    parts = C.compress_tensor(w, C.BITMASK)
    with pytest.raises(ValueError, match="marks 2 entries but 1 values"):
        C.decompress_tensor({**parts, "values": parts["values"][:1]}, C.BITMASK, w.shape, w.dtype)
    with pytest.raises(ValueError, match="metadata says"):
        C.decompress_tensor(parts, C.BITMASK, w.shape, torch.bfloat16)
    nm = C.compress_tensor(w, C.Layout("nm", 2, 4))
    bad = {**nm, "indices": torch.tensor([0b0000], dtype=torch.uint8)}  # index 0 twice
    with pytest.raises(ValueError, match="corrupt 2:4 indices"):
        C.decompress_tensor(bad, C.Layout("nm", 2, 4), w.shape, w.dtype)


# ----------------------------------------------------------------------------------------------
# state dicts and models
# ----------------------------------------------------------------------------------------------

def test_state_dict_round_trip_with_tied_and_integer_entries():
    torch.manual_seed(0)
    emb = torch.randn(10, 8)
    sd = {"emb": emb, "head": emb, "w": ms.magnitude(torch.randn(6, 8), None, ms.parse_pattern("2:4")).weight,
          "steps": torch.tensor([3, 4]), "norm": torch.ones(8)}
    tensors, meta = C.compress_state_dict(sd, names=["w"])
    assert meta["aliases"] == {"head": "emb"} and set(meta["layouts"]) == {"w"}
    assert "head" not in tensors and {"w.indices", "w.values"} <= set(tensors)
    back = C.decompress_state_dict(tensors, meta)
    assert set(back) == set(sd) and back["head"] is back["emb"]
    assert all(C.same_weights(sd[k], back[k]) for k in sd)


def _pruned_tiny(pattern: str, sparsity, dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # built in its dtype, as transformers loads it (rotary buffers stay float32)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=dtype).eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    pat = ms.parse_pattern(pattern, sparsity)
    for layer in ms.decoder_layers(model):
        for lin in ms.prunable_linears(layer).values():
            lin.weight.data = ms.magnitude(lin.weight.data.float(), None, pat).weight.to(dtype)
    return model


def _assert_no_pickle(path):
    names = [p.name for p in path.rglob("*")]
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names


def _safetensors_payload(file) -> int:
    """Bytes of tensor data in a safetensors file: the file minus its 8-byte length and JSON header."""
    with open(file, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return file.stat().st_size - 8 - header


@pytest.mark.parametrize("fmt", ["minisparse", "compressed-tensors"])
@pytest.mark.parametrize("pattern, sparsity, dtype", [("unstructured", 0.6, torch.float32),
                                                       ("2:4", None, torch.bfloat16), ("4:8", None, torch.float16)])
def test_tiny_llama_round_trips_with_identical_weights_and_logits(tmp_path, fmt, pattern, sparsity, dtype):
    model = _pruned_tiny(pattern, sparsity, dtype)
    out = tmp_path / "c"
    summary = C.save_compressed(model, None, out, pattern=pattern if sparsity is None else None, format=fmt)
    _assert_no_pickle(out)
    assert C.compressed_format(out) == fmt and (out / "config.json").exists()
    if fmt == "compressed-tensors":  # a checkpoint from another tool has no marker: config.json suffices
        marker = (out / C.MARKER).read_text()
        (out / C.MARKER).unlink()
        assert C.compressed_format(out) == fmt
        (out / C.MARKER).write_text(marker)
    loaded, tok = C.load_compressed(out)
    assert tok is None and loaded.dtype == dtype
    ref, got = model.state_dict(), loaded.state_dict()
    assert set(ref) == set(got) and all(C.same_weights(ref[k], got[k]) for k in ref)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # the payload is exactly what the summary says, and the prunable part shrinks
    assert _safetensors_payload(out / summary["weights_file"]) == summary["stored_bytes"]
    assert summary["prunable_stored_bytes"] < summary["prunable_dense_bytes"]
    if fmt == "minisparse":
        names = C.prunable_weight_names(model)
        b = torch.finfo(dtype).bits // 8
        if pattern == "unstructured":
            expected = sum(math.ceil(ref[k].numel() / 8) + int((ref[k] != 0).sum()) * b for k in names)
        else:
            n, m = (int(x) for x in pattern.split(":"))
            expected = sum(C.layout_bytes(tuple(ref[k].shape), C.Layout("nm", n, m), b) for k in names)
        assert summary["prunable_stored_bytes"] == expected


def test_compressed_tensors_own_decompressor_gives_the_same_weights(tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor

    if "sparse-bitmask" not in BaseCompressor.registered_names():
        pytest.skip(f"compressed-tensors {ct.__version__} has no sparse compressors (removed in 0.15)")
    from transformers import AutoConfig, AutoModelForCausalLM

    for pattern, sparsity, dtype, fmt in [("unstructured", 0.7, torch.float32, "sparse-bitmask"),
                                          ("2:4", None, torch.bfloat16, "sparse-24-bitmask")]:
        model = _pruned_tiny(pattern, sparsity, dtype)
        out = tmp_path / fmt
        C.save_compressed(model, None, out, pattern=pattern, format="compressed-tensors")
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["sparsity_config"]["format"] == fmt
        ref = model.state_dict()
        theirs = C.load_compressed_state_dict(out, backend="compressed-tensors")  # their BaseCompressor.decompress
        assert set(theirs) == set(ref) - {"lm_head.weight"}  # tied: stored once
        assert all(C.same_weights(ref[k], theirs[k]) for k in theirs)
        # and their model-level path: ModelCompressor.from_pretrained(...).decompress(path, model)
        cfg = AutoConfig.from_pretrained(out)
        del cfg.quantization_config
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        ModelCompressor.from_pretrained(str(out)).decompress(str(out), skeleton)
        skeleton.tie_weights()
        assert all(C.same_weights(ref[k], v) for k, v in skeleton.state_dict().items())


def test_compress_command_converts_and_refuses_bad_input(tmp_path, capsys):
    model = _pruned_tiny("2:4", None, torch.float32)
    src = tmp_path / "src"
    ms.save_checkpoint(model, type("NoTok", (), {"save_pretrained": lambda self, p: None})(), src)
    (src / "report.json").write_text(json.dumps({"pattern": "2:4", "eval": {"windows": 3}}))
    # bad input: nothing is written
    assert main(["compress", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["compress", str(src), "--out", str(src)]) == 2
    assert main(["compress", str(src), "--out", str(tmp_path / "y"), "--pattern", "3:3"]) == 2
    dense = tmp_path / "dense"
    ms.save_checkpoint(tiny_model("llama"), type("NoTok", (), {"save_pretrained": lambda self, p: None})(), dense)
    assert main(["compress", str(dense), "--out", str(tmp_path / "z"), "--pattern", "2:4"]) == 2
    assert "does not satisfy the 2:4 pattern" in capsys.readouterr().err
    assert not any(p.name in ("x", "y", "z") or ".partial-" in p.name for p in tmp_path.iterdir())
    # a good conversion in both formats, and back from the compressed one
    for fmt in ("minisparse", "compressed-tensors"):
        out = tmp_path / f"out-{fmt}"
        assert main(["compress", str(src), "--out", str(out), "--format", fmt]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["pattern"] == "2:4" and summary["out"] == str(out)
        assert json.loads((out / "report.json").read_text())["eval"] == {"windows": 3}
        loaded, _ = C.load_compressed(out)
        assert all(C.same_weights(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
        _assert_no_pickle(out)
    assert main(["compress", str(src), "--out", str(tmp_path / "out-minisparse")]) == 2  # exists, no --force
    again = tmp_path / "again"
    assert main(["compress", str(tmp_path / "out-compressed-tensors"), "--out", str(again)]) == 0
    assert C.compressed_format(again) == "minisparse"


def test_prune_save_format_defaults_to_the_plain_hf_checkpoint():
    from minisparse.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["prune", "--out", "x"]).save_format == "hf"
    assert parser.parse_args(["prune", "--out", "x", "--save-format", "both"]).save_format == "both"
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--out", "x", "--save-format", "zip"])


@pytest.mark.slow
@pytest.mark.model
def test_prune_saves_both_forms_and_eval_reads_the_compressed_one(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "smollm2-135m", "--method", "magnitude", "--pattern", "2:4",
                 "--calib-samples", "2", "--seqlen", "32", "--eval-windows", "2", "--skip-dense-eval",
                 "--save-format", "both", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["save_format"] == "both" and report["compressed"]["layouts"] == {"2:4": 210}
    small = out / "compressed"
    _assert_no_pickle(out)
    from safetensors.torch import load_file

    ref = load_file(out / "model.safetensors")  # the dense HF checkpoint written beside it
    got = C.load_compressed_state_dict(small)
    assert set(got) == set(ref) | {"lm_head.weight"}  # tied to the embedding, which HF stores once
    assert all(C.same_weights(ref[k], got[k]) for k in ref)
    # 2:4 in float32: half the values plus 2 bits per kept value, i.e. 2 + 1/8 bytes per weight
    prunable = sum(got[k].numel() for k in got if ".layers." in k and got[k].dim() == 2)
    assert report["compressed"]["prunable_stored_bytes"] == prunable * 2 + prunable // 8
    assert (small / "model.compressed.safetensors").stat().st_size < 0.65 * (out / "model.safetensors").stat().st_size
    assert main(["eval", str(small), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(report["pruned_ppl"], rel=1e-6)
