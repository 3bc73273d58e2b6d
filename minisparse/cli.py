"""Command line: ``minisparse prune``, ``minisparse eval``, ``minisparse compress``, ``minisparse methods``.

Every argument is checked before the model is loaded, and the output directory is written atomically
(a hidden temporary directory renamed into place at the end), so a bad argument or a crash never
leaves a half-written DIR behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["main", "build_parser"]

_EPILOG = """\
examples:
  minisparse prune --model smollm2-135m --method magnitude --sparsity 0.5 --out pruned-mag50
  minisparse prune --model smollm2-135m --method magnitude --pattern 2:4 --calib-samples 16 --out pruned-24
  minisparse prune --method sparsefw --sparsity 0.6 -o alpha=0.9 -o iterations=200 --out pruned-fw60
  minisparse eval pruned-mag50
  minisparse eval pruned-mag50 --tasks offline --limit 50
  minisparse prune --method magnitude --pattern 2:4 --save-format compressed --out pruned-24c
  minisparse compress pruned-mag50 --out pruned-mag50-small
  minisparse methods

models: a bundled short name (smollm2-135m, gemma3-270m; no network needed), a local Hugging Face
checkpoint directory, or a hub id such as Qwen/Qwen2.5-0.5B (needs network).
texts: wikipedia (bundled, split by article into calibration and evaluation halves), wikitext2, c4
(the last two from the Hugging Face hub, need network and `pip install datasets`).
"""


class CliError(Exception):
    """A user error: printed as one clear line, exit status 2."""


def _add_eval_args(p: argparse.ArgumentParser, defaults_from_report: bool = False) -> None:
    helpsfx = " (default: the protocol recorded in DIR/report.json, else %(default)s)" if defaults_from_report else \
        " (default: %(default)s)"
    p.add_argument("--text", default=None if defaults_from_report else "wikipedia",
                   help="evaluation corpus: wikipedia, wikitext2, c4" + helpsfx)
    p.add_argument("--eval-seqlen", type=int, default=None,
                   help="tokens per perplexity window" + (helpsfx if defaults_from_report else " (default: --seqlen)"))
    p.add_argument("--eval-windows", type=int, default=None if defaults_from_report else 100,
                   help="number of non-overlapping windows evaluated, 0 for all" + helpsfx)
    p.add_argument("--eval-batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minisparse",
        description="Prune large language models by optimization and measure what it costs.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model layer by layer, evaluate, save a checkpoint and report.json",
                       description="Prune every Linear layer of every decoder layer with a layer-wise method, "
                                   "evaluate dense and pruned perplexity, and write a Hugging Face checkpoint "
                                   "(safetensors) plus report.json to --out.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local path or hub id (default: %(default)s)")
    p.add_argument("--method", default="magnitude", help="pruning method; `minisparse methods` lists them (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights pruned, in [0, 1) (for unstructured and row patterns)")
    p.add_argument("--pattern", default=None,
                   help="unstructured (per matrix, default), row (same sparsity in every output row), "
                        "or N:M such as 2:4 (N kept in every M consecutive inputs; fixes the sparsity)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a solver option, repeatable: e.g. -o alpha=0.9 -o iterations=500 for sparsefw; "
                        "`minisparse methods` lists each method's options and defaults")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--calib-text", default="wikipedia", help="calibration corpus (its calibration half; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler (default: %(default)s)")
    p.add_argument("--device", default="auto", help="compute device: auto, cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype: auto = float32 on CPU, bfloat16 on CUDA (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per layer forward (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory; must not exist unless --force")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory (only after success)")
    p.add_argument("--skip-dense-eval", action="store_true", help="do not evaluate the dense model")
    p.add_argument("--save-format", default="hf", choices=["hf", "compressed", "both"],
                   help="hf: a plain Hugging Face checkpoint (dense safetensors); compressed: minisparse's "
                        "compact sparse form (bitmask or N:M indices per matrix, bit-exact, read back by "
                        "`minisparse eval`); both: hf in --out and the compact form in --out/compressed "
                        "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_eval_args(p)

    e = sub.add_parser("eval", help="evaluate a saved checkpoint's perplexity (and lm-eval tasks)",
                       description="Re-evaluate the perplexity of a checkpoint written by `minisparse prune` "
                                   "(or any Hugging Face causal LM directory), by default with the protocol "
                                   "recorded in its report.json, and print the result as JSON. With --tasks, "
                                   "also run EleutherAI's lm-evaluation-harness on the model (pip install "
                                   "'minisparse[eval]') and store its results under 'lm_eval' in "
                                   "DIR/report.json when there is one.",
                       epilog="lm-eval tasks: minisparse_cloze (last-word prediction, acc and perplexity) and "
                              "minisparse_wikipedia_rolling (rolling word/byte perplexity) run offline, built "
                              "from the evaluation half of the bundled Wikipedia; 'offline' names both. Hub "
                              "tasks such as arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, "
                              "openbookqa (or any task `lm-eval ls tasks` lists) need network.")
    e.add_argument("path", metavar="DIR", help="checkpoint directory (or a bundled model name)")
    e.add_argument("--device", default="auto", help="compute device (default: %(default)s)")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_eval_args(e, defaults_from_report=True)
    e.add_argument("--tasks", action="append", default=[], metavar="TASKS",
                   help="lm-eval tasks, comma-separated or repeated: minisparse_cloze, "
                        "minisparse_wikipedia_rolling, offline (both), or hub tasks such as arc_easy")
    e.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many documents per task "
                                                           "(default: all)")
    e.add_argument("--num-fewshot", type=int, default=0, help="lm-eval: few-shot examples (default: %(default)s)")
    e.add_argument("--lm-eval-batch-size", type=int, default=8,
                   help="lm-eval: requests per forward pass (default: %(default)s)")
    e.add_argument("--max-length", type=int, default=2048,
                   help="lm-eval: longest input in tokens; rolling windows use it (default: %(default)s)")

    c = sub.add_parser("compress", help="convert a saved pruned checkpoint into a compact sparse one",
                       description="Store every prunable matrix of a checkpoint (from `minisparse prune` or any "
                                   "Hugging Face causal LM directory) as a bitmask of its non-zeros plus their "
                                   "values, or as N:M values plus packed in-group indices, or dense where that is "
                                   "smaller. The weights load back bit for bit (a zero's sign excepted) with "
                                   "`minisparse eval DST_DIR` or minisparse.load_compressed.")
    c.add_argument("src", metavar="SRC_DIR", help="checkpoint directory to convert")
    c.add_argument("--out", required=True, help="output directory; must not exist unless --force")
    c.add_argument("--format", default="minisparse", choices=["minisparse", "compressed-tensors"],
                   help="minisparse (per-matrix layouts) or compressed-tensors' legacy sparse-bitmask / "
                        "sparse-24-bitmask layout, readable by compressed-tensors <= 0.14 (default: %(default)s)")
    c.add_argument("--pattern", default=None,
                   help="layout rule: auto (2:4, bitmask or dense, whichever is smallest per matrix), unstructured "
                        "or row (bitmask), or N:M (every matrix must satisfy it) (default: the pattern in "
                        "SRC_DIR/report.json, else auto)")
    c.add_argument("--force", action="store_true", help="replace an existing --out directory (only after success)")

    sub.add_parser("methods", help="list the pruning methods", description="List the registered pruning methods.")

    pl = sub.add_parser("plan", help="predict the peak memory of a pruning run from the model's config alone",
                        description="Predict peak device and host memory of `minisparse prune` for a model "
                                    "config (no weights are loaded), term by term: layer weights, calibration "
                                    "hidden states, Gram matrices, forward temporaries and solver workspace for "
                                    "layer-wise methods; weights, gradients, optimizer and ADMM states, "
                                    "activations and logits for end-to-end methods.",
                        epilog="models: llama-2-7b, llama-2-13b, llama-3.1-8b, qwen2.5-14b, gemma-2-27b (configs "
                               "shipped), a bundled name, a config.json or checkpoint directory, or a hub id "
                               "(online).", formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("--model", required=True, help="known name, bundled name, config.json, directory or hub id")
    pl.add_argument("--method", default="sparsegpt", help="magnitude, wanda, ria, sparsegpt, sparsefw, proxsparse, "
                                                         "elsa, elsa-l (default: %(default)s)")
    pl.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default: %(default)s)")
    pl.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: %(default)s)")
    pl.add_argument("--batch-size", type=int, default=8, help="windows per forward; for end-to-end methods the "
                                                             "training batch (default: %(default)s)")
    pl.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    pl.add_argument("--device", default="cuda", help="cuda (one layer on the GPU, the rest on the host) or cpu")
    pl.add_argument("--grad-checkpointing", action="store_true", help="end-to-end methods: checkpoint activations")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


@contextmanager
def _atomic_dir(target: Path, force: bool):
    """Yield a temporary sibling directory that becomes ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if target.exists():
            if not force:
                raise CliError(f"--out {target} appeared while pruning; nothing was written")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _validate_prune(args) -> tuple:
    from .data import TEXTS
    from .methods import check_options, get_method, parse_option
    from .models import BUNDLED, resolve_device, _looks_like_hub_id
    from .patterns import parse_pattern

    try:
        pattern = parse_pattern(args.pattern, args.sparsity)
        method = get_method(args.method)
        device = resolve_device(args.device)
        options = dict(parse_option(o) for o in args.option)
        check_options(method, options, pattern)
    except ValueError as err:
        raise CliError(str(err)) from None
    args.solver_options = options
    model_key = args.model.strip().lower()
    if model_key not in BUNDLED and not Path(args.model).expanduser().exists() and not _looks_like_hub_id(args.model):
        raise CliError(f"unknown model {args.model!r}: use a bundled name ({', '.join(BUNDLED)}), "
                       "an existing checkpoint directory, or a hub id such as org/name")
    for flag, value in (("--calib-text", args.calib_text), ("--text", args.text)):
        if value.strip().lower() not in TEXTS:
            raise CliError(f"{flag} {value!r} is not known; choose one of: {', '.join(TEXTS)}")
    for flag, value, low in (("--calib-samples", args.calib_samples, 1), ("--seqlen", args.seqlen, 2),
                             ("--batch-size", args.batch_size, 1), ("--eval-batch-size", args.eval_batch_size, 1),
                             ("--eval-windows", args.eval_windows, 0)):
        if value < low:
            raise CliError(f"{flag} must be an integer >= {low}; got {value}")
    if args.eval_seqlen is not None and args.eval_seqlen < 2:
        raise CliError(f"--eval-seqlen must be an integer >= 2; got {args.eval_seqlen}")
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise CliError(f"--out {out} already exists; choose a new directory or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    return pattern, method, device, out


def _prune(args) -> dict:
    pattern, method, device, out = _validate_prune(args)
    from .models import save_checkpoint
    from .pipeline import peak_memory, prune_and_evaluate

    wall = time.perf_counter()
    try:
        lm, result = prune_and_evaluate(
            args.model, method, pattern, calib_samples=args.calib_samples, seqlen=args.seqlen,
            calib_text=args.calib_text, seed=args.seed, eval_text=args.text, eval_seqlen=args.eval_seqlen,
            eval_windows=args.eval_windows or None, eval_batch_size=args.eval_batch_size,
            evaluate_dense=not args.skip_dense_eval, device=device, dtype=_resolve_dtype(args.dtype, device),
            batch_size=args.batch_size, solver_options=args.solver_options, progress=not args.no_progress)
    except (ValueError, ModuleNotFoundError) as err:
        raise CliError(str(err)) from None
    with _atomic_dir(out, args.force) as tmp:
        if args.save_format in ("hf", "both"):
            save_checkpoint(lm.model, lm.tokenizer, tmp)
        if args.save_format in ("compressed", "both"):
            from .compress import save_compressed

            target = tmp if args.save_format == "compressed" else tmp / "compressed"
            try:
                result["compressed"] = save_compressed(lm.model, lm.tokenizer, target, pattern=pattern)
            except ValueError as err:
                raise CliError(str(err)) from None
        result["save_format"] = args.save_format
        result["wall_seconds"] = time.perf_counter() - wall
        result.update(peak_memory(device))
        (tmp / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if args.save_format == "both":  # `minisparse eval OUT/compressed` then uses the same protocol
            shutil.copyfile(tmp / "report.json", tmp / "compressed" / "report.json")
    summary = {k: result[k] for k in ("model", "method", "pattern", "measured_sparsity", "dense_ppl", "pruned_ppl",
                                      "wall_seconds", "peak_rss_mb")}
    summary["out"] = str(out)
    return summary


def _compress(args) -> dict:
    from .compress import compressed_format, load_compressed, parse_layout_rule, save_compressed

    src = Path(args.src).expanduser()
    if not (src / "config.json").is_file():
        raise CliError(f"SRC_DIR {src} is not a checkpoint directory (no config.json); give the --out directory "
                       "of `minisparse prune` or another Hugging Face causal LM directory")
    out = Path(args.out).expanduser()
    if out.resolve() == src.resolve():
        raise CliError("--out must differ from SRC_DIR; the conversion never overwrites its source")
    if out.exists() and not args.force:
        raise CliError(f"--out {out} already exists; choose a new directory or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    report = json.loads((src / "report.json").read_text(encoding="utf-8")) if (src / "report.json").exists() else {}
    pattern = args.pattern if args.pattern is not None else report.get("pattern")
    try:
        parse_layout_rule(pattern)
    except ValueError as err:
        raise CliError(str(err)) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if compressed_format(src) is not None:
            model, tok = load_compressed(src)
        else:
            has_tok = any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
            tok = AutoTokenizer.from_pretrained(str(src)) if has_tok else None
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")  # keep the stored dtype
    except (OSError, ValueError) as err:
        raise CliError(f"could not load {src}: {err}") from None
    with _atomic_dir(out, args.force) as tmp:
        try:
            summary = save_compressed(model, tok, tmp, pattern=pattern, format=args.format)
        except ValueError as err:
            raise CliError(str(err)) from None
        if report:
            shutil.copyfile(src / "report.json", tmp / "report.json")
    summary["out"] = str(out)
    return summary


def _eval(args) -> dict:
    from .data import TEXTS
    from .models import resolve_device

    path = Path(args.path).expanduser()
    recorded = {}
    if (path / "report.json").exists():
        recorded = json.loads((path / "report.json").read_text(encoding="utf-8")).get("eval", {})
    text = args.text or recorded.get("text", "wikipedia")
    seqlen = args.eval_seqlen or recorded.get("seqlen", 512)
    windows = args.eval_windows if args.eval_windows is not None else recorded.get("windows", 100)
    if text not in TEXTS:
        raise CliError(f"--text {text!r} is not known; choose one of: {', '.join(TEXTS)}")
    if seqlen < 2 or windows < 0:
        raise CliError(f"need --eval-seqlen >= 2 and --eval-windows >= 0; got {seqlen}, {windows}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise CliError(str(err)) from None
    tasks = _validate_lm_eval(args) if args.tasks else None
    from .evaluate import perplexity
    from .models import load_model

    try:
        lm = load_model(str(args.path), dtype=_resolve_dtype(args.dtype, device), device=device)
    except (ValueError, ModuleNotFoundError) as err:
        raise CliError(str(err)) from None
    res = perplexity(lm.model, lm.tokenizer, None, seqlen, windows or None, args.eval_batch_size,
                     text_name=text, progress=not args.no_progress)
    result = {"model": str(args.path), **res}
    if tasks:
        from .lmeval import run_lm_eval

        protocol = {"limit": args.limit, "num_fewshot": args.num_fewshot, "max_length": args.max_length,
                    "batch_size": args.lm_eval_batch_size, "lm_eval_version": _version("lm_eval")}
        try:
            scores = run_lm_eval(lm.model, lm.tokenizer, tasks, limit=args.limit,
                                 batch_size=args.lm_eval_batch_size, max_length=args.max_length,
                                 num_fewshot=args.num_fewshot)
        except (ValueError, ModuleNotFoundError) as err:
            raise CliError(str(err)) from None
        result["lm_eval"] = {task: {**row, "protocol": protocol} for task, row in scores.items()}
        if (path / "report.json").is_file():
            _update_report(path / "report.json", "lm_eval", result["lm_eval"])
    return result


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _validate_lm_eval(args) -> list[str]:
    """Check the lm-eval arguments (task names included) before any model is loaded."""
    import importlib.util

    from .lmeval import hub_offline_error, hub_unreachable_error, resolve_tasks

    if importlib.util.find_spec("lm_eval") is None:
        raise CliError("--tasks needs lm-eval: pip install 'minisparse[eval]' (lm-eval==0.4.13)")
    for flag, value, low in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                             ("--lm-eval-batch-size", args.lm_eval_batch_size, 1),
                             ("--max-length", args.max_length, 2)):
        if value is not None and value < low:
            raise CliError(f"{flag} must be an integer >= {low}; got {value}")
    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as err:
        raise CliError(f"--tasks: {err}") from None
    offline = hub_offline_error(tasks) or hub_unreachable_error(tasks)  # before minutes of loading and perplexity
    if offline is not None:
        raise CliError(str(offline))
    return tasks


def _update_report(report: Path, key: str, value: dict) -> None:
    """Merge ``value`` into ``report[key]`` (task by task) and replace the file atomically."""
    content = json.loads(report.read_text(encoding="utf-8"))
    merged = content.get(key) if isinstance(content.get(key), dict) else {}
    content[key] = {**merged, **value}
    fd, tmp = tempfile.mkstemp(prefix=f".{report.name}.", suffix=".tmp", dir=report.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(content, indent=2) + "\n")
        os.chmod(tmp, report.stat().st_mode & 0o777)
        os.replace(tmp, report)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "methods":
            from .methods import available_methods, method_options

            for name, m in available_methods().items():
                print(f"{name:12s} {m.kind:10s} {m.description}")
                opts = method_options(m)
                if opts:
                    print(" " * 24 + "options: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
            return 0
        if args.command == "plan":
            from .plan import format_plan, plan

            try:
                p = plan(args.model, args.method, calib_samples=args.calib_samples, seqlen=args.seqlen,
                         batch_size=args.batch_size, steps_batch=args.batch_size, dtype=args.dtype,
                         device="cpu" if args.device == "cpu" else "cuda", grad_checkpointing=args.grad_checkpointing)
            except ValueError as err:
                raise CliError(str(err)) from None
            print(json.dumps(p, indent=2) if args.json else format_plan(p))
            return 0
        result = {"prune": _prune, "eval": _eval, "compress": _compress}[args.command](args)
    except CliError as err:
        print(f"minisparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
