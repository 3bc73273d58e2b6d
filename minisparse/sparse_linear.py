"""Run a pruned model with sparse kernels: a Linear whose weight is stored sparse.

``SparseLinear.from_linear(linear, kind)`` keeps the pruned weight as torch's CSR (``kind="csr"``, any
device) or, on CUDA, as torch's semi-structured 2:4 tensor (``kind="2:4"``, cuSPARSELt/CUTLASS, fp16/bf16).
``sparsify_model(model, kind)`` swaps every Linear of every decoder layer. The output equals the dense
pruned layer's up to floating-point summation order; whether it is *faster* is a measurement
(``benchmarks/speed.py``), not a promise.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .models import decoder_layers

__all__ = ["SparseLinear", "sparsify_model", "sparse_bytes"]

KINDS = ("csr", "2:4")


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W stored sparse."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str = "csr"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if weight.dim() != 2:
            raise ValueError(f"a Linear weight is 2-D (out, in); got shape {tuple(weight.shape)}")
        self.kind, self.in_features, self.out_features = kind, weight.shape[1], weight.shape[0]
        w = weight.detach()
        if kind == "2:4":
            if w.device.type != "cuda":
                raise ValueError("kind='2:4' uses torch.sparse.to_sparse_semi_structured, which needs a CUDA "
                                 "tensor (fp16/bf16); use kind='csr' on a CPU")
            self.weight = torch.sparse.to_sparse_semi_structured(w)
        else:
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": known, not the user's concern
                warnings.simplefilter("ignore", UserWarning)
                self.weight = w.to_sparse_csr()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "csr") -> "SparseLinear":
        return cls(linear.weight, linear.bias, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kind == "2:4":
            y = torch.mm(self.weight, x2.t()).t()
        else:
            y = torch.sparse.mm(self.weight, x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def sparsify_model(model: nn.Module, kind: str = "csr") -> int:
    """Replace every Linear of every decoder layer by a SparseLinear, in place; returns how many."""
    count = 0
    for layer in decoder_layers(model):
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear):
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], SparseLinear.from_linear(module, kind))
                count += 1
    return count


def sparse_bytes(weight: torch.Tensor) -> dict[str, int]:
    """Bytes of a weight stored dense and as CSR (values + column indices + row pointers, int64 as torch stores them)."""
    nnz = int((weight != 0).sum())
    return {"dense": weight.numel() * weight.element_size(),
            "csr": nnz * (weight.element_size() + 8) + (weight.shape[0] + 1) * 8, "nnz": nnz}
