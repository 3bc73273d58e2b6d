import pytest
import torch

from minisparse.data import calibration_batch, load_text, split_articles, tokenize, wikipedia_articles


def test_bundled_wikipedia_is_real_and_split_without_overlap():
    articles = wikipedia_articles()
    assert len(articles) >= 80
    assert any(a.title == "Anarchism" for a in articles)
    assert sum(len(a.text.split()) for a in articles) > 300_000
    parts = split_articles(articles)
    calib = {a.title for a in parts["calib"]}
    evals = {a.title for a in parts["eval"]}
    assert calib and evals and not calib & evals
    assert calib | evals == {a.title for a in articles}
    # no paragraph of one part appears in the other
    calib_lines = {line for a in parts["calib"] for line in a.text.splitlines()}
    assert not any(line in calib_lines for a in parts["eval"] for line in a.text.splitlines())


def test_split_is_deterministic_and_independent_of_order():
    articles = wikipedia_articles()
    a = split_articles(articles)
    b = split_articles(list(reversed(articles)))
    assert [x.title for x in a["eval"]] == [x.title for x in b["eval"]]


def test_markup_is_stripped():
    text = load_text("wikipedia", "eval")
    assert "[[" not in text and "{{" not in text and "<ref" not in text


def test_calibration_sampler_is_seeded(smollm):
    text = load_text("wikipedia", "calib")
    a = calibration_batch(smollm.tokenizer, text, 4, 32, seed=1)
    b = calibration_batch(smollm.tokenizer, text, 4, 32, seed=1)
    c = calibration_batch(smollm.tokenizer, text, 4, 32, seed=2)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(smollm.tokenizer, text)
    joined = ",".join(map(str, ids.tolist()))
    assert ",".join(map(str, a[0].tolist())) in joined  # windows are contiguous spans of the text


def test_calibration_with_bos_starts_every_window_with_it(smollm):
    batch = calibration_batch(smollm.tokenizer, load_text("wikipedia", "calib"), 3, 16, seed=0, bos=True)
    assert (batch[:, 0] == smollm.tokenizer.bos_token_id).all() and batch.shape == (3, 16)


@pytest.mark.parametrize("text, n, seqlen, message", [
    ("", 4, 32, "empty"),
    ("   \n ", 4, 32, "empty"),
    ("only a few words here", 4, 512, "too short"),
    ("some text " * 100, 0, 32, "samples must be >= 1"),
    ("some text " * 100, 4, 1, "seqlen must be >= 2"),
])
def test_bad_calibration_requests_fail_clearly(smollm, text, n, seqlen, message):
    with pytest.raises(ValueError, match=message):
        calibration_batch(smollm.tokenizer, text, n, seqlen)


def test_unknown_text_and_part():
    with pytest.raises(ValueError, match="unknown text"):
        load_text("imagenet")
    with pytest.raises(ValueError, match="part must be"):
        load_text("wikipedia", "train")
