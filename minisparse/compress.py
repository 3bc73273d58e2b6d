"""Compact sparse checkpoints: a bitmask or N:M index layout per matrix, stored with safetensors.

A pruned weight matrix W (d_out, d_in) with n = d_out * d_in entries, k of them non-zero, of b bytes each,
is stored in one of three layouts, chosen per matrix and recorded in the file's metadata:

- ``dense``: W as is, ``n * b`` bytes;
- ``bitmask``: one bit per weight (1 = non-zero), packed eight to a byte, and the k non-zero values in
  row-major order, in W's dtype: ``ceil(n / 8) + k * b`` bytes;
- ``N:M`` (e.g. 2:4): N values out of every group of M consecutive inputs and, for each, its position in
  the group as a ``ceil(log2 M)``-bit index packed into bytes: ``g N b + ceil(g N ceil(log2 M) / 8)`` bytes
  with g = n / M groups. For 2:4 that is ``n b / 2 + n / 8``.

Bits are packed little-endian: bit i of byte j holds bit number 8 j + i of the stream, where the stream is
the row-major mask (bitmask) or the concatenated indices, lowest bit first (N:M).

What round-trips, exactly:

- every non-zero entry, bit for bit (values are copied through an integer view, never through float
  arithmetic), including inf, subnormals and NaN with its sign and payload (NaN counts as non-zero, so a
  bitmask keeps it and an N:M group counts it among its N);
- zeros round-trip as values: the layouts store which entries are non-zero, not the solver's mask, so an
  entry the solver kept that happens to be 0 is stored like a pruned one. In an N:M layout each group
  stores exactly N slots; a group with fewer than N non-zeros fills its slots with its lowest-index zeros,
  which keep their sign bit;
- the sign of the other zeros is not stored: they load as +0.0. Pruning as ``W * mask`` leaves -0.0 where a
  negative weight was pruned, and storing that sign would cost a bit per pruned weight for nothing a
  matrix product can see (``-0.0 == 0.0``, ``torch.equal`` holds; only an output that is exactly zero could
  change its sign). :func:`same_weights` is the comparison this guarantees.

Two on-disk forms are written by :func:`save_compressed`:

- ``format="minisparse"``: ``model.compressed.safetensors`` whose metadata records each tensor's layout,
  beside config.json, the tokenizer and the marker file ``minisparse_compressed.json``;
- ``format="compressed-tensors"``: the layout of compressed-tensors' sparse formats (``sparse-bitmask``;
  ``sparse-24-bitmask`` when every prunable matrix is 2:4) in ``model.safetensors`` with a
  ``quantization_config.sparsity_config`` in config.json. compressed-tensors removed these formats in
  0.15, transformers 5 needs compressed-tensors >= 0.15, and vLLM removed its 2:4 support (PR #36799), so
  only compressed-tensors <= 0.14 (0.13.0 is the last that works with transformers 5) decompresses them,
  e.g. for older vLLM releases; minisparse reads them without it.

:func:`load_compressed` reads either form back into a transformers model; ``models.load_model`` (and so
``minisparse eval``) detects both. Nothing is pickled.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .patterns import Pattern

__all__ = [
    "Layout",
    "parse_layout_rule",
    "index_bits",
    "pack_bits",
    "unpack_bits",
    "layout_bytes",
    "choose_layout",
    "compress_tensor",
    "decompress_tensor",
    "compress_state_dict",
    "decompress_state_dict",
    "prunable_weight_names",
    "save_compressed",
    "load_compressed",
    "load_compressed_state_dict",
    "compressed_format",
    "same_weights",
    "MARKER",
    "WEIGHTS_FILE",
]

FORMAT_NAME = "minisparse-compressed"
FORMAT_VERSION = 1
MARKER = "minisparse_compressed.json"
WEIGHTS_FILE = "model.compressed.safetensors"
CT_WEIGHTS_FILE = "model.safetensors"
CT_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Layout:
    """How one tensor is stored: ``dense``, ``bitmask`` or ``nm`` (N kept of every M along the last dim)."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


DENSE = Layout("dense")
BITMASK = Layout("bitmask")


def parse_layout_rule(pattern: str | Pattern | None) -> tuple[str, int, int]:
    """The layout rule a pruning pattern implies: ``("auto", 0, 0)``, ``("sparse", 0, 0)`` or ``("nm", N, M)``.

    Accepts None or "auto" (decide per matrix), a :class:`~minisparse.patterns.Pattern`, or the pattern
    strings of the CLI and report.json: "unstructured", "row", "unstructured:0.5", "row:0.7", "2:4".
    """
    if pattern is None:
        return ("auto", 0, 0)
    if isinstance(pattern, Pattern):
        return ("nm", pattern.n, pattern.m) if pattern.kind == "nm" else ("sparse", 0, 0)
    text = str(pattern).strip().lower()
    if text in ("", "auto"):
        return ("auto", 0, 0)
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {pattern!r}: an N:M pattern needs 0 < N < M, e.g. 2:4; got N={n}, M={m}")
        return ("nm", n, m)
    if re.fullmatch(r"(unstructured|matrix|row|per-row)(:[0-9.eE+-]+)?", text):
        return ("sparse", 0, 0)
    raise ValueError(f"pattern {pattern!r} is not known; use auto, unstructured, row, or N:M such as 2:4")


def index_bits(m: int) -> int:
    """Bits of one in-group index of an N:M layout: ceil(log2 M), at least 1."""
    return max(1, math.ceil(math.log2(m)))


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as an integer tensor, so copies never go through float arithmetic."""
    return t.view(_INT_VIEW[t.element_size()])


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened) into uint8, eight bits a byte, little-endian; ceil(len/8) bytes."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    rows = flat.reshape(-1, 8)
    out = rows[:, 0].clone()
    for i in range(1, 8):
        out |= rows[:, i] << i
    return out


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a boolean tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise ValueError(f"a packed bitmask of {count} bits must be a 1-D uint8 tensor of {(count + 7) // 8} "
                         f"bytes; got {packed.dtype} of shape {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).bool().reshape(-1)[:count]


def _pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices as a little-endian stream of ``bits``-bit fields (index j at bits j*bits ... of the stream)."""
    idx = idx.reshape(-1)
    if 8 % bits:  # fields straddle bytes: go through the bit stream
        shifts = torch.arange(bits, device=idx.device)
        return pack_bits((idx.reshape(-1, 1).long() >> shifts) & 1)
    per = 8 // bits  # whole fields per byte (1, 2, 4 or 8 bits): the same stream, built byte-wise
    pad = (-idx.numel()) % per
    fields = torch.cat([idx, idx.new_zeros(pad)]).to(torch.uint8).reshape(-1, per)
    out = fields[:, 0].clone()
    for i in range(1, per):
        out |= fields[:, i] << (i * bits)
    return out


def _unpack_indices(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    if 8 % bits:
        flat = unpack_bits(packed, count * bits).reshape(count, bits).long()
        return (flat << torch.arange(bits, device=packed.device)).sum(dim=1)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count * bits + 7) // 8:
        raise ValueError(f"{count} packed {bits}-bit indices must be a 1-D uint8 tensor of {(count * bits + 7) // 8} "
                         f"bytes; got {packed.dtype} of shape {tuple(packed.shape)}")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].long()


def layout_bytes(shape: tuple[int, ...], layout: Layout, element_size: int, nonzeros: int | None = None) -> int:
    """Bytes of a tensor's payload in a layout (safetensors adds a small JSON header per file)."""
    n = math.prod(shape)
    if layout.kind == "dense":
        return n * element_size
    if layout.kind == "bitmask":
        if nonzeros is None:
            raise ValueError("the size of a bitmask layout depends on the number of non-zeros; pass nonzeros")
        return (n + 7) // 8 + nonzeros * element_size
    kept = n // layout.m * layout.n
    return kept * element_size + (kept * index_bits(layout.m) + 7) // 8


def _nm_slots(w: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """The N stored slots of every group of M: all non-zeros, then the group's lowest-index zeros."""
    if w.dim() != 2 or w.shape[1] % m != 0:
        raise ValueError(f"{name}: an {n}:{m} layout needs a 2-D weight whose input width is a multiple of {m}; "
                         f"got shape {tuple(w.shape)}")
    nonzero = (w != 0).reshape(-1, m)
    count = nonzero.sum(dim=1)
    bad = torch.nonzero(count > n)
    if bad.numel():
        g = int(bad[0, 0])
        row, group = divmod(g, w.shape[1] // m)
        raise ValueError(
            f"{name} does not satisfy the {n}:{m} pattern: {int((count > n).sum())} of {count.numel()} groups hold "
            f"more than {n} non-zeros (first: row {row}, inputs {group * m}..{group * m + m - 1} hold "
            f"{int(count[g])}); save it with pattern 'unstructured' or 'auto' (bitmask), or prune it to {n}:{m} first")
    short = torch.nonzero(count < n).reshape(-1)
    if short.numel() == 0:  # the usual case: exactly N non-zeros everywhere
        return nonzero
    zero = ~nonzero[short]
    fill = zero & (zero.cumsum(dim=1) <= (n - count[short])[:, None])  # the first (N - count) zeros
    slots = nonzero.clone()
    slots[short] |= fill
    return slots


def _nm_feasible(w: torch.Tensor, n: int, m: int) -> bool:
    return w.dim() == 2 and w.shape[1] % m == 0 and bool(((w != 0).reshape(-1, m).sum(dim=1) <= n).all())


def choose_layout(w: torch.Tensor, pattern: str | Pattern | None = None, name: str = "weight") -> Layout:
    """The layout for one tensor.

    - an N:M pattern: that N:M layout (ValueError if a group holds more than N non-zeros);
    - unstructured or row: bitmask if it is smaller than dense, else dense;
    - None / "auto": the smallest of 2:4 (if every group of 4 inputs holds at most 2 non-zeros), bitmask and
      dense; on a tie 2:4 wins over bitmask, and both over dense.
    Non-floating and 0-D tensors are always dense.
    """
    rule, n, m = parse_layout_rule(pattern)
    if not w.is_floating_point() or w.dim() == 0:
        if rule == "nm":
            raise ValueError(f"{name}: an {n}:{m} layout needs a floating-point 2-D weight; "
                             f"got {w.dtype} {tuple(w.shape)}")
        return DENSE
    if rule == "nm":
        if not _nm_feasible(w, n, m):
            _nm_slots(w, n, m, name)  # raises, saying where
        return Layout("nm", n, m)
    size, b = tuple(w.shape), w.element_size()
    nonzeros = int((w != 0).sum())
    candidates = []
    if rule == "auto" and _nm_feasible(w, 2, 4):
        candidates.append(Layout("nm", 2, 4))
    candidates += [BITMASK, DENSE]
    return min(candidates, key=lambda lay: layout_bytes(size, lay, b, nonzeros))  # min keeps the first on ties


def compress_tensor(w: torch.Tensor, layout: Layout, name: str = "weight") -> dict[str, torch.Tensor]:
    """Encode one tensor: ``{"": w}`` (dense), ``{"bitmask", "values"}`` or ``{"indices", "values"}`` (N:M)."""
    w = w.detach().cpu().contiguous()
    if layout.kind == "dense":
        return {"": w}
    if not w.is_floating_point():
        raise ValueError(f"{name}: only floating-point tensors are stored sparse; got {w.dtype}")
    if layout.kind == "bitmask":
        keep = (w != 0).reshape(-1)
        return {"bitmask": pack_bits(keep), "values": _int_view(w).reshape(-1)[keep].view(w.dtype)}
    if layout.kind != "nm":
        raise ValueError(f"unknown layout {layout.kind!r}; use dense, bitmask or nm")
    slots = _nm_slots(w, layout.n, layout.m, name)
    idx = slots.nonzero()[:, 1].reshape(-1, layout.n)  # row-major: ascending within each group
    values = _int_view(w).reshape(-1, layout.m).gather(1, idx).view(w.dtype).reshape(w.shape[0], -1)
    return {"indices": _pack_indices(idx, index_bits(layout.m)), "values": values}


def decompress_tensor(parts: dict[str, torch.Tensor], layout: Layout, shape: tuple[int, ...],
                      dtype: torch.dtype, name: str = "weight") -> torch.Tensor:
    """Decode what :func:`compress_tensor` wrote; checks every size so a corrupt file fails loudly."""
    shape = tuple(shape)
    if layout.kind == "dense":
        return parts[""]
    values = parts["values"]
    if values.dtype != dtype:
        raise ValueError(f"{name}: stored values are {values.dtype}, the metadata says {dtype}")
    n = math.prod(shape)
    ints = _int_view(values).reshape(-1)
    if layout.kind == "bitmask":
        keep = unpack_bits(parts["bitmask"], n)
        if int(keep.sum()) != ints.numel():
            raise ValueError(f"{name}: the bitmask marks {int(keep.sum())} entries but {ints.numel()} values "
                             "are stored")
        out = torch.zeros(n, dtype=ints.dtype)
        out[keep] = ints
        return out.view(dtype).reshape(shape)
    groups = n // layout.m
    count = groups * layout.n
    if ints.numel() != count:
        raise ValueError(f"{name}: a {layout} layout of shape {shape} stores {count} values; found {ints.numel()}")
    idx = _unpack_indices(parts["indices"], count, index_bits(layout.m)).reshape(groups, layout.n)
    if bool((idx >= layout.m).any()) or (layout.n > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all())):
        raise ValueError(f"{name}: corrupt {layout} indices (each group needs {layout.n} increasing indices "
                         f"< {layout.m})")
    out = torch.zeros(groups, layout.m, dtype=ints.dtype)
    out.scatter_(1, idx, ints.reshape(groups, layout.n))
    return out.view(dtype).reshape(shape)


def same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """What a round trip guarantees: same shape and dtype, equal bits everywhere except that a zero may
    change its sign (NaN compares equal to the same NaN, bit for bit)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a, b = a.detach().cpu(), b.detach().cpu()
    za, zb = a == 0, b == 0
    return torch.equal(za, zb) and torch.equal(_int_view(a)[~za], _int_view(b)[~zb])


# ----------------------------------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the compressed checkpoint's metadata")
    return dtype


def _dedupe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop entries that are views of an earlier entry (tied weights); return them as aliases."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for name, t in state_dict.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    return kept, aliases


def compress_state_dict(state_dict: dict[str, torch.Tensor], names: list[str] | None = None,
                        pattern: str | Pattern | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Compress the tensors ``names`` (default: every 2-D floating tensor) of a state dict.

    Returns the tensors to store (``name`` for dense entries, ``name.bitmask`` / ``name.indices`` and
    ``name.values`` for sparse ones) and the metadata that decodes them: the layout, shape and dtype of
    every sparse entry, and the tied entries, which are stored once.
    """
    state_dict, aliases = _dedupe(state_dict)
    if names is None:
        names = [k for k, v in state_dict.items() if v.dim() == 2 and v.is_floating_point()]
    missing = [n for n in names if n not in state_dict and n not in aliases]
    if missing:
        raise ValueError(f"tensors to compress are not in the state dict: {missing[:3]}")
    targets = set(names)
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict[str, Any]] = {}
    for name, w in state_dict.items():
        layout = choose_layout(w, pattern, name) if name in targets else DENSE
        for suffix, t in compress_tensor(w, layout, name).items():
            key = f"{name}.{suffix}" if suffix else name
            if key in tensors or (suffix and key in state_dict):
                raise ValueError(f"tensor name {key!r} is used twice; cannot store {name} compressed")
            tensors[key] = t
        if layout.kind != "dense":
            layouts[name] = {"layout": str(layout), "shape": list(w.shape), "dtype": _dtype_name(w.dtype)}
    return tensors, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layouts": layouts, "aliases": aliases}


def _layout_of(text: str) -> Layout:
    if text in ("dense", "bitmask"):
        return Layout(text)
    n, m = (int(x) for x in text.split(":"))
    return Layout("nm", n, m)


_PART_KEYS = {"bitmask": ("bitmask", "values"), "nm": ("indices", "values")}


def decompress_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress_state_dict` (tied entries come back as the same tensor)."""
    if meta.get("format") != FORMAT_NAME or int(meta.get("version", -1)) > FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} checkpoint: metadata says "
                         f"{meta.get('format')!r} v{meta.get('version')!r}")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, entry in meta["layouts"].items():
        layout = _layout_of(entry["layout"])
        keys = {k: f"{name}.{k}" for k in _PART_KEYS[layout.kind]}
        absent = [v for v in keys.values() if v not in tensors]
        if absent:
            raise ValueError(f"the compressed checkpoint lacks {absent} for {name}")
        used.update(keys.values())
        parts = {k: tensors[v] for k, v in keys.items()}
        out[name] = decompress_tensor(parts, layout, tuple(entry["shape"]), _dtype_from(entry["dtype"]), name)
    out.update({k: t for k, t in tensors.items() if k not in used})  # dense entries
    for alias, target in meta.get("aliases", {}).items():
        out[alias] = out[target]
    return out


def _stored_entries(tensors: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], prunable: set[str],
                    layout_of) -> dict[str, dict[str, Any]]:
    """Per original tensor: layout, shape, dtype, dense bytes and the bytes actually stored for it."""
    stored = Counter()
    for key, t in tensors.items():
        owner = key if key in state_dict else key.rpartition(".")[0]
        if owner not in state_dict:
            owner = owner + ".weight"  # compressed-tensors names parts after the module, not the weight
        stored[owner] += t.numel() * t.element_size()
    return {name: {"layout": layout_of(name), "shape": list(w.shape), "dtype": _dtype_name(w.dtype),
                   "dense_bytes": w.numel() * w.element_size(), "stored_bytes": stored[name],
                   "prunable": name in prunable}
            for name, w in state_dict.items() if name in stored}


# ----------------------------------------------------------------------------------------------
# compressed-tensors' sparse layouts (sparse-bitmask, sparse-24-bitmask)
# ----------------------------------------------------------------------------------------------

def _ct_encode(w: torch.Tensor, fmt: str, name: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' layout: row-wise packed bitmask (rows, ceil(cols/8)), values, shape (+ row offsets)."""
    w = w.detach().cpu().contiguous()
    rows, cols = w.shape
    if fmt == "sparse-24-bitmask":
        keep = _nm_slots(w, 2, 4, name).reshape(rows, cols)  # exactly 2 stored per group of 4
        values = _int_view(w)[keep].view(w.dtype).reshape(rows, cols // 2)
        shape = torch.tensor([rows, cols]).reshape(-1, 1)
        extra = {}
    else:
        keep = w != 0
        values = _int_view(w)[keep].view(w.dtype)
        shape = torch.tensor([rows, cols])
        counts = keep.sum(dim=1)
        extra = {"row_offsets": torch.cumsum(counts, 0) - counts}
    pad = (-cols) % 8
    padded = torch.cat([keep, keep.new_zeros(rows, pad)], dim=1) if pad else keep
    bitmask = pack_bits(padded).reshape(rows, (cols + 7) // 8)
    return {"shape": shape, "compressed": values, "bitmask": bitmask, **extra}


def _ct_decode(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    rows, cols = (int(x) for x in parts["shape"].reshape(-1).tolist())
    bitmask = parts["bitmask"]
    if bitmask.shape != (rows, (cols + 7) // 8):
        raise ValueError(f"{name}: bitmask of shape {tuple(bitmask.shape)} does not fit a ({rows}, {cols}) weight")
    keep = unpack_bits(bitmask.reshape(-1), bitmask.numel() * 8).reshape(rows, -1)[:, :cols]
    values = parts["compressed"]
    ints = _int_view(values).reshape(-1)
    if int(keep.sum()) != ints.numel():
        raise ValueError(f"{name}: the bitmask marks {int(keep.sum())} entries but {ints.numel()} values are stored")
    out = torch.zeros(rows, cols, dtype=ints.dtype)
    out[keep] = ints
    return out.view(values.dtype)


def _ct_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefixes = {k[: -len(".bitmask")] for k in tensors if k.endswith(".bitmask")}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix in prefixes and suffix in ("shape", "compressed", "bitmask", "row_offsets"):
            continue
        out[key] = t
    for prefix in prefixes:
        parts = {s: tensors[f"{prefix}.{s}"] for s in ("shape", "compressed", "bitmask")}
        out[f"{prefix}.weight"] = _ct_decode(parts, prefix)
    return out


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------

def prunable_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the weights minisparse prunes: every Linear of every decoder layer."""
    from .models import decoder_layers, prunable_linears

    ids = {id(m) for layer in decoder_layers(model) for m in prunable_linears(layer).values()}
    return [f"{name}.weight" for name, m in model.named_modules() if id(m) in ids]


def _save_configs(model: nn.Module, tokenizer, path: Path) -> None:
    model.config.save_pretrained(path)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(model, "can_generate") and model.can_generate():
        gen.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_compressed(model: nn.Module, tokenizer, path: str | Path, pattern: str | Pattern | None = None,
                    format: str = "minisparse") -> dict[str, Any]:
    """Save a (pruned) causal LM compactly: config, tokenizer and one safetensors file; returns a summary.

    ``pattern`` fixes the layout of the prunable matrices (see :func:`choose_layout`): an N:M pattern must
    hold in every one of them; None decides per matrix. ``format`` is "minisparse" or "compressed-tensors".
    Non-prunable tensors (embeddings, norms, the LM head) are stored as they are. The summary (also
    written to ``minisparse_compressed.json``) gives each tensor's layout and bytes, and the totals.
    """
    from safetensors.torch import save_file

    if format not in ("minisparse", "compressed-tensors"):
        raise ValueError(f"format {format!r} is not known; use 'minisparse' or 'compressed-tensors'")
    path = Path(path)
    names = prunable_weight_names(model)
    state_dict, _ = _dedupe(model.state_dict())
    if format == "minisparse":
        tensors, meta = compress_state_dict(model.state_dict(), names, pattern)
        weights_file = WEIGHTS_FILE
        header = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "layouts": json.dumps(meta)}
        ct_config = None
        layouts = {k: v["layout"] for k, v in meta["layouts"].items()}
    else:
        tensors, ct_config = _ct_compress(state_dict, names, pattern)
        weights_file = CT_WEIGHTS_FILE
        header = {"format": "pt"}
        fmt = ct_config["sparsity_config"]["format"]
        layouts = {k: fmt for k in state_dict if k.removesuffix(".weight") + ".bitmask" in tensors}
    entries = _stored_entries(tensors, state_dict, set(names), lambda k: layouts.get(k, "dense"))
    path.mkdir(parents=True, exist_ok=True)
    _save_configs(model, tokenizer, path)
    if ct_config is not None:
        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg["quantization_config"] = ct_config
        _write_json(cfg_file, cfg)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / weights_file), metadata=header)
    prunable = [e for e in entries.values() if e["prunable"]]
    summary = {
        "format": format,
        "format_version": FORMAT_VERSION,
        "weights_file": weights_file,
        "pattern": str(pattern) if pattern is not None else "auto",
        "layouts": dict(Counter(e["layout"] for e in prunable)),
        "prunable_dense_bytes": sum(e["dense_bytes"] for e in prunable),
        "prunable_stored_bytes": sum(e["stored_bytes"] for e in prunable),
        "dense_bytes": sum(e["dense_bytes"] for e in entries.values()),
        "stored_bytes": sum(e["stored_bytes"] for e in entries.values()),
        "file_bytes": os.path.getsize(path / weights_file),
        "tensors": entries,
    }
    _write_json(path / MARKER, summary)
    return {k: v for k, v in summary.items() if k != "tensors"}


def _ct_compress(state_dict: dict[str, torch.Tensor], names: list[str], pattern) -> tuple[dict, dict]:
    """Tensors and ``quantization_config`` of compressed-tensors' sparse formats (one format per model).

    2:4 (declared, or found in every prunable matrix by "auto") uses sparse-24-bitmask; anything else
    sparse-bitmask, with a matrix left dense (and listed in ``ignore``) where the bitmask would not be smaller.
    """
    rule, n, m = parse_layout_rule(pattern)
    targets = [k for k in names if k in state_dict]
    if rule == "nm" and (n, m) != (2, 4):
        fmt = "sparse-bitmask"  # compressed-tensors has no N:M format besides 2:4
        for k in targets:
            _nm_slots(state_dict[k], n, m, k)  # still check the declared pattern
    elif rule == "nm" or (rule == "auto" and targets and all(_nm_feasible(state_dict[k], 2, 4) for k in targets)):
        fmt = "sparse-24-bitmask"
    else:
        fmt = "sparse-bitmask"
    tensors: dict[str, torch.Tensor] = {}
    compressed, dense, zeros, total = [], [], 0, 0
    for name, w in state_dict.items():
        sparse = False
        if name in targets:
            if w.dim() != 2 or not w.is_floating_point():
                raise ValueError(f"{name}: compressed-tensors' sparse formats need a 2-D floating weight")
            rows, cols = w.shape
            nonzeros = int((w != 0).sum())
            zeros, total = zeros + w.numel() - nonzeros, total + w.numel()
            kept = w.numel() // 2 if fmt == "sparse-24-bitmask" else nonzeros
            extra = 16 + (8 * rows if fmt == "sparse-bitmask" else 0)  # shape and row offsets, int64
            size = kept * w.element_size() + rows * ((cols + 7) // 8) + extra
            sparse = fmt == "sparse-24-bitmask" or size < w.numel() * w.element_size()
        if sparse:
            prefix = name.removesuffix(".weight")
            tensors.update({f"{prefix}.{s}": t for s, t in _ct_encode(w, fmt, name).items()})
            compressed.append(prefix)
        else:
            tensors[name] = w.detach().cpu().contiguous()
            if name in targets:
                dense.append(name.removesuffix(".weight"))
    config = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": fmt,
            "targets": compressed,
            "ignore": dense,
            "global_sparsity": zeros / total if total else 0.0,
            "sparsity_structure": "2:4" if fmt == "sparse-24-bitmask" else "unstructured",
        },
        "transform_config": {},
    }
    return tensors, config


def compressed_format(path: str | Path) -> str | None:
    """"minisparse" or "compressed-tensors" if ``path`` holds a compressed checkpoint this module reads, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / MARKER).exists():
        fmt = json.loads((path / MARKER).read_text(encoding="utf-8")).get("format")
        if fmt in ("minisparse", "compressed-tensors"):
            return fmt
    cfg = path / "config.json"
    if cfg.exists():
        q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
        sparsity = q.get("sparsity_config") or {}
        if (q.get("quant_method") == "compressed-tensors" and sparsity.get("format") in CT_FORMATS
                and not q.get("config_groups")):  # sparse only; quantized checkpoints are not read here
            return "compressed-tensors"
    return None


def _read_safetensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata.update(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    return tensors, metadata


def load_compressed_state_dict(path: str | Path, backend: str = "minisparse") -> dict[str, torch.Tensor]:
    """The dense state dict of a compressed checkpoint (minisparse or compressed-tensors form).

    ``backend="compressed-tensors"`` decodes a compressed-tensors checkpoint with compressed-tensors' own
    decompressor instead (needs compressed-tensors <= 0.14: ``pip install 'minisparse[compress]'``).
    """
    path = Path(path)
    fmt = compressed_format(path)
    if fmt is None:
        raise ValueError(f"{path} is not a compressed checkpoint (no {MARKER} and no compressed-tensors "
                         "sparsity_config in config.json); save one with minisparse.save_compressed or "
                         "`minisparse compress`")
    if backend == "compressed-tensors":
        if fmt != "compressed-tensors":
            raise ValueError(f"{path} is in minisparse's format; compressed-tensors cannot read it")
        return _ct_library_state_dict(path)
    if backend != "minisparse":
        raise ValueError(f"backend {backend!r} is not known; use 'minisparse' or 'compressed-tensors'")
    if fmt == "minisparse":
        tensors, header = _read_safetensors([path / WEIGHTS_FILE])
        if header.get("format") != FORMAT_NAME or "layouts" not in header:
            raise ValueError(f"{path / WEIGHTS_FILE} has no {FORMAT_NAME} metadata; the file is not minisparse's")
        return decompress_state_dict(tensors, json.loads(header["layouts"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors file")
    return _ct_state_dict(_read_safetensors(files)[0])


def _ct_library_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Decode with compressed-tensors' own sparse decompressor (imported lazily)."""
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.config import SparsityCompressionConfig
    except ModuleNotFoundError:
        raise ModuleNotFoundError("decoding with compressed-tensors needs the package: "
                                  "pip install 'minisparse[compress]' (compressed-tensors==0.13.0)") from None
    sparsity = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]["sparsity_config"]
    if sparsity["format"] not in BaseCompressor.registered_names():
        import compressed_tensors

        raise ModuleNotFoundError(
            f"the installed compressed-tensors {getattr(compressed_tensors, '__version__', '?')} has no "
            f"{sparsity['format']!r} decompressor (removed in 0.15); install compressed-tensors==0.13.0")
    config = SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)
    compressor = BaseCompressor.load_from_registry(sparsity["format"], config=config)
    return dict(compressor.decompress(str(path)))


def load_compressed(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    backend: str = "minisparse") -> tuple[nn.Module, object]:
    """Load a compressed checkpoint into a transformers causal LM; returns (model, tokenizer or None).

    The weights are exactly the stored ones (in their stored dtype unless ``dtype`` is given).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    state_dict = load_compressed_state_dict(path, backend)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are decoded here, not by a transformers quantizer
    floats = Counter(t.dtype for t in state_dict.values() if t.is_floating_point())
    stored = floats.most_common(1)[0][0] if floats else torch.float32
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, then overwrite
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=stored)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise ValueError(f"{path}: the checkpoint holds tensors the model does not have: {unexpected[:3]}")
    model.tie_weights()
    # a missing entry is fine only if tying made it share memory with a loaded one
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state_dict if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{path}: the checkpoint lacks tensors the model needs: {untied[:3]}")
    model.eval()
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
