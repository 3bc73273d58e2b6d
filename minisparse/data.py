"""Text: real Wikipedia articles bundled with gensim, split by article; `datasets` corpora when online.

The bundled text is the enwiki dump that ships inside gensim's test data (206 pages, about 100 real
articles). Each article is cleaned of markup, references and link lists, and the articles are split
deterministically into a *calibration* half and an *evaluation* half that share no article.
"""
from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import cache_dir

__all__ = [
    "Article",
    "wikipedia_articles",
    "split_articles",
    "load_text",
    "tokenize",
    "calibration_batch",
    "TEXTS",
]

_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                  "bibliography", "sources", "footnotes", "citations", "notes and references"}
_MIN_LINE_CHARS = 40
_MIN_ARTICLE_CHARS = 2000
_CLEANING_VERSION = "3"

# Corpora a user who is online can name; (dataset path, config, split per part, text field).
TEXTS = {
    "wikipedia": "bundled Wikipedia articles (gensim test dump), split by article; offline",
    "wikitext2": "WikiText-2 raw (datasets: wikitext / wikitext-2-raw-v1): calib=train, eval=test; online",
    "c4": "C4 English (datasets: allenai/c4, first shard): calib=train, eval=validation; online",
}


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def _dump_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the bundled Wikipedia text needs gensim: pip install gensim")
    return Path(spec.origin).parent / "test" / "test_data" / _DUMP


def _clean(wikitext: str) -> str:
    import mwparserfromhell as mw

    code = mw.parse(wikitext)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).lower() in {"ref", "table", "gallery", "math", "timeline", "references"}:
            try:
                code.remove(tag)
            except ValueError:
                pass
    for template in code.filter_templates(recursive=False):
        try:
            code.remove(template)
        except ValueError:
            pass
    for link in code.filter_wikilinks(recursive=False):
        target = str(link.title).strip().lower()
        if target.startswith(("file:", "image:", "category:")) or re.match(r"^[a-z\-]{2,12}:", target):
            try:
                code.remove(link)
            except ValueError:
                pass
    paragraphs: list[str] = []
    drop_level = None  # inside a dropped section (and its subsections) of this heading level
    for section in code.get_sections(include_lead=True, flat=True):
        headings = section.filter_headings(recursive=False)
        if headings:
            level = headings[0].level
            if drop_level is not None and level > drop_level:
                continue
            drop_level = None
            if headings[0].title.strip_code().strip().lower() in _DROP_SECTIONS:
                drop_level = level
                continue
            for h in headings:
                section.remove(h)
        text = section.strip_code(normalize=True, collapse=True)
        for line in text.splitlines():
            line = re.sub(r"\s+", " ", line).strip()
            leftover = any(mark in line for mark in ("[[", "]]", "{{", "}}", "<ref", "</ref", "|}"))
            if len(line) >= _MIN_LINE_CHARS and not leftover and not line.startswith(("*", "|", "{", "!")):
                paragraphs.append(line)
    return "\n".join(paragraphs)


def wikipedia_articles() -> list[Article]:
    """All cleaned articles of the bundled dump (redirects and short pages dropped), cached as JSON."""
    dump = _dump_path()
    cached = cache_dir() / "text" / f"wikipedia-v{_CLEANING_VERSION}.json"
    if cached.exists():
        return [Article(**a) for a in json.loads(cached.read_text(encoding="utf-8"))]
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.BZ2File(dump) as handle:
        for title, text, _ in extract_pages(handle, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            cleaned = _clean(text)
            if len(cleaned) >= _MIN_ARTICLE_CHARS:
                articles.append(Article(title, cleaned))
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump([a.__dict__ for a in articles], f)
    os.replace(tmp, cached)
    return articles


def split_articles(articles: list[Article]) -> dict[str, list[Article]]:
    """Deterministic split by article: order by SHA-256 of the title, alternate calib / eval."""
    ranked = sorted(articles, key=lambda a: hashlib.sha256(a.title.encode("utf-8")).hexdigest())
    return {"calib": ranked[0::2], "eval": ranked[1::2]}


def _load_hf(name: str, part: str) -> str:
    try:
        from datasets import load_dataset
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"text {name!r} comes from the Hugging Face hub and needs `datasets`: pip install 'minisparse[online]'"
        ) from None
    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if part == "calib" else "test")
        return "\n\n".join(ds["text"])
    if name == "c4":
        if part == "calib":
            ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                              split="train")
        else:
            ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                              split="validation")
            ds = ds.select(range(min(len(ds), 1100)))
        return "\n\n".join(ds["text"])
    raise AssertionError(name)


def load_text(name: str = "wikipedia", part: str = "eval") -> str:
    """The joined text of one part ('calib' or 'eval') of a corpus named in ``TEXTS``.

    Articles are joined with a blank line. For 'wikipedia' the parts never share an article.
    """
    if part not in ("calib", "eval"):
        raise ValueError(f"part must be 'calib' or 'eval'; got {part!r}")
    key = str(name).strip().lower()
    if key not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of: {', '.join(TEXTS)}")
    if key == "wikipedia":
        return "\n\n".join(a.text for a in split_articles(wikipedia_articles())[part])
    return _load_hf(key, part)


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a whole text as one 1-D LongTensor, without special tokens.

    The last few results are kept in memory (keyed by tokenizer and a hash of the text), since the
    same evaluation text is tokenized for every perplexity call.
    """
    if not text or not text.strip():
        raise ValueError("the text is empty; give a calibration/evaluation text with content")
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer),
           hashlib.sha256(text.encode("utf-8")).hexdigest())
    if key not in _TOKEN_CACHE:
        ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key].clone()


def calibration_batch(tokenizer, text: str, n_samples: int, seqlen: int, seed: int = 0,
                      bos: bool = False) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at seeded random offsets of the text: (n, seqlen).

    With ``bos`` each window is BOS followed by seqlen - 1 text tokens (the model's convention).
    Raises ValueError if the text is too short for one window.
    """
    if n_samples < 1:
        raise ValueError(f"calibration samples must be >= 1; got {n_samples}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 tokens; got {seqlen}")
    ids = tokenize(tokenizer, text)
    body = seqlen - 1 if bos else seqlen
    if ids.numel() <= body:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, too short for a window of {seqlen} tokens; "
            f"give a longer text or a smaller --seqlen (at most {ids.numel() - 1 + int(bos)})"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - body, (n_samples,), generator=gen)
    batch = torch.stack([ids[s:s + body] for s in starts.tolist()])
    if bos:
        batch = torch.cat([torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long), batch], 1)
    return batch
