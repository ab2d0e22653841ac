"""Rotary position embeddings (Su et al. 2021, RoFormer) with the scaling types HF configs use.

A pair of channels (i, i + hd/2) of a query or key at position p is rotated by the angle p * inv_freq[i]:
    x' = x * cos(p * f) + rotate_half(x) * sin(p * f),   f_i = theta^(-2i / hd)
This is the "rotate half" layout of HF Llama (not the interleaved layout of the original paper), so HF
weights need no permutation.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    max_seq_len: int | None = None,
    seq_len: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Inverse frequencies (hd/2,) in float32, after the `linear`, `dynamic` or `llama3` scaling."""
    rope_type = (scaling or {}).get("rope_type", "default")
    base = theta
    if rope_type == "dynamic":
        # NTK-aware scaling (bloc97/emozilla): grow the base once the sequence passes the trained length.
        factor = scaling["factor"]
        length = max(seq_len or 0, max_seq_len)
        base = theta * ((factor * length / max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    freqs = 1.0 / (base**exponents)
    if rope_type == "linear":  # position interpolation: p -> p / factor
        freqs = freqs / scaling["factor"]
    elif rope_type == "llama3":
        freqs = _llama3_scale(freqs, scaling)
    return freqs


def _llama3_scale(freqs: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > old_len / low, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) for explicit positions; holds no state, so it works for any position layout."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_seq_len: int):
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_seq_len = head_dim, theta, scaling, max_seq_len
        self._cached: torch.Tensor | None = None  # inv_freq of the static rope types

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        if (self.scaling or {}).get("rope_type") == "dynamic":
            seq_len = int(positions.max()) + 1  # HF recomputes from the largest position seen in this call
            return inv_freq(
                self.head_dim, self.theta, self.scaling, self.max_seq_len, seq_len, positions.device
            )
        if self._cached is None or self._cached.device != positions.device:
            self._cached = inv_freq(
                self.head_dim, self.theta, self.scaling, self.max_seq_len, None, positions.device
            )
        return self._cached

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, signed sin: (B, 1, T, hd), in float32 then cast, as HF does.

        The sign of rotate_half is folded into sin once per forward: rotate_half(x) * sin equals
        roll(x, hd/2) * cat(-sin, sin) exactly (negation is exact), which saves ops in every layer.
        """
        angles = positions.float()[..., None] * self.frequencies(positions)  # (B, T, hd/2)
        cos, sin = angles.cos(), angles.sin()
        cos = torch.cat((cos, cos), dim=-1)[:, None].to(dtype)
        signed_sin = torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)
        return cos, signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos, signed_sin: (B, 1, T, hd)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) = roll(x) * sign
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def sinusoidal_embedding(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    i = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    angles = positions.float()[..., None] / (10000.0 ** (i / dim))  # (B, T, d/2)
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave: sin, cos, sin, cos...
    return pe[..., :dim].to(dtype)
