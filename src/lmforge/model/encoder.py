"""The encoder-only transformer (BERT family): bidirectional attention, post-norm blocks, GELU.

    x = norm(embed(tokens) + position_table[positions] + type_table[token_type_ids])
    for each block:  x = norm1(x + attn(x));  x = norm2(x + mlp(x))       (post-norm, Devlin et al. 2019)
    hidden = x;   mlm_logits = head(hidden);   pooled = tanh(pooler(hidden[:, 0]))

Every token sees every other real token of its row (no causal mask); padding keys are masked out.
`forward` returns hidden states like the decoder's, so the sentence embedder pools them and the
masked-LM objective applies `logits` only at the masked positions. Checkpoints load and save as
Hugging Face `BertModel` / `BertForMaskedLM` through `lmforge.model.hf.load_encoder / save_encoder`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.mlp import activation


@dataclass
class EncoderConfig:
    """Hyper-parameters of a BERT-style encoder. Shapes: V vocab, D `n_embd`, H `n_head`, F `intermediate_size`."""

    name: str = "custom"
    model_type: str = "bert"
    vocab_size: int = 30522
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    intermediate_size: int | None = None  # None -> 4 * n_embd
    max_seq_len: int = 512  # HF max_position_embeddings: rows of the absolute position table
    type_vocab_size: int = 2  # segment A / B of sentence pairs
    norm_eps: float = 1e-12
    activation: str = "gelu"  # HF hidden_act: "gelu" (erf) for BERT, "gelu_new" (tanh) for some variants
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    pooler: bool = True  # BertModel's tanh(dense(h_CLS)) layer
    mlm_head: bool = False  # BertForMaskedLM's prediction head (decoder tied to the token embeddings)
    extra_hf: dict[str, Any] = field(default_factory=dict)  # HF fields we carry but do not interpret

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        activation(self.activation)  # raises on an unknown name

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> EncoderConfig:
        """A named preset with keyword overrides: `EncoderConfig.from_name("bert-base", n_layer=2)`."""
        key = name.lower()
        if key not in ENCODER_PRESETS:
            raise ValueError(f"unknown encoder preset {name!r}; known: {', '.join(sorted(ENCODER_PRESETS))}")
        return cls(**{"name": key, **ENCODER_PRESETS[key], **overrides})

    # ---- Hugging Face config.json ------------------------------------------------------------------
    _HF_NAMES = {  # ours -> HF BertConfig
        "vocab_size": "vocab_size",
        "n_layer": "num_hidden_layers",
        "n_embd": "hidden_size",
        "n_head": "num_attention_heads",
        "intermediate_size": "intermediate_size",
        "max_seq_len": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
        "norm_eps": "layer_norm_eps",
        "activation": "hidden_act",
        "hidden_dropout": "hidden_dropout_prob",
        "attn_dropout": "attention_probs_dropout_prob",
        "initializer_range": "initializer_range",
        "pad_token_id": "pad_token_id",
    }

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> EncoderConfig:
        """From a HF `config.json` (a folder, the file, or its parsed dict) of a BERT-family model."""
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            hf = json.loads(path.read_text())
        model_type = hf.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"model_type {model_type!r} is not a BERT-family encoder (expected 'bert')")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {hf['position_embedding_type']!r}: only 'absolute' is supported"
            )
        values = {ours: hf[theirs] for ours, theirs in cls._HF_NAMES.items() if theirs in hf}
        architectures = hf.get("architectures") or ["BertModel"]
        values["mlm_head"] = any(a in ("BertForMaskedLM", "BertForPreTraining") for a in architectures)
        values["pooler"] = not values["mlm_head"]  # transformers builds BertForMaskedLM without the pooler
        known = set(cls._HF_NAMES.values()) | {"model_type", "architectures", "position_embedding_type"}
        values["extra_hf"] = {k: v for k, v in hf.items() if k not in known}
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        hf = dict(self.extra_hf)
        hf.update({theirs: getattr(self, ours) for ours, theirs in self._HF_NAMES.items()})
        hf.update(
            model_type="bert",
            architectures=["BertForMaskedLM" if self.mlm_head else "BertModel"],
            position_embedding_type="absolute",
        )
        if self.mlm_head:
            hf["tie_word_embeddings"] = True
        return dict(sorted(hf.items()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # tiny, for tests
    "tiny-bert": dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, intermediate_size=128, max_seq_len=128),
    # https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/blob/main/config.json
    "minilm-l6": dict(n_layer=6, n_embd=384, n_head=12, intermediate_size=1536),
    # https://huggingface.co/google-bert/bert-base-uncased/blob/main/config.json
    "bert-base": dict(n_layer=12, n_embd=768, n_head=12, intermediate_size=3072),
}


# --------------------------------------------------------------------------------------------------


class EncoderAttention(nn.Module):
    """Bidirectional multi-head self-attention: softmax(q k^T / sqrt(hd) + mask) v, no causal mask."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        d, self.n_head, self.head_dim = config.n_embd, config.n_head, config.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.attn_dropout = config.attn_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class EncoderBlock(nn.Module):
    """Post-norm: x = norm(x + dropout(attn(x))); x = norm(x + dropout(down(act(up(x)))))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        d, f = config.n_embd, config.intermediate_size
        self.self_attn = EncoderAttention(config)
        self.attn_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.up_proj = nn.Linear(d, f)
        self.down_proj = nn.Linear(f, d)
        self.mlp_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.act = activation(config.activation)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.self_attn(x, mask)))
        return self.mlp_norm(x + self.dropout(self.down_proj(self.act(self.up_proj(x)))))


class MLMHead(nn.Module):
    """BERT's masked-LM head: logits = norm(act(dense(h))) @ E^T + bias, E the (tied) token embeddings."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = activation(config.activation)

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), embedding, self.bias)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd, padding_idx=c.pad_token_id)
        self.embed_positions = nn.Embedding(c.max_seq_len, c.n_embd)
        self.embed_token_types = nn.Embedding(c.type_vocab_size, c.n_embd)
        self.embed_norm = nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.embed_dropout = nn.Dropout(c.hidden_dropout)
        self.layers = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_layer))
        self.pooler = nn.Linear(c.n_embd, c.n_embd) if c.pooler else None
        self.mlm_head = MLMHead(c) if c.mlm_head else None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, D) of the last block.

        input_ids: (B, T) token ids (or `inputs_embeds` (B, T, D)).
        positions: (B, T) rows of the position table; default 0..T-1 (BERT pads on the right).
        attention_mask: (B, T) with 1 for real tokens and 0 for padding, or a full boolean mask
            (B, T, T) / (B, 1, T, T) where True = may attend (packed sentences).
        token_type_ids: (B, T) segment ids; default all 0.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {T} tokens; the encoder's position table has {self.config.max_seq_len}"
            )
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
        x = x + self.embed_positions(positions) + self.embed_token_types(token_type_ids)
        x = self.embed_dropout(self.embed_norm(x))
        mask = self._mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean (B, 1, T|1, T); True = may attend. A row with no visible key sees every key instead of
        producing NaN (its output is padding, ignored by pooling and by the losses)."""
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): mask out padding keys
        else:
            mask = attention_mask.bool()
            mask = mask[:, None] if mask.dim() == 3 else mask
        return mask | ~mask.any(-1, keepdim=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM logits (…, D) -> (…, V); apply only at the masked positions."""
        if self.mlm_head is None:
            raise ValueError(
                "this encoder has no masked-LM head (build it with EncoderConfig(mlm_head=True))"
            )
        return self.mlm_head(hidden, self.embed_tokens.weight)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BertModel's pooler output: tanh(dense(h_CLS)), (B, T, D) -> (B, D)."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler layer")
        return torch.tanh(self.pooler(hidden[:, 0]))

    # ---------------------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """BERT initialisation: weights N(0, 0.02), biases 0, LayerNorm weights 1, the padding row 0."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                elif isinstance(module, nn.Linear | nn.Embedding):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        module.bias.zero_()
            if self.config.pad_token_id is not None:
                self.embed_tokens.weight[self.config.pad_token_id].zero_()
            if self.mlm_head is not None:
                self.mlm_head.bias.zero_()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' hidden states: sum_t m_t h_t / max(sum_t m_t, 1e-9).  (B, T, D) -> (B, D)"""
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Sentence vector from token states, as sentence-transformers' Pooling: mean, cls, max, mean_sqrt_len."""
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode == "cls":
        return hidden[:, 0]
    m = attention_mask[..., None].to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(1).values
    if mode == "mean_sqrt_len":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9).sqrt()
    raise ValueError(f"unknown pooling {mode!r} (mean, cls, max, mean_sqrt_len)")
