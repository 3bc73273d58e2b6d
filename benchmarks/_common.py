"""Helpers the benchmark scripts share: atomic JSON results, settings, CSV summaries."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a half-written result file never exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def pattern_args(setting: str) -> tuple[str, float | None]:
    """A benchmark setting ("0.6" or "2:4") as (pattern, sparsity) arguments."""
    return (setting, None) if ":" in setting else ("unstructured", float(setting))


def tag(setting: str) -> str:
    """A setting as part of a file name ("2:4" -> "2of4")."""
    return setting.replace(":", "of")


def write_csv(rows: list[dict], target: Path, first: str = "method") -> Path:
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [first])
        writer.writeheader()
        writer.writerows(rows)
    return target
