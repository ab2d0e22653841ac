"""Inductor settings for the code lmforge hands to torch.compile (the decode step, the training step).

On CPU, inductor's C++ wrapper (`cpp_wrapper`) launches the compiled kernels and the matmul calls from
generated C++ instead of a Python function, which removes ~10 us of interpreter work per kernel:
measured on a 2-core CPU (docs/benchmarks.md), a SmolLM2-135M batch-1 decode step went from 25.5 to
23.2 ms and a 6.5 M-parameter Llama training step got ~4% faster. The price is a longer first
compilation (~40 s instead of ~5 s for the decode step); inductor caches the result on disk, so later
processes start in seconds. Elsewhere the defaults are kept.
"""

from __future__ import annotations

import torch


def compile_options(device: torch.device | str) -> dict:
    """Options for torch.compile(..., options=...) of a function running on `device`."""
    return {"cpp_wrapper": True} if torch.device(device).type == "cpu" else {}
