r"""ProxSparse (Liu et al.): learn a 2:4 mask by proximal gradient on the model's own loss.

Per step (Algorithm 1 of the paper, as in the authors' code): an AdamW step on
:math:`\mathcal L(W) + \lambda_2 \mathrm{Reg}_{W_0}(W)` (the frozen-weight regularizer, smooth: its
closed-form gradient is added to the loss gradient), then every prunable weight is replaced by the exact proximal operator of
:math:`\lambda_1 \mathrm{Reg}_{2:4}` (:func:`minisparse.prox.prox_24`). At the end the mask is the top-2
magnitudes of every group of four *learned* weights, applied to the *original* weights: ProxSparse only
selects a mask, it never updates a weight.

Is :math:`\lambda_1` scaled by the learning rate? For plain proximal gradient the step would be
:math:`\mathrm{prox}_{\eta\lambda_1 \mathrm{Reg}}`. The paper's Algorithm 1 writes the prox with
:math:`\lambda_1` alone, and the authors' code applies ``prox_op(W, lambda_)`` after every AdamW step with
the learning rate nowhere in it; the :math:`\lambda_1` values they publish (0.2 to 25) are calibrated for
that. With Adam the step of a coordinate is about :math:`\eta` whatever its gradient, so a prox of
strength :math:`\eta\lambda_1` would be a different, much weaker regularizer. The default
``lam_schedule="constant"`` follows the authors (same strength at every step, during warm-up too);
``"lr"`` scales :math:`\lambda_1` by :math:`\eta_k / \eta_{\max}` (the schedule's shape, not its size), so
the shrinkage warms up and decays with the learning rate.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .patterns import Pattern, parse_pattern, topk_mask
from .prox import add_reg_frozen_grad_, prox_24_
from .methods import register
from .train import TrainConfig, TrainHooks, batch_for_step, checked_parameters, train

__all__ = ["ProxSparseHooks", "proxsparse", "group_is_24"]


def group_is_24(W: torch.Tensor) -> torch.Tensor:
    """Per group of four consecutive weights: True if at most two are non-zero."""
    return (W.reshape(-1, 4) != 0).sum(dim=1) <= 2


def _top2(W: torch.Tensor) -> torch.Tensor:
    return topk_mask(W.detach().abs(), parse_pattern("2:4"))


class ProxSparseHooks(TrainHooks):
    """The ProxSparse additions to the training loop: frozen-weight loss, 2:4 prox, mask metrics."""

    def __init__(self, lam1: float, lam2: float = 0.0, eps: float = 0.1, lam_schedule: str = "constant",
                 lr_max: float = 1.0):
        self.lam1, self.lam2, self.eps = float(lam1), float(lam2), float(eps)
        self.lam_schedule, self.lr_max = lam_schedule, float(lr_max)
        self.W0: dict[str, torch.Tensor] = {}
        self.last_mask: dict[str, torch.Tensor] = {}

    def setup(self, params: dict[str, nn.Parameter]) -> None:
        if self.lam2 > 0:
            self.W0 = {n: p.detach().clone() for n, p in params.items()}
        self.last_mask = {n: _top2(p) for n, p in params.items()}

    def before_step(self, step, params) -> None:
        # lam2 * grad Reg_W0 in closed form, one matrix at a time: the same gradient autograd would give for
        # the term added to the loss, without keeping a graph over every weight for the backward pass
        if self.lam2 <= 0:
            return
        for n, p in params.items():
            if p.grad is not None:
                add_reg_frozen_grad_(p.grad, p, self.W0[n], self.lam2, self.eps)

    def strength(self, lr: float) -> float:
        return self.lam1 if self.lam_schedule == "constant" else self.lam1 * lr / self.lr_max

    def after_step(self, step, params, lr, optimizer) -> None:
        lam = self.strength(lr)
        if lam > 0:
            for p in params.values():
                prox_24_(p, lam)

    def metrics(self, params) -> dict[str, float]:
        groups = is24 = changed = 0
        for n, p in params.items():
            mask = _top2(p)
            g = p.numel() // 4
            groups += g
            is24 += int(group_is_24(p.detach()).sum())
            changed += int((mask != self.last_mask[n]).reshape(-1, 4).any(dim=1).sum())
            self.last_mask[n] = mask
        return {"frac_24": is24 / groups, "mask_change": changed / groups}

    def state_dict(self) -> dict[str, Any]:
        return {"last_mask": self.last_mask}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_mask = dict(state["last_mask"])


@register("proxsparse", kind="end2end",
          description="learn 2:4 masks by proximal gradient on the model's loss (ProxSparse); 2:4 only")
def proxsparse(model: nn.Module | None, stream: torch.Tensor | None, pattern: Pattern | str = "2:4", *,
               lam1: float = 0.25, lam2: float = 0.0, lr: float = 1e-4, steps: int = 100, batch_size: int = 4,
               warmup: float = 0.1, lam_schedule: str = "constant", eps: float = 0.1, loss: str = "lm",
               grad_checkpointing: bool = False, clip: float = 1.0, log_every: int = 10,
               checkpoint_every: int = 0, checkpoint_dir: str | None = None,
               refit: bool = False, refit_samples: int = 128, refit_damp: float = 0.01,
               seqlen: int = 512, seed: int = 0, bos_id: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Learn a 2:4 mask of every prunable Linear of ``model`` end to end, and apply it to the original weights.

    ``stream``: 1-D token ids of the calibration text; each step draws ``batch_size`` windows of ``seqlen``
    tokens (seeded by ``seed`` and the step). ``lam1``: strength of the 2:4 prox (see the module docstring
    for ``lam_schedule``); ``lam2``: weight of the frozen-weight regularizer (0 in most of the paper's
    runs); ``lr``, ``warmup``: AdamW with linear warm-up over that fraction of the steps, then linear
    decay. The defaults follow the paper's Llama-2-7B setting (lam1 0.25, lam2 0, lr 1e-4, warm-up 0.1).

    ``loss``: ``"lm"`` (the paper's: the model's next-token loss on the calibration text) or ``"kd"``
    (not in the paper: KL divergence from the dense model's next-token distribution, which keeps a frozen
    dense copy of the model in memory; see :func:`minisparse.train.distillation_loss`). On a calibration
    text much smaller than the model, the next-token loss can be lowered by memorising the text; the dense
    model's distribution is a target that memorising does not reach.

    ``refit``: afterwards, re-fit the kept weights by least squares on ``refit_samples`` calibration
    windows, layer by layer (:func:`minisparse.engine.prune_with_masks`, ridge ``refit_damp``), the weight
    update SparseGPT makes; off by default, as in the paper, where ProxSparse only chooses the mask.

    Returns a dict with the training log (loss, fraction of groups already 2:4 and mask change per log
    line), the token budget and the fraction of groups that were exactly 2:4 before the final top-2.
    Called with ``model=None`` it only validates the options.
    """
    pat = parse_pattern(pattern)
    if pat.kind != "nm" or (pat.n, pat.m) != (2, 4):
        raise ValueError(f"ProxSparse learns 2:4 masks (its regularizer is defined on groups of four); "
                         f"got pattern {pat}; use --pattern 2:4")
    for name, val in (("lam1", lam1), ("lam2", lam2), ("eps", eps)):
        if not (float(val) >= 0 and math.isfinite(float(val))):
            raise ValueError(f"{name} must be a finite number >= 0; got {val!r}")
    if int(refit_samples) < 1:
        raise ValueError(f"refit_samples must be a positive number of calibration windows; got {refit_samples!r}")
    if not (float(refit_damp) >= 0 and math.isfinite(float(refit_damp))):
        raise ValueError(f"refit_damp must be a finite number >= 0 (a fraction of mean diag G); got {refit_damp!r}")
    if lam_schedule not in ("constant", "lr"):
        raise ValueError(f"lam_schedule must be 'constant' (the authors' choice) or 'lr'; got {lam_schedule!r}")
    cfg = TrainConfig(steps=int(steps), batch_size=int(batch_size), seqlen=int(seqlen), lr=float(lr),
                      warmup=float(warmup), clip=float(clip) if clip else None, seed=int(seed),
                      bos=bos_id is not None, grad_checkpointing=bool(grad_checkpointing), log_every=int(log_every),
                      checkpoint_every=int(checkpoint_every), checkpoint_dir=checkpoint_dir, loss=str(loss))
    cfg.check()
    if model is None:
        return {}
    params = checked_parameters(model, pat)
    original = {n: p.detach().clone() for n, p in params.items()}
    hooks = ProxSparseHooks(lam1, lam2, eps, lam_schedule, lr_max=float(lr))
    report = train(model, stream, cfg, hooks, params, bos_id=bos_id, progress=progress)
    exact = groups = 0
    masks = {}
    with torch.no_grad():
        for n, p in params.items():
            exact += int(group_is_24(p).sum())
            groups += p.numel() // 4
            masks[n] = _top2(p)
            # the original weights: under the mask (no -0.0, see engine), or whole for the re-fit to start from
            p.copy_(original[n] if refit else original[n] * masks[n] + 0.0)
    out = {"method": "proxsparse", "config": {**cfg.__dict__, "lam1": lam1, "lam2": lam2,
                                                "lam_schedule": lam_schedule, "eps": eps, "refit": bool(refit)},
           "log": report.log, "tokens": report.tokens, "train_seconds": report.seconds,
           "resumed_from": report.resumed_from, "learned_exact_24": exact / groups}
    if refit:
        from .engine import prune_with_masks

        # calibration windows drawn like a training batch, at a step index training never uses
        calib = batch_for_step(stream, cfg.steps, TrainConfig(batch_size=int(refit_samples), seqlen=cfg.seqlen,
                                                              seed=cfg.seed, bos=cfg.bos), bos_id)
        was = model.training
        model.eval()
        try:
            fit = prune_with_masks(model, calib, masks, reconstruct=True, damp=float(refit_damp), progress=progress)
        finally:
            model.train(was)
        out["refit"] = {"samples": int(refit_samples), "seqlen": cfg.seqlen, "damp": float(refit_damp),
                        "seconds": fit.total_seconds,
                        "mean_rel_error": sum(m["rel_error"] for m in fit.matrices) / len(fit.matrices)}
    return out
