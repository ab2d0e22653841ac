"""Settings for the code lmforge hands to torch.compile (the decode step, the training step), and the
weight layout compiled CPU decoding reads fastest.

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
            if module.out_features <= module.in_features or w.stride() == (1, module.out_features):
                continue
            w.data = w.data.t().contiguous().t()  # same values and shape; (in, out) in memory
            moved += 1
    return moved
