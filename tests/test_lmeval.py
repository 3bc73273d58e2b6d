"""lm-eval on the in-memory model: offline tasks built from the evaluation half only, results that agree
with a direct log-likelihood computation, a pruned model that scores worse, and clear errors for unknown
or unreachable tasks (before any model is loaded where possible)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

import minisparse as ms  # noqa: E402
from minisparse.cli import main  # noqa: E402
from minisparse.lmeval import (  # noqa: E402
    CLOZE_MAX_DOCS, OFFLINE_TASKS, ROLLING_MAX_DOCS, cloze_documents, resolve_tasks, rolling_documents,
    run_lm_eval, write_offline_tasks,
)

ROLLING = "minisparse_wikipedia_rolling"
CLOZE = "minisparse_cloze"


@pytest.fixture(scope="module")
def halves():
    return ms.load_text("wikipedia", "eval"), ms.load_text("wikipedia", "calib")


def test_generation_is_deterministic_and_keyed_by_content(tmp_path):
    a, b = write_offline_tasks(tmp_path / "a"), write_offline_tasks(tmp_path / "b")
    assert a.name == b.name and re.fullmatch(r"[0-9a-f]{16}", a.name)
    for task in OFFLINE_TASKS:
        assert (a / f"{task}.jsonl").read_bytes() == (b / f"{task}.jsonl").read_bytes()
        assert f'test: "{a / task}.jsonl"' in (a / f"{task}.yaml").read_text()
    stamp = (a / f"{CLOZE}.jsonl").stat().st_mtime_ns
    assert write_offline_tasks(tmp_path / "a") == a and (a / f"{CLOZE}.jsonl").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary folder left
    # another interpreter with another string-hash seed generates the same content
    code = "import sys; from minisparse.lmeval import write_offline_tasks as w; print(w(sys.argv[1]).name)"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == a.name


def test_documents_come_from_the_evaluation_half_only(halves):
    eval_text, calib_text = halves
    cloze, rolling = cloze_documents(), rolling_documents()
    assert len(cloze) == CLOZE_MAX_DOCS and len(rolling) == ROLLING_MAX_DOCS
    assert [d["id"] for d in cloze] == list(range(len(cloze)))
    parts = ms.split_articles(ms.wikipedia_articles())
    calib_titles = {a.title for a in parts["calib"]}
    assert len({d["title"] for d in cloze}) > 20 and len({d["title"] for d in rolling}) > 20  # spread out
    for d in cloze:
        passage = f"{d['context']} {d['target']}."
        last_sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", passage)[-1]
        assert passage in eval_text and last_sentence not in calib_text and d["title"] not in calib_titles
    for d in rolling:
        assert f"\n{d['text']}\n" in f"\n{eval_text}\n"  # a whole paragraph
        assert d["text"] not in calib_text and d["title"] not in calib_titles


def test_cloze_targets_are_the_last_word_of_a_sentence(halves):
    eval_text, _ = halves
    paragraphs = eval_text.split("\n")
    for d in cloze_documents():
        assert re.fullmatch(r"[a-z]{4,}", d["target"]) and not d["context"].endswith(" ")
        sentence_end = f"{d['context']} {d['target']}."
        hits = [p for p in paragraphs if sentence_end in p]
        assert hits
        # what follows the target's full stop is the end of the paragraph or a new sentence
        after = hits[0][hits[0].index(sentence_end) + len(sentence_end):]
        assert after == "" or re.match(r" [A-Z]", after)


def test_task_yaml_loads_through_lm_eval_offline(tmp_path):
    from lm_eval.tasks import TaskManager

    folder = write_offline_tasks(tmp_path)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert set(OFFLINE_TASKS) <= set(manager.all_tasks)
    tasks = manager.load(list(OFFLINE_TASKS))["tasks"]
    docs = {name: list(task.test_docs()) for name, task in tasks.items()}
    assert [d["target"] for d in docs[CLOZE]] == [d["target"] for d in cloze_documents()]
    assert [d["text"] for d in docs[ROLLING]] == [d["text"] for d in rolling_documents()]


def test_task_names_are_parsed_and_checked():
    assert resolve_tasks("offline") == list(OFFLINE_TASKS)
    assert resolve_tasks([f"{CLOZE},arc_easy", CLOZE, " piqa "]) == [CLOZE, "arc_easy", "piqa"]
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) 'lambada_minisparse'.*offline tasks: "
                                         r"minisparse_cloze, minisparse_wikipedia_rolling"):
        resolve_tasks("lambada_minisparse", check_lm_eval=False)
    with pytest.raises(ValueError, match="no lm-eval task given"):
        resolve_tasks(" , ")


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_xyz"], "unknown lm-eval task(s) 'no_such_task_xyz'"),
    (["--tasks", "offline", "--limit", "0"], "--limit must be an integer >= 1"),
    (["--tasks", "offline", "--max-length", "1"], "--max-length must be an integer >= 2"),
])
def test_bad_lm_eval_arguments_fail_before_the_model_is_loaded(tmp_path, capsys, args, message):
    # DIR does not exist: had the model been loaded first, the error would name the model instead
    assert main(["eval", str(tmp_path / "missing"), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "could not load model" not in err and "unknown model" not in err


def test_hub_task_with_offline_environment_fails_clearly_before_loading(tmp_path):
    res = subprocess.run([sys.executable, "-m", "minisparse", "eval", str(tmp_path / "missing"), "--tasks",
                          f"arc_easy,{CLOZE}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 2
    assert "arc_easy need the Hugging Face hub" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    assert "the offline tasks are minisparse_cloze, minisparse_wikipedia_rolling" in res.stderr
    assert res.stdout == ""


def test_hub_task_with_an_unreachable_hub_fails_clearly_before_loading(tmp_path):
    # a closed local port as the hub: the probe fails at once, before the model is loaded (DIR does not exist)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now, and nothing listens on it
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    res = subprocess.run([sys.executable, "-m", "minisparse", "eval", str(tmp_path / "missing"), "--tasks", "arc_easy"],
                         capture_output=True, text=True, timeout=300, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert res.returncode == 2
    assert f"arc_easy need the Hugging Face hub (network), but 127.0.0.1:{port} could not be reached" in res.stderr
    assert "could not load model" not in res.stderr and res.stdout == ""


def test_hub_probe_passes_when_the_hub_answers_and_ignores_offline_tasks(monkeypatch):
    import socket

    from minisparse.lmeval import hub_unreachable_error

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable_error(["arc_easy"]) is None  # something listens: the hub is reachable
    assert hub_unreachable_error([CLOZE]) is None  # no hub task, no probe


@pytest.mark.model
@pytest.mark.slow
def test_unreachable_hub_task_raises_a_clear_error(smollm, monkeypatch):
    """No offline flag in the environment: lm-eval really tries the hub, and its error is translated."""
    import datasets
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # the hub is unreachable here anyway; offline mode makes that immediate (no retries) and certain
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"arc_easy need the Hugging Face hub .*could not be reached"):
        run_lm_eval(smollm.model, smollm.tokenizer, "arc_easy", limit=2)


def _direct_rolling_nll(model, tokenizer, texts, prefix_id):
    """Sum of -log p(token | all previous tokens) over every token of each text, the first token
    conditioned on ``prefix_id`` alone (lm-eval's rolling protocol when a text fits one window)."""
    total = 0.0
    for text in texts:
        ids = tokenizer(text).input_ids
        inp = torch.tensor([[prefix_id, *ids[:-1]]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inp).logits[0].double(), -1)
        total -= float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
    return total


def _magnitude_pruned_copy(model, sparsity):
    """A copy with the smallest ``sparsity`` fraction of |W| zeroed in every decoder Linear (a plain
    per-matrix threshold: quicker here than the tie-exact ``ms.magnitude``)."""
    import copy

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ms.decoder_layers(pruned):
            for linear in ms.prunable_linears(layer).values():
                w = linear.weight
                w.mul_(w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values)
    return pruned


@pytest.mark.model
@pytest.mark.slow
def test_offline_tasks_on_the_bundled_model(smollm):
    n, max_length = 8, 512
    res = run_lm_eval(smollm.model, smollm.tokenizer, "offline", limit=n, batch_size=4, max_length=max_length)
    assert set(res) == set(OFFLINE_TASKS)
    cloze, rolling = res[CLOZE], res[ROLLING]
    assert cloze["samples"] == rolling["samples"] == n
    assert 0 < cloze["acc"] <= 1 and cloze["acc_stderr"] > 0 and 1 < cloze["perplexity"] < 1e4
    assert 1 < rolling["byte_perplexity"] < 4 and 10 < rolling["word_perplexity"] < 1e3
    assert rolling["bits_per_byte"] == pytest.approx(math.log2(rolling["byte_perplexity"]), rel=1e-9)

    # cross-check: the same documents scored directly with the model's logits (each fits one window)
    docs = [d["text"] for d in rolling_documents()[:n]]
    assert max(len(smollm.tokenizer(t).input_ids) for t in docs) < max_length
    prefix = smollm.tokenizer.bos_token_id
    prefix = smollm.tokenizer.eos_token_id if prefix is None else prefix
    nll = _direct_rolling_nll(smollm.model, smollm.tokenizer, docs, prefix)
    words = sum(len(re.split(r"\s+", t)) for t in docs)
    nbytes = sum(len(t.encode("utf-8")) for t in docs)
    assert rolling["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-3)
    assert rolling["byte_perplexity"] == pytest.approx(math.exp(nll / nbytes), rel=1e-3)

    # a 90% magnitude-pruned copy is far worse on the same cloze documents
    pruned = _magnitude_pruned_copy(smollm.model, 0.9)
    worse = run_lm_eval(pruned, smollm.tokenizer, CLOZE, limit=n, batch_size=4, max_length=max_length)[CLOZE]
    assert worse["samples"] == n
    assert worse["perplexity"] > 5 * cloze["perplexity"] and worse["acc"] < cloze["acc"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small randomly initialised Llama with the bundled model's tokenizer, saved like a pruned DIR."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ms.load_model("smollm2-135m")  # make sure the converted checkpoint (and its tokenizer) is cached
    tok = AutoTokenizer.from_pretrained(ms.cache_dir() / "models" / "smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("ckpt") / "pruned"
    ms.save_checkpoint(LlamaForCausalLM(config).eval(), tok, out)
    return out


@pytest.mark.model
def test_cli_eval_adds_lm_eval_to_the_report_without_losing_it(tiny_checkpoint, capsys):
    report = tiny_checkpoint / "report.json"
    original = {"method": "magnitude", "pruned_ppl": 123.0, "eval": {"text": "wikipedia", "seqlen": 32, "windows": 2}}
    report.write_text(json.dumps(original))
    assert main(["eval", str(tiny_checkpoint), "--tasks", "offline", "--limit", "2", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout holds only the JSON, lm-eval's chatter went to stderr
    assert printed["windows"] == 2 and printed["seqlen"] == 32
    assert set(printed["lm_eval"]) == set(OFFLINE_TASKS)
    saved = json.loads(report.read_text())
    assert {k: saved[k] for k in original} == original
    assert saved["lm_eval"] == printed["lm_eval"]
    assert saved["lm_eval"][CLOZE]["samples"] == 2 and saved["lm_eval"][CLOZE]["protocol"]["limit"] == 2
    assert saved["lm_eval"][ROLLING]["word_perplexity"] > 1000  # a random model predicts nothing

    # a second run of one task replaces that task's entry and keeps the other
    assert main(["eval", str(tiny_checkpoint), "--tasks", CLOZE, "--limit", "3", "--no-progress"]) == 0
    capsys.readouterr()
    again = json.loads(report.read_text())
    assert again["lm_eval"][CLOZE]["samples"] == 3 and again["lm_eval"][ROLLING] == saved["lm_eval"][ROLLING]
    assert sorted(p.name for p in tiny_checkpoint.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_help_lists_the_lm_eval_options():
    res = subprocess.run([sys.executable, "-m", "minisparse", "eval", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    for text in ("--tasks", "--limit", "--num-fewshot", "minisparse_cloze", "minisparse_wikipedia_rolling",
                 "offline", "arc_easy"):
        assert text in res.stdout
