"""End-to-end methods on the bundled SmolLM2-135M: ProxSparse (2:4), ELSA / ELSA-L, and the baseline
they must beat at equal tokens: prune with a layer-wise method, then fine-tune the kept weights with the
mask fixed ("sparsegpt+ft", "wanda+ft").

Same evaluation protocol as benchmarks/baseline.py (perplexity on 100 windows of 512 tokens of the
evaluation half); training text only from the calibration half. CPU time is the constraint: a step of
``batch_size`` windows of ``seqlen`` tokens costs a forward and backward pass of the whole model, so the
token budget is stated in every result (steps x batch_size x seqlen). Along the way, every
``--curve-every`` steps, the current model is made feasible (ADMM: projection of x; ProxSparse: top-2 of the
learned weights applied to the original ones; fine-tuning: already feasible) and evaluated on
``--curve-windows`` windows, so perplexity against tokens seen is recorded.

Each (method, setting, steps, batch, seqlen) writes its own JSON under benchmarks/results/e2e/; long
runs checkpoint under benchmarks/results/e2e/ckpt/ and resume exactly when restarted:

    .venv/bin/python benchmarks/e2e.py --method elsa --settings 0.8 --steps 256 --batch-size 2 --seqlen 256
    .venv/bin/python benchmarks/e2e.py --method proxsparse --settings 2:4 -o lam1=0.25
    .venv/bin/python benchmarks/e2e.py --summarize
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from minisparse.train import HookWrapper

from _common import write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "e2e"
METHODS = ("proxsparse", "elsa", "elsa-l", "sparsegpt+ft", "wanda+ft")




def _pattern(setting: str):
    from minisparse import parse_pattern

    return parse_pattern(setting) if ":" in setting else parse_pattern("unstructured", float(setting))


def _option(text: str):
    from minisparse.methods import parse_option

    return parse_option(text)


class Curve(HookWrapper):
    """Every ``every`` steps, evaluate the feasible model on a few windows (the weights are restored)."""

    def __init__(self, inner, every, feasible, evaluate, tokens_per_step):
        super().__init__(inner)
        self.every, self.feasible, self.evaluate = every, feasible, evaluate
        self.tokens_per_step = tokens_per_step
        self.points: list[dict] = []

    def after_step(self, step, params, lr, optimizer):
        super().after_step(step, params, lr, optimizer)
        if self.every and (step + 1) % self.every == 0:
            saved = {n: p.detach().clone() for n, p in params.items()}
            self.feasible(params)
            ppl = self.evaluate()
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
            self.points.append({"step": step + 1, "tokens": (step + 1) * self.tokens_per_step, "ppl": ppl})
            print(f"  step {step + 1}: ppl {ppl:.2f}", flush=True)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "points": self.points}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.points = list(state["points"])



def run(args, method: str, setting: str) -> Path:
    from minisparse import load_model, load_text, tokenize
    from minisparse.admm import ADMM, state_bytes
    from minisparse.evaluate import perplexity
    from minisparse.pipeline import peak_memory, prune_and_evaluate
    from minisparse.proxsparse import ProxSparseHooks, _top2
    from minisparse.train import FixedMask, TrainConfig, prunable_parameters, train

    opts = dict(_option(o) for o in args.option)
    if method == "elsa-l":  # error feedback is ELSA-L's default since 2026-12-02; older ELSA-L files without the
        opts.setdefault("error_feedback", True)  # option are the plain variant (now -o error_feedback=false)
    name = f"{method}-{setting.replace(':', 'of')}-s{args.steps}b{args.batch_size}l{args.seqlen}"
    if opts:
        name += "-" + "-".join(f"{k}{v}" for k, v in sorted(opts.items()))
    if args.seed != 0:  # seed 0 runs keep their old names; another seed must never be skipped as "done"
        name += f"-seed{args.seed}"
    out = Path(args.out_dir)
    path = out / f"{name}.json"
    if path.exists() and not args.redo:
        return path
    pat = _pattern(setting)
    t_start = time.perf_counter()
    if method.endswith("+ft"):
        lm, pre = prune_and_evaluate("smollm2-135m", method[:-3], pat, calib_samples=128, seqlen=512, seed=args.seed,
                                     eval_windows=args.eval_windows, evaluate_dense=False, progress=True)
        before = pre["pruned_ppl"]
    else:
        lm, before = load_model("smollm2-135m"), None
    model, tok = lm.model, lm.tokenizer
    calib_text = load_text("wikipedia", "calib")
    stream = tokenize(tok, calib_text)
    eval_text = load_text("wikipedia", "eval")
    params = prunable_parameters(model)
    originals = {n: p.detach().clone() for n, p in params.items()}

    def evaluate(windows=args.curve_windows):
        was = model.training
        model.eval()
        try:
            return perplexity(model, tok, eval_text, 512, windows, progress=False)["ppl"]
        finally:
            model.train(was)

    lr = float(opts.pop("lr", 2e-4 if method.startswith("elsa") else 1e-4))
    cfg_kw = dict(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=lr, seed=args.seed,
                  bos=lm.bos, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                  checkpoint_dir=str(out / "ckpt" / name))
    if method == "proxsparse":
        hooks = ProxSparseHooks(lam1=float(opts.get("lam1", 0.25)), lam2=float(opts.get("lam2", 0.0)),
                                lam_schedule=str(opts.get("lam_schedule", "constant")), lr_max=lr)
        cfg = TrainConfig(warmup=0.1, loss=str(opts.get("loss", "lm")), **cfg_kw)

        def feasible(ps):
            with torch.no_grad():
                for n, p in ps.items():
                    p.copy_(originals[n] * _top2(p))
    elif method.startswith("elsa"):
        low = method == "elsa-l"
        hooks = ADMM(pat, lam=float(opts.get("lam", 0.01)), interval=int(opts.get("interval", 32)),
                     projection=str(opts.get("projection", "fisher")), schedule=str(opts.get("schedule", "constant")),
                     steps=args.steps, lam_final=opts.get("lam_final"), low_precision=low,
                     penalty=str(opts.get("penalty", "gradient")),
                     error_feedback=opts.get("error_feedback"))
        # ELSA-L uses the 8-bit AdamW unless -o optimizer=adamw asks for 32-bit moments (to separate its parts)
        optimizer = str(opts.get("optimizer", "adamw8bit" if low else "adamw"))
        cfg = TrainConfig(warmup=0.0, betas=(0.9, 0.95), optimizer=optimizer, **cfg_kw)

        def feasible(ps):
            hooks.finalize(ps)
    else:
        hooks = FixedMask()
        cfg = TrainConfig(warmup=0.1, **cfg_kw)

        def feasible(ps):
            return None
    curve = Curve(hooks, args.curve_every, feasible, evaluate, args.batch_size * args.seqlen)
    if before is not None:
        curve.points.append({"step": 0, "tokens": 0, "ppl": before})
    report = train(model, stream, cfg, curve, params, bos_id=tok.bos_token_id if lm.bos else None, progress=True)
    # the mask itself (ProxSparse: top-2 of the learned weights, before they are replaced by the original ones)
    masks = {n: _top2(p) for n, p in params.items()} if method == "proxsparse" else None
    feasible(params)  # ProxSparse: top-2 of the learned weights applied to the original ones
    ppl = perplexity(model, tok, eval_text, 512, args.eval_windows, progress=True)
    # the number hyperparameters are chosen by: the final (feasible) model's perplexity on calibration text,
    # never on the evaluation half
    calib_ppl = perplexity(model, tok, calib_text, 512, args.curve_windows, progress=False)["ppl"]
    zeros = sum(int((p == 0).sum()) for p in params.values())
    numel = sum(p.numel() for p in params.values())
    result = {
        "method": method, "pattern": str(pat), "options": {**opts, "lr": lr}, "config": cfg.__dict__,
        "tokens": report.tokens, "train_seconds": report.seconds, "resumed_from": report.resumed_from,
        "ppl_before_training": before, "pruned_ppl": ppl["ppl"], "calib_ppl": calib_ppl, "calib_windows": args.curve_windows, "measured_sparsity": zeros / numel,
        "eval": {k: ppl[k] for k in ("text", "part", "seqlen", "windows", "tokens", "bos")},
        "curve": curve.points, "curve_windows": args.curve_windows, "log": report.log,
        "wall_seconds": time.perf_counter() - t_start, "torch_threads": torch.get_num_threads(),
        **peak_memory(torch.device("cpu")),
    }
    if method.startswith("elsa"):
        result["admm_state_bytes_per_param"] = hooks.bytes_per_param()
        result["state_bytes_model"] = state_bytes(method == "elsa-l", 8 if cfg.optimizer == "adamw8bit" else 32)
    if args.save_masks:  # the final masks, one bit per weight (not committed: 13 MB for SmolLM2-135M)
        from minisparse.engine import save_masks

        saved = save_masks(masks or {n: p != 0 for n, p in params.items()}, out / "masks" / f"{name}.pt")
        result["masks_file"] = os.path.relpath(saved, HERE.parent)
    write_json(path, result)
    shutil.rmtree(out / "ckpt" / name, ignore_errors=True)
    print(path.name, "ppl", round(ppl["ppl"], 2), flush=True)
    return path


def summarize(out: Path = OUT) -> Path:
    rows = []
    for path in sorted(Path(out).glob("*.json")):
        r = json.loads(path.read_text())
        cfg = r.get("config", {})
        rows.append({"method": r["method"], "pattern": r["pattern"], "tokens": r["tokens"],
                     # the same token budget can be spent as many small steps or fewer large ones
                     "steps": cfg.get("steps", ""), "batch_size": cfg.get("batch_size", ""), "seed": cfg.get("seed", ""),
                     "seqlen": cfg.get("seqlen", ""),
                     "ppl": round(r["pruned_ppl"], 3), "calib_ppl": round(r["calib_ppl"], 3) if "calib_ppl" in r else "",
                     "ppl_before_training": r["ppl_before_training"] or "",
                     "train_seconds": round(r["train_seconds"], 1), "options": json.dumps(r["options"]),
                     "peak_rss_mb": round(r.get("peak_rss_mb", 0))})
    target = Path(out).with_suffix(".csv")  # results/e2e -> results/e2e.csv
    return write_csv(rows, target, "method")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS, default="elsa")
    ap.add_argument("--settings", nargs="+", default=["0.8"])
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--eval-windows", type=int, default=100)
    ap.add_argument("--curve-every", type=int, default=64)
    ap.add_argument("--curve-windows", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=32)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--save-masks", action="store_true",
                    help="also write the final masks (bit-packed) to <out-dir>/masks/<run>.pt, for benchmarks/refit.py")
    ap.add_argument("--summarize", action="store_true")
    ap.add_argument("--out-dir", default=str(OUT),
                    help="where the result files go (default: %(default)s); e.g. a separate folder for short "
                         "hyperparameter probes, so they are never mistaken for benchmark rows")
    args = ap.parse_args()
    if not args.summarize:
        for setting in args.settings:
            run(args, args.method, setting)
    print(summarize(Path(args.out_dir)))


if __name__ == "__main__":
    main()
