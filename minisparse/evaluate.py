"""Perplexity by the standard protocol: non-overlapping windows over the joined evaluation text.

The text is tokenized once (no special tokens) and cut into consecutive windows of ``seqlen`` tokens
(the last partial window is dropped). A model whose tokenizer starts texts with BOS (Gemma, Llama-2)
gets BOS followed by seqlen - 1 text tokens per window. Perplexity is exp of the mean negative
log-likelihood over every predicted token (all but the first token of each window).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from ._progress import tqdm

from .data import load_text, tokenize
from .models import uses_bos

__all__ = ["eval_windows", "perplexity"]


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None,
                 bos: bool | None = None) -> torch.Tensor:
    """The evaluation windows (n, seqlen) of a text under the model's BOS convention."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 tokens; got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"the number of evaluation windows must be >= 1; got {max_windows}")
    bos = uses_bos(tokenizer) if bos is None else bos
    ids = tokenize(tokenizer, text)
    body = seqlen - 1 if bos else seqlen
    n = ids.numel() // body
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * body].reshape(n, body)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], 1)
    return windows


@torch.no_grad()
def perplexity(model, tokenizer, text: str | None = None, seqlen: int = 512,
               max_windows: int | None = 100, batch_size: int = 4, bos: bool | None = None,
               text_name: str = "wikipedia", progress: bool = False) -> dict[str, Any]:
    """Perplexity of ``model`` on ``text`` (default: the bundled Wikipedia evaluation half).

    Returns a dict with ``ppl``, ``nll`` (mean per token), the protocol (text, seqlen, windows,
    tokens predicted, bos) and the wall time, so every result says how it was measured.
    """
    if text is None:
        text = load_text(text_name, "eval")
    bos = uses_bos(tokenizer) if bos is None else bos
    windows = eval_windows(tokenizer, text, seqlen, max_windows, bos)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress,
                  leave=False):
        batch = windows[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    mean = total_nll / total_tokens
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "text": text_name,
        "part": "eval",
        "seqlen": seqlen,
        "windows": int(len(windows)),
        "tokens": int(total_tokens),
        "bos": bool(bos),
        "seconds": time.perf_counter() - start,
    }
