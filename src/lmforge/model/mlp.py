"""Feed-forward blocks: SwiGLU (Shazeer 2020; Llama) and the two-layer GELU MLP (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config


def activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu_new":  # tanh approximation used by GPT-2
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r} (silu, gelu, gelu_new are known)")


class _SiluGate(torch.autograd.Function):
    """silu(gate) * up that keeps only `gate` and `up` for backward (autograd would also keep silu(gate),
    one more (B, T, F) tensor per layer) and recomputes silu(gate) there:
        d/d up   = grad * silu(gate)
        d/d gate = grad * up * silu'(gate),   silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class MLP(nn.Module):
    """swiglu: down(act(gate(x)) * up(x));  gelu: down(act(up(x))).  (B, T, D) -> (B, T, D)"""

    def __init__(self, config: Config):
        super().__init__()
        d, f, bias = config.n_embd, config.intermediate_size, config.mlp_bias
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act = activation(config.activation)
        self.dropout = nn.Dropout(config.resid_dropout) if config.resid_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, D), computed as (B T, D) rows: see lmforge.model.norms
        x = x.reshape(-1, shape[-1])
        if self.gated and self.act is F.silu and torch.is_grad_enabled():
            h = _SiluGate.apply(self.gate_proj(x), self.up_proj(x))  # (B T, F), lean on memory
        elif self.gated:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)  # (B T, F)
        else:
            h = self.act(self.up_proj(x))
        out = self.dropout(self.down_proj(h))  # (B T, D)
        return out.view(*shape[:-1], out.shape[-1])
