"""AdamW with 8-bit moments (blockwise, companded), for ELSA-L's low-memory training state.

Each moment is stored as one byte per parameter plus one float32 scale per block of 256: the first
moment as ``q = round(127 · sign(m) · sqrt(|m| / a))`` (int8), the second as
``q = round(255 · (v / a)^(1/4))`` (uint8), ``a`` the block's absolute maximum. The companding (square root,
fourth root) spends the 8 bits where Adam's moments live, near zero, instead of uniformly. The update is
AdamW's, computed in float32 from the dequantized moments, which are quantized again after the step.
State: 2 bytes per parameter (+ 8 bytes per 256), against 8 bytes for float32 AdamW.

For an FSDP2-sharded parameter (a DTensor) the moments and their blocks belong to the rank's local
shard; the result equals the unsharded optimizer's when every shard starts at a multiple of 256 entries.
"""
from __future__ import annotations

import math

import torch

from .distributed import local

__all__ = ["AdamW8bit", "BLOCK"]

BLOCK = 256


def _blocks(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = t.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, BLOCK), pad


def quantize_signed(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, _ = _blocks(t)
    a = b.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    q = torch.round(127 * torch.sign(b) * torch.sqrt(b.abs() / a)).to(torch.int8)
    return q, a.squeeze(1)


def dequantize_signed(q: torch.Tensor, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    f = q.float() / 127
    out = (torch.sign(f) * f * f) * a.unsqueeze(1)
    return out.reshape(-1)[: like.numel()].reshape(like.shape)


def quantize_unsigned(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, _ = _blocks(t)
    a = b.amax(dim=1, keepdim=True).clamp_min(1e-30)
    q = torch.round(255 * (b.clamp_min(0) / a) ** 0.25).to(torch.uint8)
    return q, a.squeeze(1)


def dequantize_unsigned(q: torch.Tensor, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    f = q.float() / 255
    out = (f * f) * (f * f) * a.unsqueeze(1)
    return out.reshape(-1)[: like.numel()].reshape(like.shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose two moments are kept in 8 bits per parameter (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be positive; got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def second_moment(self, p: torch.Tensor) -> torch.Tensor | None:
        st = self.state.get(p)
        if not st:
            return None
        return dequantize_unsigned(st["v_q"], st["v_a"], local(p))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = local(p.grad).float()
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["m_q"], st["m_a"] = quantize_signed(torch.zeros_like(g))
                    st["v_q"], st["v_a"] = quantize_unsigned(torch.zeros_like(g))
                st["step"] += 1
                t = float(st["step"])
                m = dequantize_signed(st["m_q"], st["m_a"], g).mul_(b1).add_(g, alpha=1 - b1)
                v = dequantize_unsigned(st["v_q"], st["v_a"], g).mul_(b2).addcmul_(g, g, value=1 - b2)
                x = local(p)
                if group["weight_decay"]:
                    x.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                x.add_((m / (1 - b1 ** t) / denom).to(x.dtype), alpha=-group["lr"])
                st["m_q"], st["m_a"] = quantize_signed(m)
                st["v_q"], st["v_a"] = quantize_unsigned(v)
        return loss

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items() if k != "step")
