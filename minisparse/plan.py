"""A memory model of every method, from a model's config alone: peak device bytes and host bytes.

``minisparse plan --model CONFIG_OR_ID --method M`` prints it. The model follows what the code
allocates, term by term, so each term can be checked against the code and the total against a
measured peak:

*Layer-wise methods* (magnitude, wanda, ria, sparsegpt, sparsefw) walk the decoder one layer at a
time (:mod:`minisparse.engine`). On the compute device live: one decoder layer's weights; the
calibration hidden states twice (the inputs of the current layer and the outputs being produced,
``n x L x h`` each, in the model's dtype); one Gram matrix per distinct Linear input (q/k/v share one,
gate/up share one; float32); the temporaries of one forward batch (attention and MLP activations); the
solver's workspace for the largest matrix. The rest of the model stays in host memory.

*End-to-end methods* (proxsparse, elsa) train on one device: weights, gradients of the trained
(prunable) weights, AdamW's two moments (4 bytes each, 1 with the 8-bit optimizer), ADMM's z and u
(4 + 4 bytes, or 1 + 2 for ELSA-L), ProxSparse's original weights, and the activations kept for
backward (all layers, or with gradient checkpointing one layer's plus every layer's input), plus
the logits.

Host memory adds a runtime constant (Python, torch, transformers, the tokenizer:
``RUNTIME_BYTES``, measured) and, on CPU, everything above. Configurations ship for the models of the
runbook (Llama-2-7B/13B, Llama-3.1-8B, Qwen2.5-14B, Gemma-2-27B); any Hugging Face config file,
directory or hub id works too.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelShape", "model_shape", "load_config", "plan", "KNOWN_CONFIGS", "RUNTIME_BYTES", "format_plan"]

# Process memory before any model is loaded: Python + torch + transformers + tokenizer (measured on the
# project's CPU machine with benchmarks/bench_memory.py; see its results file).
RUNTIME_BYTES = 540 * 2**20
CUDA_CONTEXT_BYTES = 500 * 2**20

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(model_type="llama", hidden_size=5120, intermediate_size=13824,
                                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                      vocab_size=32000, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    vocab_size=128256, tie_word_embeddings=False),
    "Qwen/Qwen2.5-14B": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                             num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                             tie_word_embeddings=False),
    "google/gemma-2-27b": dict(model_type="gemma2", hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                               num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=256000,
                               tie_word_embeddings=True),
}
_ALIASES = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
            "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "qwen2.5-14b": "Qwen/Qwen2.5-14B",
            "gemma-2-27b": "google/gemma-2-27b"}

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LAYERWISE = ("magnitude", "wanda", "ria", "sparsegpt", "sparsefw")
END2END = ("proxsparse", "elsa", "elsa-l")


@dataclass
class ModelShape:
    """The sizes the memory model needs, read from a config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def linears(self) -> list[tuple[str, int, int]]:
        """(name, d_out, d_in) of the prunable Linear layers of one decoder layer."""
        h, i, a, kv = self.hidden, self.intermediate, self.attn_dim, self.kv_heads * self.head_dim
        return [("q_proj", a, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, a),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    @property
    def layer_params(self) -> int:
        return sum(o * i for _, o, i in self.linears) + 2 * self.hidden  # + the two norms

    @property
    def prunable_params(self) -> int:
        return self.layers * sum(o * i for _, o, i in self.linears)

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.layer_params + emb * (1 if self.tied else 2) + self.hidden

    @property
    def gram_sizes(self) -> list[int]:
        """d_in of each distinct Linear input of a layer (q/k/v share one, gate/up share one)."""
        return [self.hidden, self.attn_dim, self.hidden, self.intermediate]


def load_config(model: str | dict | Path) -> dict:
    """A config dict from: a known name (see KNOWN_CONFIGS and short aliases), a bundled model name, a
    config.json file, a checkpoint directory, or (online) a Hugging Face hub id."""
    if isinstance(model, dict):
        return model
    key = str(model)
    key = _ALIASES.get(key.lower(), key)
    if key in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[key])
    from .models import BUNDLED, cache_dir

    if key.lower() in BUNDLED:
        cached = Path(cache_dir()) / "models" / key.lower() / "config.json"
        if not cached.exists():
            from .models import load_model

            load_model(key.lower())  # converts the bundled GGUF once and writes the config
        key = str(cached)
    path = Path(key).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    from .models import _looks_like_hub_id

    if not _looks_like_hub_id(key):
        raise ValueError(f"cannot read a model config from {model!r}: use a known name ({', '.join(_ALIASES)}), "
                         "a bundled name, a config.json, a checkpoint directory, or a hub id such as org/name")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(key).to_dict()
    except Exception as err:  # noqa: BLE001 - any failure means: not a config we can read
        raise ValueError(f"cannot read a model config from {model!r}: use a known name "
                         f"({', '.join(_ALIASES)}), a config.json, a checkpoint directory, or a hub id "
                         f"when online ({type(err).__name__}: {err})") from None


def model_shape(config: dict) -> ModelShape:
    cfg = config.get("text_config") or config
    try:
        h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except KeyError as err:
        raise ValueError(f"the config lacks {err.args[0]!r}; minisparse plan needs a decoder-only transformer "
                         "config (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                         "vocab_size)") from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    tied = bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return ModelShape(layers, h, i, heads, kv, head_dim, vocab, tied)


def _solver_bytes(method: str, d_out: int, d_in: int) -> int:
    """Workspace of one solver call on a (d_out, d_in) matrix, float32 unless stated."""
    n, g = d_out * d_in, d_in * d_in
    if method == "sparsegpt":
        return 4 * (3 * g + 4 * n)  # damped H, its Cholesky and inverse factor; W copy, block buffers, mask
    if method == "sparsefw":
        return 4 * (10 * n + g)  # W@G, C, R, P, A, M, W⊙(1-F), 1-F, score/selection buffers; G copy
    if method in ("wanda", "ria"):
        return 8 * 3 * n  # float64 scores, sort values and indices
    return 8 * 2 * n  # magnitude: a float64 score and sort indices


def plan(model: str | dict | Path, method: str, *, calib_samples: int = 128, seqlen: int = 512, batch_size: int = 8,
         dtype: str = "float32", device: str = "cpu", steps_batch: int = 2, grad_checkpointing: bool = False,
         optimizer_bits: int = 32, low_precision: bool | None = None,
         runtime_bytes: int | None = None) -> dict[str, Any]:
    """Predicted peak memory (bytes) of ``minisparse prune`` with ``method`` on ``model``.

    Returns {"shape", "terms": {name: bytes}, "device_peak_bytes", "host_peak_bytes", ...}. For
    end-to-end methods ``steps_batch`` is the training batch (windows per step) and ``seqlen`` the
    window length.
    """
    runtime = RUNTIME_BYTES if runtime_bytes is None else int(runtime_bytes)
    method = method.lower()
    if method not in LAYERWISE + END2END:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(LAYERWISE + END2END)}")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPE_BYTES)}; got {dtype!r}")
    cfg = load_config(model)
    s = model_shape(cfg)
    wb = _DTYPE_BYTES[dtype]
    h, i, L = s.hidden, s.intermediate, seqlen
    weights_total = s.params * wb
    terms: dict[str, int] = {}
    if method in LAYERWISE:
        n, b = calib_samples, min(batch_size, calib_samples)
        terms["layer_weights"] = s.layer_params * wb
        terms["hidden_states"] = 2 * n * L * h * wb
        terms["gram_matrices"] = 4 * sum(d * d for d in s.gram_sizes)
        # q, k, v and the attention output; SDPA (flash / memory-efficient kernels, also on CPU) does not
        # materialise the L x L scores
        attn = b * L * (2 * s.heads + 2 * s.kv_heads) * s.head_dim * wb
        mlp = 3 * b * L * i * wb
        cast = 4 * b * L * i if wb != 4 else 0  # the float32 copy a Gram hook makes of a half-precision input
        terms["forward_temporaries"] = max(attn, mlp) + 2 * b * L * h * wb + cast
        terms["solver_workspace"] = max(_solver_bytes(method, o, d) for _, o, d in s.linears)
        device_peak = sum(terms.values())
        rest_of_model = weights_total - terms["layer_weights"]
        if device == "cpu":
            host = device_peak + rest_of_model + runtime
            device_peak = host
        else:
            host = weights_total + runtime  # the model waits in host memory, a layer at a time on the GPU
            device_peak += CUDA_CONTEXT_BYTES
    else:
        low = (method == "elsa-l") if low_precision is None else low_precision
        bits = 8 if method == "elsa-l" else optimizer_bits
        p = s.prunable_params
        b = steps_batch
        terms["weights"] = weights_total
        terms["gradients"] = p * wb
        terms["adam_moments"] = p * (2 if bits == 8 else 8)
        if method.startswith("elsa"):
            terms["admm_z_u"] = p * (3 if low else 8)
        else:
            terms["original_weights"] = p * wb
        per_layer_acts = b * L * (10 * h + 4 * i + (s.heads + 2 * s.kv_heads) * s.head_dim) * wb
        per_layer_acts += b * s.heads * L * L * wb  # attention probabilities kept for backward
        if grad_checkpointing:
            terms["activations"] = s.layers * b * L * h * wb + per_layer_acts
        else:
            terms["activations"] = s.layers * per_layer_acts
        terms["logits"] = 3 * b * L * s.vocab * 4  # float32 logits, their log-softmax and gradient
        device_peak = sum(terms.values())
        if device == "cpu":
            host = device_peak + runtime
            device_peak = host
        else:
            host = runtime + weights_total  # loaded on the host first
            device_peak += CUDA_CONTEXT_BYTES
    return {"model": str(model) if not isinstance(model, dict) else "config", "method": method, "device": device,
            "dtype": dtype, "shape": asdict(s), "params": s.params, "prunable_params": s.prunable_params,
            "terms": terms, "device_peak_bytes": int(device_peak), "host_peak_bytes": int(host),
            "settings": {"calib_samples": calib_samples, "seqlen": seqlen, "batch_size": batch_size,
                         "steps_batch": steps_batch, "grad_checkpointing": grad_checkpointing}}


def format_plan(p: dict) -> str:
    gib = 2**30
    lines = [f"{p['model']}: {p['params'] / 1e9:.2f} B parameters ({p['prunable_params'] / 1e9:.2f} B prunable), "
             f"method {p['method']}, {p['dtype']} on {p['device']}"]
    for k, v in p["terms"].items():
        lines.append(f"  {k:22s} {v / gib:9.2f} GiB")
    lines.append(f"  {'peak on ' + p['device']:22s} {p['device_peak_bytes'] / gib:9.2f} GiB")
    if p["device"] != "cpu":
        lines.append(f"  {'peak host memory':22s} {p['host_peak_bytes'] / gib:9.2f} GiB")
    return "\n".join(lines)
