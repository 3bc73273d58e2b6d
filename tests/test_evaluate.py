import math

import pytest
import torch

from minisparse.data import load_text, tokenize
from minisparse.evaluate import eval_windows, perplexity


def test_perplexity_matches_an_independent_computation(smollm):
    text = load_text("wikipedia", "eval")
    res = perplexity(smollm.model, smollm.tokenizer, text, seqlen=64, max_windows=6, batch_size=4)
    assert res["windows"] == 6 and res["seqlen"] == 64 and res["tokens"] == 6 * 63 and res["bos"] is False
    # independent: Hugging Face's own shifted loss on each consecutive window, averaged over tokens
    ids = smollm.tokenizer(text, add_special_tokens=False).input_ids[: 6 * 64]
    losses = []
    with torch.no_grad():
        for i in range(6):
            window = torch.tensor([ids[i * 64:(i + 1) * 64]])
            losses.append(float(smollm.model(window, labels=window).loss))
    assert res["ppl"] == pytest.approx(math.exp(sum(losses) / 6), rel=1e-5)
    assert 5 < res["ppl"] < 200  # a real model on real text


def test_batching_does_not_change_the_result(smollm):
    text = load_text("wikipedia", "eval")
    a = perplexity(smollm.model, smollm.tokenizer, text, seqlen=32, max_windows=5, batch_size=1)
    b = perplexity(smollm.model, smollm.tokenizer, text, seqlen=32, max_windows=5, batch_size=3)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)


def test_windows_are_consecutive_and_bos_is_prepended(smollm):
    text = load_text("wikipedia", "eval")
    ids = tokenize(smollm.tokenizer, text)
    w = eval_windows(smollm.tokenizer, text, 16, 3, bos=False)
    assert torch.equal(w.flatten(), ids[:48])
    wb = eval_windows(smollm.tokenizer, text, 16, 3, bos=True)
    assert (wb[:, 0] == smollm.tokenizer.bos_token_id).all() and torch.equal(wb[:, 1:].flatten(), ids[:45])


def test_bad_eval_arguments(smollm):
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(smollm.tokenizer, "a short text", 512)
    with pytest.raises(ValueError, match="windows must be >= 1"):
        eval_windows(smollm.tokenizer, "a short text", 4, 0)
