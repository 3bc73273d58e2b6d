r"""ADMM on the true loss (ELSA; Lee et al.), as hooks around any torch optimizer, and its low-precision
variant ELSA-L.

For :math:`\min_x f(x)` subject to :math:`x \in S` (a sparsity pattern per weight matrix) ADMM keeps a
feasible copy :math:`z \in S`, a scaled dual :math:`u` and a penalty :math:`\lambda`, and alternates

- x-update: optimizer steps on :math:`f(x) + \tfrac{\lambda}{2}\|x - z + u\|^2`, i.e. the gradient gets
  :math:`\lambda (x - z + u)` added before the step (:meth:`ADMM.before_step`; ``penalty="gradient"``, as
  ELSA does), or, with ``penalty="decoupled"``, the optimizer steps on :math:`f` alone and every step is
  followed by the exact proximal step of the penalty with step :math:`\gamma = \eta_t\lambda` (the current
  learning rate times lam, as AdamW decouples weight decay):
  :math:`x \leftarrow (x + \gamma (z - u)) / (1 + \gamma)`. An adaptive optimizer normalises whatever
  is in the gradient, so in the gradient form a weight moves at most about :math:`\eta` per step whatever
  :math:`\lambda` is, and a pruned weight of size :math:`w` needs about :math:`w/\eta` steps to reach
  zero; the decoupled step shrinks it geometrically, which is what a short (CPU) token budget needs;
- every ``interval`` steps: :math:`z \leftarrow \Pi_S(x + u)`, :math:`u \leftarrow u + x - z`
  (:meth:`ADMM.after_step`); when :math:`\lambda` changes, :math:`u` is rescaled by
  :math:`\lambda_\text{old}/\lambda_\text{new}` so the unscaled dual :math:`\lambda u` is unchanged.

:math:`z_0 = \Pi_S(x_0)` (magnitude projection of the dense weights), :math:`u_0 = 0`, and the final
model is :math:`\Pi_S(x)`. The projection keeps, per pattern group, the largest scores: ``|v|``
(magnitude, the Euclidean projection) or, objective-aware, ``h ⊙ v²`` with ``h`` the optimizer's
second moment (Adam's ``exp_avg_sq``: a diagonal empirical Fisher), as ELSA does.

ELSA-L stores :math:`z` in FP8 (e4m3, one scale per tensor) and :math:`u` in BF16; with the 8-bit
optimizer of :mod:`minisparse.optim8` the whole state shrinks (see :func:`state_bytes`). By default it
also keeps z's FP8 rounding error in u's slots on the kept entries, where the dual is exactly 0
(``error_feedback``), so that the x-update's target stays exact: without it the kept weights end on
the FP8 grid (on SmolLM2-135M at 80%: 338.6 perplexity against ELSA's 229.6; with it 230.5).

With FSDP2-sharded parameters (DTensors) z and u hold each rank's local shard, and the few global
quantities (an unstructured top-k, the FP8 scale, the residuals) go through :mod:`minisparse.distributed`.

The class knows nothing about language models: the book drives a toy network with it in a ten-line
loop, and :func:`elsa` drives the LLM through :func:`minisparse.train.train`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .distributed import all_reduce_sum, global_amax, local, shard_mesh, sharded_topk_mask
from .methods import register
from .patterns import Pattern, parse_pattern, topk_mask
from .train import TrainConfig, TrainHooks, checked_parameters, train

__all__ = ["ADMM", "elsa", "penalty_at", "state_bytes", "FP8"]

FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0


def _to_fp8(t: torch.Tensor, mesh=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 tensor, float32 scale) with one scale per tensor (over all shards when ``mesh`` is
    given): t ≈ q.float() * scale."""
    amax = global_amax(t, mesh)
    scale = amax / _FP8_MAX if float(amax) > 0 else torch.ones((), dtype=torch.float32, device=t.device)
    return (t.float() / scale).to(FP8), scale


def penalty_at(step: int, lam: float, schedule: str, steps: int, lam_final: float | None) -> float:
    """ADMM penalty at a step: ``constant``, or ``increasing`` geometrically from lam to lam_final."""
    if schedule == "constant":
        return lam
    final = lam_final if lam_final is not None else 100.0 * lam
    frac = min(1.0, step / max(1, steps))
    return lam * (final / lam) ** frac


class ADMM(TrainHooks):
    """ADMM state and updates for a dict of weight tensors; see the module docstring.

    ``pattern``: the constraint set S (unstructured is per matrix). ``lam``: penalty; ``interval``: optimizer
    steps between z/u updates; ``projection``: ``"magnitude"`` or ``"fisher"``; ``schedule``:
    ``"constant"`` or ``"increasing"`` (geometric from ``lam`` to ``lam_final`` over ``steps``);
    ``low_precision``: ELSA-L's FP8 z and BF16 u; ``penalty``: ``"gradient"`` (ELSA's form: added to the
    gradient before the optimizer step) or ``"decoupled"`` (the penalty's proximal step after it, with step
    lr x lam; lam is then per unit learning rate, like AdamW's weight decay, so sensible values are ~10-1000).
    ``error_feedback`` (low precision only, and its default; ``False`` gives the plain variant): after
    every z-update the dual is exactly 0 on the kept entries (z = x + u there), so u's BF16 slots on those
    entries are free; they store the FP8 rounding error ẑ - z instead. The x-update's target ẑ - u is then the exact z - u (up to BF16 rounding of a
    small error), so the kept weights are not pulled onto the FP8 grid, and the next z-update recovers
    the true dual as u on the entries where ẑ = 0 and 0 elsewhere. Same bytes as plain ELSA-L.
    """

    def __init__(self, pattern: Pattern | str, sparsity: float | None = None, *, lam: float = 0.01,
                 interval: int = 32, projection: str = "magnitude", schedule: str = "constant",
                 steps: int = 1, lam_final: float | None = None, low_precision: bool = False,
                 penalty: str = "gradient", error_feedback: bool | None = None):
        self.pattern = parse_pattern(pattern, sparsity)
        if penalty not in ("gradient", "decoupled"):
            raise ValueError(f"penalty must be 'gradient' (added to the gradient, as ELSA does) or 'decoupled' "
                             f"(a proximal step of lr x lam after the optimizer step); got {penalty!r}")
        self.penalty = penalty
        if not (lam > 0 and math.isfinite(lam)):
            raise ValueError(f"the ADMM penalty lam must be a positive number; got {lam!r}")
        if int(interval) < 1:
            raise ValueError(f"interval must be a positive integer; got {interval!r}")
        if projection not in ("magnitude", "fisher"):
            raise ValueError(f"projection must be 'magnitude' or 'fisher'; got {projection!r}")
        if schedule not in ("constant", "increasing"):
            raise ValueError(f"schedule must be 'constant' or 'increasing'; got {schedule!r}")
        self.lam0, self.lam, self.interval = float(lam), float(lam), int(interval)
        self.projection, self.schedule, self.steps, self.lam_final = projection, schedule, int(steps), lam_final
        self.low_precision = bool(low_precision)
        if error_feedback is None:  # on by default wherever z is stored in FP8
            error_feedback = self.low_precision
        if error_feedback and not self.low_precision:
            raise ValueError("error_feedback corrects the FP8 rounding of z: it needs low_precision=True (ELSA-L)")
        self.error_feedback = bool(error_feedback)
        self.z: dict[str, torch.Tensor] = {}
        self.z_scale: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.mesh = None  # the device mesh of FSDP2-sharded parameters, set by setup

    # -- state in (possibly) low precision ---------------------------------------------------------
    def _get_z(self, n: str) -> torch.Tensor:
        z = self.z[n]
        return z.float() * self.z_scale[n] if z.dtype == FP8 else z

    def _set_z(self, n: str, value: torch.Tensor) -> None:
        if self.low_precision:
            self.z[n], self.z_scale[n] = _to_fp8(value, self.mesh)
        else:
            self.z[n] = value.detach().clone()

    def _get_u(self, n: str) -> torch.Tensor:
        u = self.u[n]
        return u.float() if u.dtype == torch.bfloat16 else u

    def _set_u(self, n: str, value: torch.Tensor) -> None:
        self.u[n] = value.to(torch.bfloat16) if self.low_precision else value.detach().clone()

    def _store(self, n: str, z: torch.Tensor, u: torch.Tensor) -> None:
        """Store a new z and u (u is 0 wherever z is kept); with error feedback, u's slots on the kept
        entries take z's rounding error, so that the stored ẑ - u is the exact z - u."""
        self._set_z(n, z)
        if self.error_feedback:
            u = u + (self._get_z(n).to(u.dtype) - z.to(u.dtype))
        self._set_u(n, u)

    # -- the projection ----------------------------------------------------------------------------
    def _second_moment(self, p: nn.Parameter) -> torch.Tensor | None:
        if self.optimizer is None:
            return None
        state = self.optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            return local(state["exp_avg_sq"])
        if hasattr(self.optimizer, "second_moment"):
            return self.optimizer.second_moment(p)
        return None

    def project(self, v: torch.Tensor, p: nn.Parameter | None = None, *,
                layout: torch.Tensor | None = None) -> torch.Tensor:
        """Π_S(v): keep the largest |v| (or h·v² for the Fisher projection, given the parameter ``p``)
        allowed by the pattern. For a sharded parameter ``v`` is the local shard of ``layout`` (default
        ``p``), and so is the result."""
        score = v.abs()
        if self.projection == "fisher" and p is not None:
            h = self._second_moment(p)
            if h is not None:
                score = h.float() * v.float() ** 2
        if layout is None:
            layout = p
        if self.mesh is None or layout is None:
            return v * topk_mask(score, self.pattern)
        return v * sharded_topk_mask(score, self.pattern, layout)

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, params: dict[str, nn.Parameter]) -> None:
        self.mesh = shard_mesh(params)
        for n, p in params.items():
            self.pattern.check_shape(tuple(p.shape))
            with torch.no_grad():
                x = local(p.detach())
                # z0 = magnitude projection of the dense weights, u0 = 0
                self._store(n, self.project(x, None, layout=p),
                            torch.zeros_like(x, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32))

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the projection access to the optimizer's second moments (the Fisher projection)."""
        self.optimizer = optimizer

    def penalty_grad(self, n: str, p: torch.Tensor) -> torch.Tensor:
        return self.lam * (local(p.detach()) - self._get_z(n) + self._get_u(n))

    def before_step(self, step: int, params: dict[str, nn.Parameter]) -> None:
        if self.penalty == "decoupled":
            return
        for n, p in params.items():
            pen = self.penalty_grad(n, p)
            if self.mesh is not None:  # a DTensor gradient: add to this rank's shard
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local(p.grad).add_(pen.to(p.grad.dtype))
            elif p.grad is None:
                p.grad = pen.to(p.dtype)
            else:
                p.grad.add_(pen.to(p.grad.dtype))

    def after_step(self, step: int, params: dict[str, nn.Parameter], lr: float = 0.0,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
        if optimizer is not None:
            self.optimizer = optimizer
        if self.penalty == "decoupled" and lr > 0:
            gamma = lr * self.lam
            for n, p in params.items():
                x = local(p.detach())
                target = (self._get_z(n) - self._get_u(n)).to(x.dtype)
                x.add_(target, alpha=gamma).div_(1.0 + gamma)
        if (step + 1) % self.interval:
            return
        new_lam = penalty_at(step + 1, self.lam0, self.schedule, self.steps, self.lam_final)
        primal = dual = norm = 0.0
        for n, p in params.items():
            x = local(p.detach())
            x = x if x.dtype in (torch.float32, torch.float64) else x.float()
            u = self._get_u(n).to(x.dtype)
            z_old = self._get_z(n)
            if self.error_feedback:  # kept entries hold z's rounding error; their dual is 0
                u = u.masked_fill(z_old != 0, 0.0)
            if new_lam != self.lam:
                u = u * (self.lam / new_lam)
            z = self.project(x + u, p)
            u = u + x - z  # exactly 0 where z keeps x + u
            self._store(n, z, u)
            primal += float(((x - z) ** 2).sum())
            dual += float(((z - z_old) ** 2).sum())
            norm += float((x ** 2).sum())
        if self.mesh is not None:
            primal, dual, norm = all_reduce_sum((primal, dual, norm), self.mesh)
        self.lam = new_lam
        self.last = {"primal_residual": math.sqrt(primal / max(norm, 1e-30)),
                     "dual_residual": new_lam * math.sqrt(dual / max(norm, 1e-30)), "lam": new_lam}

    def metrics(self, params: dict[str, nn.Parameter]) -> dict[str, float]:
        outside = norm = 0.0
        for p in params.values():
            x = local(p.detach()).float()
            outside += float(((x - self.project(x, layout=p)) ** 2).sum())
            norm += float((x ** 2).sum())
        if self.mesh is not None:
            outside, norm = all_reduce_sum((outside, norm), self.mesh)
        return {**self.last, "mass_outside": outside / max(norm, 1e-30)}

    def finalize(self, params: dict[str, nn.Parameter]) -> None:
        """x ← Π_S(x): the final, feasible model."""
        with torch.no_grad():
            for p in params.values():
                x = local(p.detach())
                local(p).copy_(self.project(x, p) + 0.0)  # no -0.0 (see engine)

    def state_dict(self) -> dict[str, Any]:
        return {"z": self.z, "z_scale": self.z_scale, "u": self.u, "lam": self.lam, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.z, self.z_scale, self.u = dict(state["z"]), dict(state["z_scale"]), dict(state["u"])
        self.lam, self.last = float(state["lam"]), dict(state["last"])

    def bytes_per_param(self) -> float:
        """Measured bytes of z and u (and z's scale) per parameter."""
        total = sum(t.numel() * t.element_size() for d in (self.z, self.u, self.z_scale) for t in d.values())
        count = sum(t.numel() for t in self.u.values())
        return total / max(1, count)


def state_bytes(low_precision: bool, optimizer_bits: int = 32, weight_bytes: int = 4, grad_bytes: int = 4) -> dict:
    """Bytes per trained parameter of the whole training state: weight, gradient, two Adam moments, z, u."""
    moments = 2 * (4 if optimizer_bits == 32 else 1)
    z, u = (1, 2) if low_precision else (4, 4)
    parts = {"weight": weight_bytes, "grad": grad_bytes, "adam_moments": moments, "z": z, "u": u}
    parts["total"] = sum(parts.values())
    return parts


@register("elsa", kind="end2end",
          description="ADMM on the model's loss with a sparsity projection (ELSA; low_precision=true: ELSA-L)")
def elsa(model: nn.Module | None, stream: torch.Tensor | None, pattern: Pattern | str, *, lam: float = 0.01,
         interval: int = 32, projection: str = "fisher", schedule: str = "constant", lam_final: float | None = None,
         low_precision: bool = False, penalty: str = "gradient", error_feedback: bool | None = None,
         optimizer: str = "adamw", lr: float = 2e-4,
         steps: int = 256,
         batch_size: int = 2, warmup: float = 0.0, clip: float = 1.0, grad_checkpointing: bool = False,
         log_every: int = 8, checkpoint_every: int = 0, checkpoint_dir: str | None = None,
         seqlen: int = 512, seed: int = 0, bos_id: int | None = None, progress: bool = True) -> dict[str, Any]:
    """ELSA / ELSA-L on every prunable Linear of ``model``; the final weights are Π_S(x).

    Defaults follow the released recipe where it fits a CPU (lr 2e-4, lam 0.01 constant, interval 32,
    Adam betas (0.9, 0.95), clipping 1.0, Fisher projection, the penalty in the gradient);
    ``penalty="decoupled"`` takes the penalty's proximal step after each optimizer step instead (see
    :class:`ADMM`; lam is then per unit learning rate); ``steps`` and ``batch_size`` set the token
    budget (steps x batch_size x seqlen). ``optimizer="adamw8bit"`` uses 8-bit moments. Called with
    ``model=None`` it only validates the options.

    Inside a process group, with the model sharded by FSDP2 (:func:`minisparse.distributed.shard_model`),
    every rank calls it with the same arguments and trains on ``batch_size / world`` windows of each
    step's batch; the result equals a single-process run. Checkpoints are not supported there.
    """
    pat = parse_pattern(pattern)
    if optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(f"optimizer must be 'adamw' or 'adamw8bit'; got {optimizer!r}")
    cfg = TrainConfig(steps=int(steps), batch_size=int(batch_size), seqlen=int(seqlen), lr=float(lr),
                      warmup=float(warmup), betas=(0.9, 0.95), clip=float(clip) if clip else None, seed=int(seed),
                      bos=bos_id is not None, grad_checkpointing=bool(grad_checkpointing), log_every=int(log_every),
                      checkpoint_every=int(checkpoint_every), checkpoint_dir=checkpoint_dir, optimizer=optimizer)
    cfg.check()
    hooks = ADMM(pat, lam=lam, interval=interval, projection=projection, schedule=schedule, steps=cfg.steps,
                 lam_final=lam_final, low_precision=low_precision, penalty=penalty,
                 error_feedback=error_feedback)
    if model is None:
        return {}
    params = checked_parameters(model, pat)
    report = train(model, stream, cfg, hooks, params, bos_id=bos_id, progress=progress)
    hooks.finalize(params)
    return {"method": "elsa", "config": {**cfg.__dict__, "lam": lam, "interval": interval, "projection": projection,
                                           "schedule": schedule, "low_precision": low_precision,
                                           "penalty": penalty, "error_feedback": hooks.error_feedback},
            "log": report.log, "tokens": report.tokens, "train_seconds": report.seconds,
            "resumed_from": report.resumed_from, "admm_state_bytes_per_param": hooks.bytes_per_param(),
            "state_bytes_model": state_bytes(low_precision, 8 if optimizer == "adamw8bit" else 32)}
