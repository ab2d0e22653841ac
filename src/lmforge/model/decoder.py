"""The decoder-only transformer: embeddings -> N pre-norm blocks -> final norm -> (separate) LM head.

    x = embed(tokens) [+ position table]
    for each block:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    hidden = norm(x);                          logits = lm_head(hidden)

`forward` returns hidden states; `logits(hidden)` applies the head. Reward/value/classification heads,
embeddings and distillation use the hidden states, and generation computes logits only at the positions
it needs. Positions are explicit so left padding, packing and prefixes need no special cases.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import Config
from lmforge.model.attention import Attention, build_mask
from lmforge.model.kv_cache import KVCache
from lmforge.model.mlp import MLP
from lmforge.model.norms import make_norm
from lmforge.model.rope import RotaryEmbedding, sinusoidal_embedding


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config.norm, config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config.norm, config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, kv_cache=None, prefix=None, qkv=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache, prefix, qkv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.embed_positions = nn.Embedding(c.max_seq_len, c.n_embd) if c.pos_emb == "learned" else None
        self.rope = (
            RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_seq_len)
            if c.pos_emb == "rope"
            else None
        )
        self.embed_dropout = nn.Dropout(c.embd_dropout) if c.embd_dropout else nn.Identity()
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm = make_norm(c.norm, c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        # prefix / prompt tuning: a module giving, per layer, keys and values (B, G, P, hd) that every token
        # attends to, as if they sat before the input; real positions then start at P (lmforge.finetune)
        self.prefix: nn.Module | None = None
        self._windows = sorted({c.window_for_layer(i) for i in range(c.n_layer)}, key=lambda w: w or 0)

    # ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_prefix: bool = True,
        qkv: list | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, D) after the final norm.

        input_ids: (B, T) token ids (or `inputs_embeds` (B, T, D), e.g. for prompt tuning).
        positions: (B, T) position ids; default: counting real tokens (attention_mask) from each row's start,
            continuing from the cache when one is given. With a prefix of P virtual tokens, P is added.
        attention_mask: (B, T) with 1 for real tokens and 0 for padding, or, without a cache, a full boolean
            mask (B, T, T) / (B, 1, T, T) where True = may attend (packed documents, prefixes).
        kv_cache: a KVCache; this call's keys/values are appended to each row.
        use_prefix: False runs without `self.prefix` (a prompt-tuning prefix computes itself this way).
        qkv: per layer, its q/k/v weights and biases stacked, or None (lmforge.model.compile.fuse_qkv, called
            since the model last changed): q, k and v in one product. Inference only; generation uses it.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        pad_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if pad_mask is not None:
            pad_mask = pad_mask.bool()
        prefix = self.prefix(B) if self.prefix is not None and use_prefix else None  # [(k, v)] per layer
        n_prefix = prefix[0][0].shape[2] if prefix is not None else 0
        if positions is None:
            positions = self._default_positions(B, T, pad_mask, kv_cache, x.device)
        if n_prefix:
            positions = positions + n_prefix  # the virtual tokens take positions 0..P-1

        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        elif self.config.pos_emb == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.config.n_embd, x.dtype)
        x = self.embed_dropout(x)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None

        masks = self._masks(B, T, attention_mask, pad_mask, kv_cache, x.device)
        if n_prefix:
            masks = {w: _with_prefix(m, n_prefix, positions, w) for w, m in masks.items()}
        for i, layer in enumerate(self.layers):
            mask = masks[self.config.window_for_layer(i)]
            layer_prefix = prefix[i] if prefix is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, None, layer_prefix, use_reentrant=False)
            else:
                x = layer(x, rope, mask, kv_cache, layer_prefix, qkv[i] if qkv is not None else None)
        if kv_cache is not None:
            kv_cache.commit(pad_mask.sum(-1) if pad_mask is not None else torch.full_like(kv_cache.seen, T))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, V). Apply it only where logits are needed (the last position when decoding)."""
        return self.lm_head(hidden)

    # ---------------------------------------------------------------------------------------------
    def _default_positions(self, B, T, pad_mask, kv_cache, device) -> torch.Tensor:
        start = (
            kv_cache.seen[:, None]
            if kv_cache is not None
            else torch.zeros(B, 1, dtype=torch.long, device=device)
        )
        if pad_mask is None:
            return start + torch.arange(T, device=device)
        # left padding: real tokens count 0, 1, 2, ...; pads get the position of the next real token
        return start + (pad_mask.long().cumsum(-1) - 1).clamp(min=0)

    def _masks(
        self, B, T, attention_mask, pad_mask, kv_cache, device
    ) -> dict[int | None, torch.Tensor | None]:
        """One mask per distinct sliding window among the layers, built once per forward."""
        if kv_cache is not None:
            q_slots, key_valid = kv_cache.begin(T, pad_mask)
            n_keys = key_valid.shape[-1]
            masks = {}
            for w in self._windows:
                if T == 1 and kv_cache.all_valid and (w is None or w >= n_keys):
                    masks[w] = None  # one query that sees every slot: no mask, SDPA's fastest path
                else:
                    masks[w] = build_mask(q_slots, key_valid, n_keys, w)
            return masks
        if attention_mask is not None and attention_mask.dim() > 2:  # a full mask from the caller
            full = attention_mask.bool()
            return dict.fromkeys(self._windows, full if full.dim() == 4 else full[:, None])
        q_slots = torch.arange(T, device=device)
        masks: dict[int | None, torch.Tensor | None] = {}
        for w in self._windows:
            if pad_mask is None and (w is None or w >= T):
                masks[w] = None  # plain causal: SDPA's is_causal fast path
            else:
                masks[w] = build_mask(q_slots, pad_mask, T, w)
        return masks

    # ---------------------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2/Llama initialisation: N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith(
                    "layernorm.weight"
                ) or name == "norm.weight" else nn.init.zeros_(p)
                continue
            s = (
                std / math.sqrt(2 * self.config.n_layer)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else std
            )
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def _with_prefix(mask, n_prefix: int, positions: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Prepend the prefix's key columns (positions 0..P-1): (B, 1, T, S) -> (B, 1, T, P + S).

    A query at position p sees prefix key j iff p - j < window, as if the P virtual tokens sat before the
    input (what transformers computes for prompt tuning and for a prefix held in its cache).
    """
    B, T = positions.shape
    cols = torch.arange(n_prefix, device=positions.device)
    if window is None:
        seen = torch.ones(B, 1, T, n_prefix, dtype=torch.bool, device=positions.device)
    else:
        seen = (positions[:, None, :, None] - cols) < window  # (B, 1, T, P)
    if mask is None:
        if T == 1 and (window is None or bool(seen.all())):
            return None  # one query that sees every key, the prefix included
        if T == 1:  # a decode step over a full cache without padding: every real key is visible
            n_keys = int(positions[0, 0]) - n_prefix + 1
            mask = torch.ones(1, 1, 1, n_keys, dtype=torch.bool, device=positions.device)
        else:
            mask = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()[None, None]  # causal
    n = max(B, mask.shape[0])
    return torch.cat([seen.expand(n, 1, T, n_prefix), mask.expand(n, 1, T, mask.shape[-1])], dim=-1)
