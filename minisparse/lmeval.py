"""Downstream evaluation with EleutherAI's lm-evaluation-harness (``pip install 'minisparse[eval]'``).

Two tasks ship with minisparse and run offline. Both are generated deterministically from the
*evaluation* half of the bundled Wikipedia text (never a sentence that also occurs in the calibration
half), written as JSONL plus a task YAML into the user cache (a folder named by a hash of the content),
and loaded by lm-eval's own ``TaskManager(include_path=...)``:

- ``minisparse_cloze``: last-word prediction in the style of LAMBADA. The context is up to three
  sentences of a paragraph followed by a sentence without its final word; the target is that word
  (lower-case, at least four letters). lm-eval scores ``acc`` (the target is the model's greedy
  continuation, token by token) and ``perplexity`` (exp of the mean negative log-likelihood of the
  target).
- ``minisparse_wikipedia_rolling``: whole paragraphs scored by rolling log-likelihood, as lm-eval's
  ``wikitext`` task does, reported as ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``.

Any other lm-eval task name (arc_easy, hellaswag, ...) is passed through to lm-eval, which downloads its
data from the Hugging Face hub; without network that fails with a ValueError that says so.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .data import split_articles, wikipedia_articles
from .models import cache_dir

__all__ = [
    "OFFLINE_TASKS",
    "HUB_TASKS",
    "cloze_documents",
    "rolling_documents",
    "write_offline_tasks",
    "resolve_tasks",
    "hub_offline_error",
    "hub_unreachable_error",
    "run_lm_eval",
]

OFFLINE_TASKS = {
    "minisparse_cloze": "last word of a Wikipedia sentence given its paragraph (acc, perplexity); offline",
    "minisparse_wikipedia_rolling": "rolling log-likelihood of Wikipedia paragraphs "
                                    "(word/byte perplexity, bits per byte); offline",
}
HUB_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")
ALIASES = {"offline": tuple(OFFLINE_TASKS)}

# The rules that generate the offline tasks; changing any of them changes the content hash.
CLOZE_MAX_DOCS = 500
CLOZE_WORDS = (8, 60)          # words in the sentence whose last word is the target
CLOZE_CONTEXT_SENTENCES = 3    # preceding sentences of the same paragraph kept as context (at least one)
CLOZE_TARGET = re.compile(r"[a-z]{4,}")
ROLLING_MAX_DOCS = 200
ROLLING_WORDS = (40, 250)      # words per paragraph (about 55-400 SmolLM2 tokens)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_FORMAT_VERSION = "1"


def _rank(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _select(candidates: list[dict], key: str, cap: int, calib: str) -> list[dict]:
    """The ``cap`` candidates with the smallest SHA-256 of their ``key`` (so spread over all articles)
    whose ``key`` text does not occur in the calibration half, in text order, with sequential ids."""
    chosen: list[int] = []
    for i in sorted(range(len(candidates)), key=lambda i: _rank(candidates[i][key])):
        if len(chosen) == cap:
            break
        if candidates[i][key] not in calib:
            chosen.append(i)
    return [{"id": k, **candidates[i]} for k, i in enumerate(sorted(chosen))]


def _halves() -> tuple[list, str]:
    parts = split_articles(wikipedia_articles())
    return parts["eval"], "\n\n".join(a.text for a in parts["calib"])


def cloze_documents() -> list[dict]:
    """The documents of ``minisparse_cloze``: ``{id, title, context, target}`` with context + ' ' + target
    + '.' a verbatim piece of one paragraph of the evaluation half."""
    articles, calib = _halves()
    candidates = []
    for article in articles:
        for paragraph in article.text.split("\n"):
            sentences = _SENTENCE_BREAK.split(paragraph.strip())
            for k, sentence in enumerate(sentences):
                words = sentence.split()
                if k == 0 or not sentence.endswith(".") or sentence.endswith(".."):
                    continue
                if not CLOZE_WORDS[0] <= len(words) <= CLOZE_WORDS[1]:
                    continue
                target = words[-1][:-1]
                if not CLOZE_TARGET.fullmatch(target):
                    continue
                before = sentences[max(0, k - CLOZE_CONTEXT_SENTENCES):k]
                context = " ".join([*before, sentence[: sentence.rfind(" ")]])
                candidates.append({"title": article.title, "context": context, "target": target,
                                   "sentence": sentence})
    docs = _select(candidates, "sentence", CLOZE_MAX_DOCS, calib)
    for d in docs:
        del d["sentence"]
    return docs


def rolling_documents() -> list[dict]:
    """The documents of ``minisparse_wikipedia_rolling``: ``{id, title, text}``, whole paragraphs of the
    evaluation half that do not occur in the calibration half."""
    articles, calib = _halves()
    candidates = [{"title": a.title, "text": p} for a in articles for p in a.text.split("\n")
                  if ROLLING_WORDS[0] <= len(p.split()) <= ROLLING_WORDS[1]]
    return _select(candidates, "text", ROLLING_MAX_DOCS, calib)


def _yaml(task: str, data: Path, fields: dict[str, Any]) -> str:
    # JSON scalars are valid YAML, so every value is written with json.dumps (no quoting surprises).
    lines = [f"task: {task}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(data))}", "test_split: test"]
    for key, value in fields.items():
        if key == "metric_list":
            lines.append("metric_list:")
            for metric, agg, higher in value:
                lines += [f"  - metric: {metric}", f"    aggregation: {agg}",
                          f"    higher_is_better: {str(higher).lower()}"]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines += ["metadata:", f"  version: {_FORMAT_VERSION}.0"]
    return "\n".join(lines) + "\n"


_TASK_FIELDS = {
    "minisparse_cloze": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + target}}",
        "target_delimiter": "",
        "metric_list": [("acc", "mean", True), ("perplexity", "perplexity", False)],
    },
    "minisparse_wikipedia_rolling": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [("word_perplexity", "weighted_perplexity", False),
                        ("byte_perplexity", "weighted_perplexity", False),
                        ("bits_per_byte", "bits_per_byte", False)],
    },
}


def write_offline_tasks(root: str | Path | None = None) -> Path:
    """Write the offline tasks (JSONL data and lm-eval YAML) and return their folder.

    The folder is ``root`` (default ``cache_dir() / 'lm_eval'``) / the first 16 hex digits of a SHA-256
    over the generated documents, so unchanged content is written once and changed rules never reuse
    stale files. Written atomically (a temporary folder renamed into place).
    """
    docs = {"minisparse_cloze": cloze_documents(), "minisparse_wikipedia_rolling": rolling_documents()}
    jsonl = {t: "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in ds)
             for t, ds in docs.items()}
    digest = hashlib.sha256(json.dumps([_FORMAT_VERSION, _TASK_FIELDS, jsonl], sort_keys=True).encode("utf-8"))
    base = Path(root).expanduser() if root is not None else cache_dir() / "lm_eval"
    target = (base / digest.hexdigest()[:16]).resolve()
    if all((target / f"{t}.yaml").exists() for t in docs):
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is readable like any other
    try:
        for task, text in jsonl.items():
            (tmp / f"{task}.jsonl").write_text(text, encoding="utf-8")
            (tmp / f"{task}.yaml").write_text(_yaml(task, target / f"{task}.jsonl", _TASK_FIELDS[task]),
                                              encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote the same content first
            if not all((target / f"{t}.yaml").exists() for t in docs):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _known() -> str:
    return (f"offline tasks: {', '.join(OFFLINE_TASKS)} (or 'offline' for both); "
            f"hub tasks (need network): {', '.join(HUB_TASKS)}, or any other task lm-eval lists "
            "(`lm-eval ls tasks`)")


def resolve_tasks(tasks: str | Iterable[str], check_lm_eval: bool = True) -> list[str]:
    """Task names from a comma-separated string or a list (repeats and 'offline' expanded), checked.

    Offline and common hub tasks are known without importing lm-eval; any other name is looked up in
    lm-eval's task index (about 10 s) when ``check_lm_eval``. Raises ValueError naming the unknown tasks.
    """
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            for n in ALIASES.get(name.lower(), (name,)):
                if n and n not in names:
                    names.append(n)
    if not names:
        raise ValueError(f"no lm-eval task given; {_known()}")
    other = [n for n in names if n not in OFFLINE_TASKS and n not in HUB_TASKS]
    if other and check_lm_eval:
        try:
            from lm_eval.tasks import TaskManager
        except ModuleNotFoundError:
            raise ValueError(f"unknown lm-eval task(s) {', '.join(map(repr, other))}; {_known()}; "
                             "(lm-eval is not installed: pip install 'minisparse[eval]')") from None
        with _quiet():
            index = TaskManager()
        other = [n for n in other if n not in set(index.all_tasks)]
    if other:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(map(repr, other))}; {_known()}")
    return names


@contextlib.contextmanager
def _quiet():
    """lm-eval prints progress and bootstrap notes to stdout; send them to stderr so that stdout
    stays free for results (the CLI prints JSON there)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _offline_hint(names: Sequence[str], why: str) -> ValueError:
    return ValueError(f"lm-eval task(s) {', '.join(names)} need the Hugging Face hub (network), {why}; "
                      f"the offline tasks are {', '.join(OFFLINE_TASKS)}")


def hub_offline_error(tasks: Sequence[str]) -> ValueError | None:
    """The error to raise, without trying the network, when hub tasks are asked for while the
    environment says offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE); None otherwise."""
    hub = [t for t in tasks if t not in OFFLINE_TASKS]
    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if hub and flags:
        return _offline_hint(hub, f"but {' and '.join(flags)} say offline")
    return None


def hub_unreachable_error(tasks: Sequence[str], timeout: float = 5.0) -> ValueError | None:
    """The error to raise when hub tasks are asked for and the hub's host (``HF_ENDPOINT``, default
    huggingface.co) does not accept a TCP connection within ``timeout`` seconds; None otherwise. A probe
    of a few seconds, so that a command fails before it loads a model and computes perplexity."""
    import socket
    from urllib.parse import urlsplit

    hub = [t for t in tasks if t not in OFFLINE_TASKS]
    if not hub:
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return _offline_hint(hub, f"but {host}:{port} could not be reached ({err.__class__.__name__}: {err})")
    return None


def _plain(value: Any) -> Any:
    """A JSON-able scalar: numpy numbers become Python numbers, NaN and infinities None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_lm_eval(model, tokenizer, tasks: str | Sequence[str], *, limit: int | float | None = None,
                batch_size: int = 8, max_length: int = 2048, num_fewshot: int = 0, seed: int = 0,
                bootstrap_iters: int = 1000, task_dir: str | Path | None = None) -> dict[str, dict]:
    """Evaluate an in-memory causal LM with lm-eval's ``HFLM`` wrapper on ``tasks``.

    Returns ``{task: {metric: value, ..., 'samples': n}}`` with plain floats (metric names without
    lm-eval's ',none' filter suffix; ``*_stderr`` where lm-eval computes one, from ``bootstrap_iters``
    resamples for perplexities). ``limit`` caps the documents per task (an int, or a fraction < 1).
    """
    names = resolve_tasks(tasks)
    if limit is not None and not (isinstance(limit, int) and limit >= 1 or isinstance(limit, float) and 0 < limit < 1):
        raise ValueError(f"limit must be a number of documents >= 1 or a fraction in (0, 1); got {limit!r}")
    if batch_size < 1 or max_length < 2 or num_fewshot < 0:
        raise ValueError(f"need batch_size >= 1, max_length >= 2 and num_fewshot >= 0; "
                         f"got {batch_size}, {max_length}, {num_fewshot}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError:
        raise ModuleNotFoundError("lm-eval is not installed: pip install 'minisparse[eval]' "
                                  "(lm-eval==0.4.13)") from None
    local = [n for n in names if n in OFFLINE_TASKS]
    hub = [n for n in names if n not in OFFLINE_TASKS]
    if (offline := hub_offline_error(names)) is not None:
        raise offline
    folder = write_offline_tasks(task_dir) if local else None
    was_training = model.training
    env_before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # bootstrap in this process: no pool of forked model copies
    try:
        with _quiet():
            manager = TaskManager(include_path=str(folder) if folder else None, include_defaults=bool(hub))
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                    bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            except Exception as err:  # lm-eval and datasets raise many kinds when the hub is unreachable
                if hub and _looks_offline(err):
                    first = str(err).splitlines()[0] if str(err) else ""
                    raise _offline_hint(hub, f"which could not be reached ({type(err).__name__}: {first})") from err
                raise
    finally:
        model.train(was_training)
        if env_before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = env_before
    result: dict[str, dict] = {}
    # the requested tasks first, then whatever else lm-eval reports (the subtasks of a group)
    for task in [*[n for n in names if n in out["results"]], *[t for t in out["results"] if t not in names]]:
        row = {k.split(",")[0]: _plain(v) for k, v in out["results"][task].items()
               if "," in k and v != "N/A"}  # 'acc,none' -> 'acc'; skips 'alias' and missing stderrs
        if task in out.get("n-samples", {}):
            row["samples"] = int(out["n-samples"][task]["effective"])
        result[task] = row
    return result


def _looks_offline(err: BaseException) -> bool:
    """True for the errors datasets / huggingface_hub raise when the hub cannot be reached."""
    seen = 0
    while err is not None and seen < 10:
        text = f"{type(err).__name__} {err}".lower()
        if any(s in text for s in ("offline", "connection", "couldn't reach", "could not reach", "failed to resolve",
                                   "name or service not known", "network", "timed out", "max retries",
                                   "localentrynotfound", "datasetnotfound", "on the hub")):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False
