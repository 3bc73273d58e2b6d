"""End-to-end training on the model's own loss over calibration text: the loop ProxSparse and ADMM share.

One step: a batch of calibration windows (a pure function of the seed and the step number, so a resumed
run sees exactly the batches an uninterrupted one would), the causal-LM loss plus the method's extra
loss, backward, the method's gradient hook, gradient clipping, an AdamW step with linear warm-up and
linear decay, then the method's update after the step (a proximal operator, an ADMM projection).

Only the weights handed to :func:`train` are trained (by default the prunable Linear weights of the
decoder layers); embeddings, norms and the LM head stay frozen. For mask learning that is all that
matters: ProxSparse applies the learned mask to the *original* weights, and ADMM keeps state only for the
matrices it prunes; freezing the rest also halves the optimizer memory of a small model whose tied
embedding is a quarter of its parameters.

Long runs write a checkpoint (the trained weights, the optimizer and the method's state, the log) every
``checkpoint_every`` steps, atomically; calling :func:`train` again with the same configuration and
directory resumes from it and ends in the same state as an uninterrupted run.

With FSDP2-sharded weights (DTensors over a 1-D device mesh, see :mod:`minisparse.distributed`) every
rank draws the same global batch and trains on its ``batch_size / world`` rows; FSDP2 averages the
gradients, so a step is the single-process step. Checkpoints are then refused (no sharded resume).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ._progress import tqdm

from .distributed import all_finite, all_reduce_sum, shard_mesh

__all__ = ["TrainConfig", "TrainHooks", "TrainReport", "FixedMask", "HookWrapper", "train", "batch_for_step",
           "lr_at", "prunable_parameters", "checked_parameters"]


@dataclass
class TrainConfig:
    """Settings of an end-to-end run. ``steps * batch_size * seqlen`` tokens are seen in total."""

    steps: int = 100
    batch_size: int = 4
    seqlen: int = 256
    lr: float = 1e-4
    warmup: float = 0.1  # fraction of the steps with a linear warm-up; then linear decay to 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    clip: float | None = 1.0
    seed: int = 0
    bos: bool = False
    grad_checkpointing: bool = False
    log_every: int = 10
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    optimizer: str = "adamw"  # or "adamw8bit" (8-bit moments, minisparse.optim8)
    # "lm": the model's own next-token loss on the text; "kd": KL divergence from the next-token distribution of
    # the dense model (a frozen copy made before the first step) to the trained one's, per predicted token
    loss: str = "lm"

    def check(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("seqlen", 2), ("log_every", 1)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr!r}")
        if not (0.0 <= self.warmup < 1.0):
            raise ValueError(f"warmup is a fraction of the steps in [0, 1); got {self.warmup!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0; got {self.checkpoint_every}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"optimizer must be 'adamw' or 'adamw8bit'; got {self.optimizer!r}")
        if self.loss not in ("lm", "kd"):
            raise ValueError(f"loss must be 'lm' (the model's next-token loss) or 'kd' (distil the dense model's "
                             f"next-token distribution); got {self.loss!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir to write to")


class TrainHooks:
    """What a method adds to the loop. Every hook is optional; the default does plain fine-tuning."""

    def setup(self, params: dict[str, nn.Parameter]) -> None:
        """Called once before the first step (also when resuming, before the state is loaded)."""

    def extra_loss(self, params: dict[str, nn.Parameter]) -> torch.Tensor | None:
        """A differentiable term added to the loss (e.g. ProxSparse's frozen-weight regularizer)."""
        return None

    def before_step(self, step: int, params: dict[str, nn.Parameter]) -> None:
        """After backward, before clipping and the optimizer step: may edit ``.grad`` (ADMM's penalty)."""

    def after_step(self, step: int, params: dict[str, nn.Parameter], lr: float,
                   optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step, under no_grad (a prox, an ADMM projection and dual update)."""

    def metrics(self, params: dict[str, nn.Parameter]) -> dict[str, float]:
        """Extra numbers for the log line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class TrainReport:
    log: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every prunable Linear of every decoder layer, by qualified name."""
    from .models import decoder_layers, prunable_linears

    out: dict[str, nn.Parameter] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in prunable_linears(layer).items():
            out[f"layers.{i}.{name}"] = lin.weight
    return out


def checked_parameters(model: nn.Module, pattern) -> dict[str, nn.Parameter]:
    """:func:`prunable_parameters`, each checked to fit the pattern and to be finite."""
    params = prunable_parameters(model)
    for n, p in params.items():
        pattern.check_shape(tuple(p.shape))
        if not all_finite(p):
            raise ValueError(f"{n}: the weight contains NaN or inf; cannot prune a non-finite layer")
    return params


class HookWrapper(TrainHooks):
    """Hooks that pass everything to ``inner``; subclass it to add behaviour around a method's hooks."""

    def __init__(self, inner: TrainHooks):
        self.inner = inner

    def setup(self, params):
        self.inner.setup(params)

    def extra_loss(self, params):
        return self.inner.extra_loss(params)

    def before_step(self, step, params):
        self.inner.before_step(step, params)

    def after_step(self, step, params, lr, optimizer):
        self.inner.after_step(step, params, lr, optimizer)

    def metrics(self, params):
        return self.inner.metrics(params)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def batch_for_step(stream: torch.Tensor, step: int, cfg: TrainConfig, bos_id: int | None = None) -> torch.Tensor:
    """The (batch_size, seqlen) windows of step ``step``: random offsets from a generator seeded by
    (seed, step), so batch k is the same whether or not the run was interrupted before it."""
    body = cfg.seqlen - 1 if cfg.bos else cfg.seqlen
    if stream.numel() < body + 1:
        raise ValueError(f"the training text has {stream.numel()} tokens, too short for one window of {cfg.seqlen}")
    g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + int(step))
    offsets = torch.randint(0, stream.numel() - body + 1, (cfg.batch_size,), generator=g)
    rows = torch.stack([stream[o:o + body] for o in offsets.tolist()])
    if cfg.bos:
        if bos_id is None:
            raise ValueError("bos=True needs the tokenizer's BOS id")
        rows = torch.cat([torch.full((cfg.batch_size, 1), bos_id, dtype=rows.dtype), rows], dim=1)
    return rows


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``ceil(warmup * steps)`` steps, then linear decay to 0 at ``steps``."""
    warm = int(math.ceil(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def distillation_loss(logits: torch.Tensor, teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    r"""Mean over predicted tokens of :math:`\mathrm{KL}(p_{\text{teacher}} \| p_{\text{model}})`.

    ``logits``: the trained model's (batch, seqlen, vocab) logits on ``batch``; the teacher runs without
    gradients on the same tokens. The positions are those the next-token loss uses (all but the last).
    """
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
    s_logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.nn.functional.kl_div(s_logp.reshape(-1, s_logp.shape[-1]), t_logp.reshape(-1, t_logp.shape[-1]),
                                      log_target=True, reduction="batchmean")


_CKPT = "train_state.pt"
_SAME = ("steps", "batch_size", "seqlen", "lr", "warmup", "betas", "weight_decay", "clip", "seed", "bos", "optimizer",
         "loss")


def _save(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path / _CKPT)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def train(model: nn.Module, stream: torch.Tensor, cfg: TrainConfig, hooks: TrainHooks | None = None,
          params: dict[str, nn.Parameter] | None = None, *, bos_id: int | None = None,
          progress: bool = True) -> TrainReport:
    """Train ``params`` (default: :func:`prunable_parameters`) of ``model`` on windows of ``stream``.

    ``stream`` is a 1-D tensor of token ids (the calibration half of a text). Returns the log: per
    ``log_every`` steps the mean loss since the last log, the learning rate, tokens seen, seconds and the
    method's metrics. With ``checkpoint_every`` and ``checkpoint_dir``, resumes from the directory's
    checkpoint if there is one (the configuration must match).
    """
    cfg.check()
    hooks = hooks or TrainHooks()
    params = prunable_parameters(model) if params is None else params
    if not params:
        raise ValueError("nothing to train: the parameter dict is empty")
    stream = stream.reshape(-1)
    mesh = shard_mesh(params)
    rank, world = (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} ranks sharing each step; "
                         f"use a multiple of {world}")
    if mesh is not None and (cfg.checkpoint_every or cfg.checkpoint_dir):
        raise ValueError("checkpoints (and resume) are not supported with FSDP2-sharded parameters; "
                         "set checkpoint_every=0 and checkpoint_dir=None")
    flags = {p: p.requires_grad for p in model.parameters()}
    trained = set(id(p) for p in params.values())
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    was_training = model.training
    model.train()
    if cfg.grad_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError("this model does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.optimizer == "adamw8bit":
        from .optim8 import AdamW8bit

        opt = AdamW8bit(list(params.values()), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    teacher = None
    if cfg.loss == "kd":
        if mesh is not None:
            raise ValueError("loss='kd' keeps a dense copy of the model and is not supported with FSDP2-sharded "
                             "parameters; use loss='lm'")
        # the dense model, copied before any step (and before a checkpoint is loaded, so that a resumed run
        # distils the same teacher): a second copy of the weights in memory
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    hooks.setup(params)
    report = TrainReport()
    start = 0
    ckpt_dir = Path(cfg.checkpoint_dir).expanduser() if cfg.checkpoint_dir else None
    if ckpt_dir is not None and (ckpt_dir / _CKPT).exists():
        state = torch.load(ckpt_dir / _CKPT, map_location="cpu", weights_only=True)
        saved = {"optimizer": "adamw", "loss": "lm", **state["config"]}
        diff = [k for k in _SAME if (tuple(saved[k]) if k == "betas" else saved[k]) != (tuple(getattr(cfg, k)) if k == "betas" else getattr(cfg, k))]
        if diff:
            raise ValueError(f"the checkpoint in {ckpt_dir} was written with a different configuration "
                             f"({', '.join(diff)}); use a new checkpoint_dir or the same settings")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        opt.load_state_dict(state["optimizer"])
        hooks.load_state_dict(state["hooks"])
        report.log = list(state["log"])
        start = report.resumed_from = int(state["step"])
        loss_carry = state.get("loss_carry", (0.0, 0))
        # training time before the checkpoint, so that a resumed run reports its whole time (checkpoints
        # written before this was saved: the time of the last log line, at most one log interval short)
        elapsed = float(state.get("seconds", report.log[-1]["seconds"] if report.log else 0.0))
    else:
        loss_carry, elapsed = (0.0, 0), 0.0
    device = next(iter(params.values())).device
    tokens_per_step = cfg.batch_size * cfg.seqlen
    t0 = time.perf_counter() - elapsed
    loss_sum, loss_n = float(loss_carry[0]), int(loss_carry[1])
    bar = tqdm(range(start, cfg.steps), desc="train", unit="step", disable=not progress, initial=start,
               total=cfg.steps)
    try:
        for step in bar:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = batch_for_step(stream, step, cfg, bos_id)
            if world > 1:  # this rank's rows of the global batch
                per = cfg.batch_size // world
                batch = batch[rank * per:(rank + 1) * per]
            batch = batch.to(device)
            if teacher is None:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            else:
                loss = distillation_loss(model(input_ids=batch, use_cache=False).logits, teacher, batch)
            extra = hooks.extra_loss(params)
            total = loss if extra is None else loss + extra
            loss_val = None
            if mesh is not None:  # the mean over ranks, so that every rank sees (and stops on) the same loss
                loss_val, total_val = (v / world for v in all_reduce_sum((loss.detach(), total.detach()), mesh))
                if not math.isfinite(total_val):
                    raise FloatingPointError(f"step {step}: the loss is {total_val}; lower the learning rate")
            elif not torch.isfinite(total):
                raise FloatingPointError(f"step {step}: the loss is {float(total)}; lower the learning rate")
            total.backward()
            hooks.before_step(step, params)
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                hooks.after_step(step, params, lr, opt)
            loss_sum += float(loss.detach()) if loss_val is None else loss_val
            loss_n += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = {"step": done, "loss": loss_sum / loss_n, "lr": lr, "tokens": done * tokens_per_step,
                       "seconds": time.perf_counter() - t0, **hooks.metrics(params)}
                report.log.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                loss_sum, loss_n = 0.0, 0
            if ckpt_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save(ckpt_dir, {"step": done, "config": asdict(cfg), "log": report.log,
                                 "params": {n: p.detach().cpu() for n, p in params.items()},
                                 "optimizer": opt.state_dict(), "hooks": hooks.state_dict(),
                                 "loss_carry": (loss_sum, loss_n), "seconds": time.perf_counter() - t0})
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    report.steps = cfg.steps
    report.tokens = cfg.steps * tokens_per_step
    report.seconds = time.perf_counter() - t0
    return report


class FixedMask(TrainHooks):
    """Fine-tune the kept weights with the mask fixed (the "prune, then fine-tune" baseline).

    The mask is read from the weights at setup (zeros are pruned); gradients of pruned weights are
    zeroed before the step and the weights re-masked after it, so AdamW's weight decay or momentum
    cannot revive them.
    """

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}

    def setup(self, params: dict[str, nn.Parameter]) -> None:
        self.masks = {n: p.detach() != 0 for n, p in params.items()}

    def before_step(self, step: int, params: dict[str, nn.Parameter]) -> None:
        for n, p in params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    def after_step(self, step, params, lr, optimizer) -> None:
        for n, p in params.items():
            p.mul_(self.masks[n])

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state["masks"])
