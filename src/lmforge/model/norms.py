"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (Llama family).

Both normalise a (..., D) input as a matrix of rows (N, D) and view the result back. The values are the
same; the reason is compiled batch-1 decoding: inductor gives the size-1 dimension of a (1, 1, D)
activation viewed as (1, D) a stride of 0, and at::mm copies such an input before every matrix product.
A norm whose output is already (N, D) hands the q/k/v and gate/up products a plain row (docs/decisions.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 as HF Llama does, then cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, D): see the module docstring
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            y = F.rms_norm(rows, self.weight.shape, self.weight, self.eps)  # one fused kernel, same formula
        else:
            r32 = rows.float()
            r32 = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + self.eps)
            y = self.weight * r32.to(x.dtype)
        return y.view(x.shape)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm over (N, D) rows (see the module docstring); same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return LayerNorm(dim, eps=eps)
