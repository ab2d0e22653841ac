"""A frozen base in low precision for LoRA (QLoRA-style): int8 on any device, NF4 through bitsandbytes on GPU.

    int8, per output row (absmax):  scale_i = max_j |W_ij| / 127,   q_ij = round(W_ij / scale_i)
                                    W x  ~=  (q x) * scale

Weights become buffers (never trained); the adapters wrapped around them train in float. The matmul
dequantizes one layer at a time and does not keep the float weight for backward (it is rebuilt there), so
the saved activations, not a float copy of the weights, are what backward holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.finetune.lora import LoraLinear, set_submodule, target_names


class _Int8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scale, dtype):
        ctx.save_for_backward(qweight, scale)
        ctx.dtype = dtype
        return F.linear(x, (qweight.to(dtype) * scale[:, None].to(dtype)))

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        weight = qweight.to(ctx.dtype) * scale[:, None].to(ctx.dtype)  # rebuilt, not stored
        return grad @ weight.to(grad.dtype), None, None, None


class Int8Linear(nn.Module):
    """A frozen linear layer stored as int8 with one float scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.compute_dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        layer.qweight.copy_(torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.compute_dtype) * self.scale[:, None].to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8Matmul.apply(x, self.qweight, self.scale, x.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    """bitsandbytes Linear4bit (NF4, bf16 compute) holding `linear`'s weights; needs CUDA."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(
            "4-bit NF4 needs the bitsandbytes package and a CUDA GPU (pip install bitsandbytes)"
        ) from None
    if not torch.cuda.is_available():
        raise ValueError("4-bit NF4 (bitsandbytes) needs a CUDA GPU; use bits=8 on CPU")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
    return layer.cuda()


def quantize_base(model: nn.Module, bits: int = 8, targets: list[str] | str = "all-linear") -> nn.Module:
    """Replace the targeted linear layers (default: all but the output head) by frozen int8 (`bits=8`) or
    NF4 (`bits=4`, bitsandbytes, CUDA) layers, in place. Call before `add_lora`."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 (int8, any device) or 4 (NF4, bitsandbytes on CUDA), got {bits}")
    for name in target_names(model, targets):
        layer = model.get_submodule(name)
        if isinstance(layer, LoraLinear):
            raise ValueError("quantize the base before adding adapters")
        if not isinstance(layer, nn.Linear):
            continue
        set_submodule(model, name, Int8Linear.from_linear(layer) if bits == 8 else _nf4_linear(layer))
    return model
