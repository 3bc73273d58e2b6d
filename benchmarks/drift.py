"""What do ProxSparse's learned weights carry that its mask, applied to the original weights, does not?

ProxSparse trains the prunable weights with AdamW plus the 2:4 prox, then keeps only the mask (top-2
magnitudes per group of four learned weights) and applies it to the *original* weights. This script takes
the learned weights from a training checkpoint of ``benchmarks/e2e.py`` (``train_state.pt``; copy it before
the run ends, since e2e.py removes its checkpoint directory when it finishes) and measures on the bundled
SmolLM2-135M, same protocol as the result tables (100 windows of 512 tokens of the evaluation half):

- ``learned_dense``: the learned weights as they are (not yet exactly 2:4 in every group);
- ``learned_masked``: the learned weights under their own top-2 mask (the sparse model training found);
- ``original_masked``: the original weights under the same mask (what ProxSparse returns);

each also on the first 20 windows of 512 tokens of the calibration half (the text training sampled
from, as e2e.py's ``calib_ppl``): the gap between the two says how much of what training learned is
memorised calibration text. Also the dense model's perplexity on windows of the training length
(``--train-seqlen``, 200 windows of the calibration half), the level to compare a training loss with; the
relative change of the kept weights, ||M*(W_learned - W0)|| / ||M*W0|| over all prunable matrices; and the
fraction of groups already exactly 2:4. One JSON per checkpoint under benchmarks/results/drift/:

    .venv/bin/python benchmarks/drift.py /path/to/train_state.pt --name <run>-step<k>
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "drift"


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a train_state.pt written by a ProxSparse run (or a file with its 'params')")
    ap.add_argument("--name", required=True, help="result file name (benchmarks/results/drift/<name>.json)")
    ap.add_argument("--windows", type=int, default=100, help="evaluation windows of 512 tokens (default 100)")
    ap.add_argument("--calib-windows", type=int, default=20,
                    help="windows of 512 tokens of the calibration half (default 20, as e2e.py's calib_ppl)")
    ap.add_argument("--train-seqlen", type=int, default=128, help="the training windows' length (default 128)")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)

    from minisparse import load_model, load_text
    from minisparse.evaluate import perplexity
    from minisparse.proxsparse import _top2, group_is_24
    from minisparse.train import prunable_parameters

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    learned = state["params"]
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    params = prunable_parameters(model)
    missing = sorted(set(params) - set(learned))
    if missing:
        raise SystemExit(f"{args.checkpoint} has no learned weights for {len(missing)} prunable matrices "
                         f"(first: {missing[0]}); is it a checkpoint of a run on {args.model}?")
    original = {n: p.detach().clone() for n, p in params.items()}
    masks = {n: _top2(learned[n]) for n in params}

    num = den = 0.0
    exact = groups = 0
    for n in params:
        m = masks[n]
        num += float(((learned[n] - original[n]) * m).double().pow(2).sum())
        den += float((original[n] * m).double().pow(2).sum())
        exact += int(group_is_24(learned[n]).sum())
        groups += learned[n].numel() // 4

    calib_text = load_text("wikipedia", "calib")

    def ppl(weights) -> dict[str, float]:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights(n))
        return {"eval": perplexity(model, tok, seqlen=512, max_windows=args.windows)["ppl"],
                "calib": perplexity(model, tok, calib_text, 512, args.calib_windows)["ppl"]}

    t0 = time.time()
    dense_train = perplexity(model, tok, calib_text, args.train_seqlen, 200)
    result = {
        "checkpoint": str(args.checkpoint), "step": state.get("step"), "model": args.model,
        "eval": {"text": "wikipedia eval half", "seqlen": 512, "windows": args.windows},
        "calib": {"text": "wikipedia calibration half (first windows)", "seqlen": 512, "windows": args.calib_windows},
        "learned_exact_24": exact / groups,
        "kept_relative_change": (num / den) ** 0.5,
        "learned_dense": ppl(lambda n: learned[n]),
        "learned_masked": ppl(lambda n: learned[n] * masks[n] + 0.0),
        "original_masked": ppl(lambda n: original[n] * masks[n] + 0.0),
        "original_dense": ppl(lambda n: original[n]),
        "dense_calib_train_windows": {"seqlen": args.train_seqlen, "windows": 200, "ppl": dense_train["ppl"],
                                      "nll": dense_train["nll"]},
    }
    result["seconds"] = time.time() - t0
    path = OUT / f"{args.name}.json"
    write_json(path, result)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})
    return path


if __name__ == "__main__":
    main()
