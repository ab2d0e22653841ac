"""Causal self-attention: multi-head, grouped-query and multi-query, with an optional KV cache.

    MHA (G = H)          GQA (1 < G < H)            MQA (G = 1)
    q: ||||||||          q: ||||||||                q: ||||||||
    k: ||||||||          k: |  |  |  |              k: |
Each of the G key/value heads serves H / G query heads.
    attention(q, k, v) = softmax(q k^T / sqrt(hd) + mask) v
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.model.kv_cache import KVCache
from lmforge.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        d, h, g, hd = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = h, g, hd
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d, h * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, g * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, g * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=config.attn_out_bias)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.resid_dropout) if config.resid_dropout else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). `prefix`: keys and values (B, G, P, hd) seen by every query, placed
        before the cached and new keys and never stored in the cache (prefix / prompt tuning).
        qkv: (weight, bias) of q_proj, k_proj and v_proj stacked, from lmforge.model.compile.fuse_qkv:
        q, k and v in one product. Inference only: it bypasses the three modules (no gradient, no hooks)."""
        B, T, _ = x.shape
        if qkv is not None:
            if torch.is_grad_enabled():
                raise ValueError("qkv= is for inference: no gradient would reach q_proj, k_proj, v_proj")
            q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
            q, k, v = F.linear(x, *qkv).split((q_size, kv_size, kv_size), dim=-1)  # (B, T, (H + 2G) hd)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, G, S, hd), S = slots in use
        if prefix is not None:
            k = torch.cat([prefix[0].to(k.dtype), k], dim=2)  # (B, G, P + S, hd)
            v = torch.cat([prefix[1].to(v.dtype), v], dim=2)
        # enable_gqa: each kv head serves H/G query heads without copying k and v H/G times
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,  # one decode query with no mask sees every key
            dropout_p=self.attn_dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, hd)  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))


def build_mask(
    q_slots: torch.Tensor,
    key_valid: torch.Tensor | None,
    n_keys: int,
    window: int | None,
) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S); True = may attend.

    q_slots: (B, T) or (T,) slot index of each query; key slots are 0..S-1.
    Key j is visible to query i iff key_valid[j] and j <= i (causal) and i - j < window (sliding window).
    A query always sees itself, so a padding query has a defined (ignored) output rather than NaN,
    which would otherwise leak through 0 * NaN into later layers.
    """
    k_slots = torch.arange(n_keys, device=q_slots.device)
    q = q_slots[..., :, None]  # (B, T, 1)
    allowed = k_slots <= q  # (B, T, S)
    if window is not None:
        allowed = allowed & (k_slots > q - window)
    if key_valid is not None:
        allowed = allowed & key_valid[..., None, :]
    allowed = allowed | (k_slots == q)
    if allowed.dim() == 2:
        allowed = allowed[None]
    return allowed[:, None]  # (B, 1, T, S)
