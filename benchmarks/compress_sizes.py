"""Bytes on disk of a pruned checkpoint: dense Hugging Face vs minisparse's compact form vs compressed-tensors'.

The bundled SmolLM2-135M is pruned with magnitude, matrix by matrix (``ms.magnitude`` on every Linear of
every decoder layer: no calibration needed), at 50/70/90% unstructured and 2:4, then stored in float32 and
bfloat16 three ways:

- ``hf``: ``save_pretrained`` (dense safetensors), what ``minisparse prune --save-format hf`` writes;
- ``minisparse``: ``save_compressed(format="minisparse")``: bitmask + kept values, or 2:4 values + 2-bit
  indices, per matrix;
- ``ct``: ``save_compressed(format="compressed-tensors")``: compressed-tensors' sparse-bitmask or
  sparse-24-bitmask layout (row-wise bitmask, values, shape, row offsets).

For each it reports the bytes of the weights file, of the whole directory (config and tokenizer included)
and of the prunable matrices alone, checks the prunable bytes against the closed forms
(bitmask: ceil(n/8) + k b; 2:4: n b / 2 + n / 8), and checks that both compact forms load back to the
same weights (and, when compressed-tensors <= 0.14 is installed, that its own decompressor agrees).

    .venv/bin/python benchmarks/compress_sizes.py            # writes results/compress_sizes.{json,csv}
    .venv/bin/python benchmarks/compress_sizes.py --settings 2:4 --dtypes bfloat16
"""
from __future__ import annotations

import argparse
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import minisparse as ms
from minisparse import compress as C

from _common import pattern_args, write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "compress_sizes.json"
SETTINGS = ["0.5", "0.7", "0.9", "2:4"]
DTYPES = ["float32", "bfloat16"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ct_decoder_available() -> bool:
    try:
        from compressed_tensors.compressors import BaseCompressor
    except ModuleNotFoundError:
        return False
    return "sparse-bitmask" in BaseCompressor.registered_names()


def prune_copy(model: torch.nn.Module, dense: dict[str, torch.Tensor], setting: str, dtype: torch.dtype) -> list[str]:
    """Load the dense weights back, prune every decoder Linear by magnitude, cast; return the pruned names."""
    model.to(torch.float32)
    model.load_state_dict(dense)
    pattern = ms.parse_pattern(*pattern_args(setting))
    names = C.prunable_weight_names(model)
    with torch.no_grad():
        for layer in ms.decoder_layers(model):
            for lin in ms.prunable_linears(layer).values():
                lin.weight.copy_(ms.magnitude(lin.weight, None, pattern).weight)
    model.to(dtype)
    return names


def formula_bytes(state: dict[str, torch.Tensor], names: list[str], setting: str) -> int:
    total = 0
    for k in names:
        w = state[k]
        n, b = w.numel(), w.element_size()
        total += n * b // 2 + n // 8 if setting == "2:4" else math.ceil(n / 8) + int((w != 0).sum()) * b
    return total


def measure(model, tok, names: list[str], setting: str, dtype_name: str, work: Path, check_ct: bool) -> dict:
    state = model.state_dict()
    pattern = "2:4" if setting == "2:4" else "unstructured"
    zeros = sum(int((state[k] == 0).sum()) for k in names)
    numel = sum(state[k].numel() for k in names)
    row = {"setting": setting, "dtype": dtype_name, "measured_sparsity": round(zeros / numel, 6),
           "prunable_params": numel}

    hf = work / "hf"
    start = time.perf_counter()
    ms.save_checkpoint(model, tok, hf)
    row["hf_seconds"] = round(time.perf_counter() - start, 2)
    row["hf_file_bytes"] = (hf / "model.safetensors").stat().st_size
    row["hf_dir_bytes"] = dir_bytes(hf)
    row["hf_prunable_bytes"] = sum(state[k].numel() * state[k].element_size() for k in names)
    shutil.rmtree(hf)

    for key, fmt in (("ms", "minisparse"), ("ct", "compressed-tensors")):
        out = work / key
        start = time.perf_counter()
        summary = C.save_compressed(model, tok, out, pattern=pattern, format=fmt)
        row[f"{key}_seconds"] = round(time.perf_counter() - start, 2)
        row[f"{key}_file_bytes"] = summary["file_bytes"]
        row[f"{key}_dir_bytes"] = dir_bytes(out)
        row[f"{key}_prunable_bytes"] = summary["prunable_stored_bytes"]
        row[f"{key}_layouts"] = " ".join(f"{k}x{v}" for k, v in sorted(summary["layouts"].items()))
        start = time.perf_counter()
        back = C.load_compressed_state_dict(out)
        row[f"{key}_load_seconds"] = round(time.perf_counter() - start, 2)
        shared = {state[k].data_ptr() for k in back}
        untied = [k for k in state if k not in back and state[k].data_ptr() not in shared]
        if untied or not all(C.same_weights(state[k], back[k]) for k in back):
            raise AssertionError(f"{fmt} round trip changed or lost weights at {setting} {dtype_name}: {untied}")
        if key == "ct" and check_ct:
            theirs = C.load_compressed_state_dict(out, backend="compressed-tensors")
            if not all(C.same_weights(state[k], v) for k, v in theirs.items()):
                raise AssertionError(f"compressed-tensors' decompressor disagrees at {setting} {dtype_name}")
        also = " (also compressed-tensors' decoder)" if key == "ct" and check_ct else ""
        row[f"{key}_roundtrip"] = "identical" + also
        shutil.rmtree(out)
    row["formula_prunable_bytes"] = formula_bytes(state, names, setting)
    if row["ms_prunable_bytes"] != row["formula_prunable_bytes"]:
        raise AssertionError(f"minisparse bytes {row['ms_prunable_bytes']} != formula {row['formula_prunable_bytes']}")
    for key in ("ms", "ct"):
        row[f"{key}_prunable_ratio"] = round(row[f"{key}_prunable_bytes"] / row["hf_prunable_bytes"], 4)
        row[f"{key}_file_ratio"] = round(row[f"{key}_file_bytes"] / row["hf_file_bytes"], 4)
    return row


def table(rows: list[dict]) -> str:
    mb = 1e6
    head = (f"{'setting':>7} {'dtype':>8} | {'prunable MB: hf':>15} {'minisparse':>10} {'c-t':>7} | "
            f"{'weights file MB: hf':>19} {'minisparse':>10} {'c-t':>7} | {'ratio ms/hf':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['setting']:>7} {r['dtype']:>8} | {r['hf_prunable_bytes'] / mb:15.1f} "
                     f"{r['ms_prunable_bytes'] / mb:10.1f} {r['ct_prunable_bytes'] / mb:7.1f} | "
                     f"{r['hf_file_bytes'] / mb:19.1f} {r['ms_file_bytes'] / mb:10.1f} "
                     f"{r['ct_file_bytes'] / mb:7.1f} | "
                     f"{r['ms_file_ratio']:11.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Bytes on disk of SmolLM2-135M pruned by magnitude (per matrix) at several sparsities, stored "
                    "as a dense Hugging Face checkpoint, in minisparse's compact form (bitmask or 2:4 indices) and "
                    "in compressed-tensors' sparse layout, in float32 and bfloat16; the prunable matrices are "
                    "reported apart from the whole model. Writes JSON and CSV and prints a table.",
        epilog="Each setting writes and deletes three checkpoints (at most about 1.2 GB at a time) in --workdir.")
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or checkpoint (default: %(default)s)")
    parser.add_argument("--settings", nargs="+", default=SETTINGS,
                        help="unstructured sparsities and/or 2:4 (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=["float32", "bfloat16", "float16"],
                        help="storage dtypes (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT,
                        help="JSON result; the CSV goes beside it (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    for s in args.settings:
        try:
            ms.parse_pattern(*pattern_args(s))
        except ValueError as err:
            parser.error(f"--settings {s!r}: {err}")

    lm = ms.load_model(args.model)
    dense = {k: v.clone() for k, v in lm.model.state_dict().items()}
    check_ct = ct_decoder_available()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="compress-sizes-", dir=args.workdir))
    try:
        for dtype_name in args.dtypes:
            for setting in args.settings:
                names = prune_copy(lm.model, dense, setting, getattr(torch, dtype_name))
                rows.append(measure(lm.model, lm.tokenizer, names, setting, dtype_name, work, check_ct))
                print(f"[compress_sizes] {setting} {dtype_name}: hf {rows[-1]['hf_file_bytes']:,} B, "
                      f"minisparse {rows[-1]['ms_file_bytes']:,} B, c-t {rows[-1]['ct_file_bytes']:,} B",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        import compressed_tensors
        ct_version = compressed_tensors.__version__
    except ModuleNotFoundError:
        ct_version = None
    result = {
        "model": args.model, "method": "magnitude (per matrix, every Linear of every decoder layer)",
        "torch": torch.__version__, "python": platform.python_version(),
        "compressed_tensors": ct_version, "compressed_tensors_decoder_checked": check_ct,
        "formulas": {"bitmask": "ceil(n/8) + k*b", "2:4": "n*b/2 + n/8",
                     "note": "n weights, k non-zero, b bytes each; file bytes add the safetensors JSON header"},
        "rows": rows,
    }
    write_json(args.out, result)
    write_csv(rows, args.out.with_suffix(".csv"), "setting")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
