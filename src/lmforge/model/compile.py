"""Settings for the code lmforge hands to torch.compile (the decode step, the training step), and the
weight layouts decoding reads fastest.

On CPU, inductor's C++ wrapper (`cpp_wrapper`) launches the compiled kernels and the matmul calls from
generated C++ instead of a Python function, which removes ~10 us of interpreter work per kernel:
measured on a 2-core CPU (docs/benchmarks.md), a SmolLM2-135M batch-1 decode step went from 25.5 to
23.2 ms and a 6.5 M-parameter Llama training step got ~4% faster. The price is a longer first
compilation (~40 s instead of ~5 s for the decode step); inductor caches the result on disk, so later
processes start in seconds. Elsewhere the defaults are kept.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.attention import Attention


def compile_options(device: torch.device | str) -> dict:
    """Options for torch.compile(..., options=...) of a function running on `device`."""
    return {"cpp_wrapper": True} if torch.device(device).type == "cpu" else {}


def wide_weights_column_major(model: nn.Module) -> int:
    """Store the weight of every plain CPU nn.Linear with more outputs than inputs column-major.

    Decoding one token is a matrix-vector product per weight, bound by how fast the weights stream from
    memory. For a weight W (out, in) stored as its transpose (in, out), y = x W^T reads W as x @ (in, out)
    and MKL streams it faster when `out` is the wide side: measured on a 2-core Xeon (docs/benchmarks.md),
    SmolLM2-135M's LM head (49152 x 576) went from 26.3 to 30.2 GB/s and its gate/up projections
    (1536 x 576) from 25.9 to 27.6 GB/s, while narrow weights (k/v 192 x 576, down 576 x 1536) read faster
    row-major and stay so. The values, shapes and parameter objects (so tied weights) are unchanged; only
    the strides are: `weight.t()` becomes contiguous. Returns how many weights moved.
    """
    moved = 0
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even under inference mode
        for module in model.modules():
            if type(module) is not nn.Linear:  # not quantized or otherwise specialised linears
                continue
            w = module.weight
            if type(w) is not nn.Parameter or w.device.type != "cpu" or not w.is_floating_point():
                continue
            if w.untyped_storage().nbytes() != w.numel() * w.element_size():
                continue  # a view into a larger block (fuse_qkv): that block's layout decides
            if module.out_features <= module.in_features or w.stride() == (1, module.out_features):
                continue
            w.data = w.data.t().contiguous().t()  # same values and shape; (in, out) in memory
            moved += 1
    return moved


def fuse_qkv(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Lay each attention layer's q, k and v projection weights (and biases) out as one block and return,
    per layer, (W, bias) views of the blocks, or None for a layer that cannot be fused; generation passes
    them to the model (`qkv=`) to compute q, k and v with one matrix product instead of three.

    The block is W = [W_q; W_k; W_v], ((H + 2G) hd, D), contiguous, and each projection's parameter is its
    row block: a dense, contiguous tensor of the same shape and values, so training, saving, optimizers and
    adapters see nothing different, and nothing but the parameters holds the memory. Measured on a 2-core
    Xeon (docs/decisions.md): a SmolLM2-135M batch-1 decode step ~0.8 ms (~3%) faster compiled and ~1.2 ms
    (~3%) eager, from fewer matrix-vector calls and less serial work between them. The block is row-major:
    column-major would make each projection a strided, non-dense view, which torch's fused AdamW walks as
    flat memory. Projections that are not plain nn.Linear (LoRA, quantized) or hold a tensor subclass
    (FSDP's DTensor shards) are left alone. The weights are copied only the first time, or when they were
    replaced since (a `.data` assignment, `model.to(...)`); the views returned are valid until the model
    changes, so call it again for every generation.
    """
    blocks: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
    with torch.inference_mode(False), torch.no_grad():  # normal tensors even under inference mode
        for attn in model.modules():
            if not isinstance(attn, Attention):
                continue
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            if not _fusable(projs):
                blocks.append(None)
                continue
            has_bias = projs[0].bias is not None  # all three or none (_fusable)
            weight = _block([p.weight for p in projs])
            bias = _block([p.bias for p in projs]) if has_bias else None
            if weight is None or (has_bias and bias is None):  # lay the block out
                weight = torch.cat([p.weight for p in projs])  # ((H + 2G) hd, D)
                bias = torch.cat([p.bias for p in projs]) if has_bias else None
                start = 0
                for p in projs:
                    p.weight.data = weight[start : start + p.out_features]  # views: same values, dense
                    if has_bias:
                        p.bias.data = bias[start : start + p.out_features]
                    start += p.out_features
            blocks.append((weight, bias))
    return blocks


def _fusable(projs) -> bool:
    if not all(type(p) is nn.Linear and type(p.weight) is nn.Parameter for p in projs):
        return False
    w = projs[0].weight
    tensors = [t for p in projs for t in (p.weight, p.bias) if t is not None]
    if any(type(t.data) is not torch.Tensor for t in tensors):
        return False  # a tensor subclass (FSDP's DTensor shards): its storage is not ours to lay out
    if not w.is_floating_point() or any((t.dtype, t.device) != (w.dtype, w.device) for t in tensors):
        return False
    has_bias = [p.bias is not None for p in projs]
    return all(has_bias) or not any(has_bias)


def _block(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor over `parts` concatenated along dim 0 when they already lie that way in one storage
    (contiguous, each starting where the previous ends), without copying; else None."""
    first = parts[0]
    offset = first.storage_offset()
    for t in parts:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        if t.storage_offset() != offset:
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in parts), *first.shape[1:])
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)
