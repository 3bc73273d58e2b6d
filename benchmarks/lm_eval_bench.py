"""lm-eval scores of the dense and pruned models on minisparse's offline tasks (or any lm-eval task).

Each model is a bundled name or a checkpoint directory written by `minisparse prune`, optionally named
NAME=MODEL; results go to benchmarks/results/lm_eval_<NAME>.json (the bundled smollm2-135m is named
'dense' unless named otherwise; a directory is named after its folder). A file is rewritten after every
task, and tasks already there with the same protocol are skipped, so an interrupted run resumes:

    .venv/bin/python benchmarks/lm_eval_bench.py                      # dense SmolLM2-135M, both offline tasks
    .venv/bin/python benchmarks/lm_eval_bench.py wanda60=runs/wanda-0.6 runs/sparsegpt-2of4
    .venv/bin/python benchmarks/lm_eval_bench.py --tasks minisparse_cloze --limit 50 smollm2-135m

The numbers come from minisparse.lmeval.run_lm_eval, the function behind
`minisparse eval DIR --tasks offline`. (The script is not called lm_eval.py: run as a script, that name
would shadow the lm_eval package.)
"""
from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch

from minisparse.lmeval import resolve_tasks, run_lm_eval, write_offline_tasks
from minisparse.models import BUNDLED, load_model

from _common import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"


def _name_and_model(spec: str) -> tuple[str, str]:
    if "=" in spec:
        name, model = spec.split("=", 1)
        return name, model
    if spec.strip().lower() == "smollm2-135m":
        return "dense", spec
    return (spec if spec.strip().lower() in BUNDLED else Path(spec).resolve().name), spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["smollm2-135m"], metavar="[NAME=]MODEL",
                    help="bundled name or checkpoint directory (default: smollm2-135m, named 'dense')")
    ap.add_argument("--tasks", default="offline", help="comma-separated lm-eval tasks (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="requests per forward (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=2048, help="longest input in tokens (default: %(default)s)")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=OUT, help="where lm_eval_<NAME>.json go (default: %(default)s)")
    ap.add_argument("--redo", action="store_true", help="rerun tasks that already have a result")
    args = ap.parse_args()
    tasks = resolve_tasks(args.tasks)
    protocol = {"limit": args.limit, "num_fewshot": args.num_fewshot, "max_length": args.max_length,
                "batch_size": args.batch_size, "lm_eval_version": version("lm_eval"),
                "offline_task_files": write_offline_tasks().name}
    for spec in args.models:
        name, model = _name_and_model(spec)
        path = args.out_dir / f"lm_eval_{name}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        done = result.get("tasks", {})
        todo = [t for t in tasks if args.redo or done.get(t, {}).get("protocol") != protocol]
        if not todo:
            print(f"{name}: all tasks done ({path})", flush=True)
            continue
        lm = load_model(model)
        report = Path(model) / "report.json"
        pruning = {}
        if report.is_file():
            r = json.loads(report.read_text())
            pruning = {k: r.get(k) for k in ("model", "method", "pattern", "measured_sparsity", "pruned_ppl")}
        result.update({"name": name, "model": model, "pruning": pruning or None,
                       "torch_threads": torch.get_num_threads()})
        result.setdefault("tasks", {})
        for task in todo:
            start = time.perf_counter()
            scores = run_lm_eval(lm.model, lm.tokenizer, [task], limit=args.limit, batch_size=args.batch_size,
                                 max_length=args.max_length, num_fewshot=args.num_fewshot)
            seconds = time.perf_counter() - start
            for t, row in scores.items():
                result["tasks"][t] = {**row, "seconds": round(seconds, 1), "protocol": protocol}
            write_json(path, result)
            print(f"{name} {task}: {json.dumps(scores[task])} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
