"""Prefix tuning and prompt tuning: P trained virtual tokens before every input, through the model's prefix seam.

    prefix tuning (Li & Liang 2021):  trained keys and values (G, P, hd) per layer, seen by every query
    prompt tuning (Lester et al. 2021): trained input embeddings (P, D) before the tokens

Both enter through `Transformer.prefix`, a module that gives each layer the keys and values of the virtual
tokens; real tokens then take positions P, P + 1, ... A causal model's keys and values at the prompt
positions depend on the prompt alone, so prompt tuning computes them by running the model over the P
embeddings (positions 0..P-1) and is then exactly "prepend P embeddings to inputs_embeds", as PEFT does,
while the KV cache, batching and generation stay unchanged: the virtual tokens never occupy cache slots.

Saved tensors follow PEFT: `prompt_embeddings` is (P, D) for prompt tuning and (P, L * 2 * G * hd) for
prefix tuning, laid out (P, layer, key|value, kv head, hd).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.finetune.config import PrefixConfig, PromptConfig
from lmforge.finetune.lora import DEFAULT, adapter_layers, register_config, set_adapter


class PrefixKV(nn.Module):
    """Trained keys and values of P virtual tokens for every layer."""

    kind = "prefix"

    def __init__(self, config, n_virtual: int, projection: bool = False, hidden: int = 256):
        super().__init__()
        self.n_layer, self.n_kv_head, self.head_dim = config.n_layer, config.n_kv_head, config.head_dim
        self.num_virtual_tokens = n_virtual
        width = self.n_layer * 2 * self.n_kv_head * self.head_dim
        self.token_dim = self.n_kv_head * self.head_dim
        self.projection = projection
        self.embedding = nn.Embedding(n_virtual, self.token_dim if projection else width)
        self.transform = (
            nn.Sequential(nn.Linear(self.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if projection
            else None
        )

    def table(self) -> torch.Tensor:
        """(P, L * 2 * G * hd): PEFT's `prompt_embeddings` for prefix tuning."""
        e = self.embedding.weight
        return self.transform(e) if self.transform is not None else e

    def forward(self, model, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        P, L, G, hd = self.num_virtual_tokens, self.n_layer, self.n_kv_head, self.head_dim
        kv = self.table().view(P, L * 2, G, hd).permute(1, 2, 0, 3)  # (2L, G, P, hd)
        return [(kv[2 * i].expand(batch_size, -1, -1, -1), kv[2 * i + 1].expand(batch_size, -1, -1, -1))
                for i in range(L)]  # fmt: skip

    @torch.no_grad()
    def init_from_vocab(self, model, generator: torch.Generator | None = None) -> None:
        """Start from the keys and values the model gives P random vocabulary tokens (a prompt it has seen)."""
        ids = torch.randint(0, model.config.vocab_size, (1, self.num_virtual_tokens), generator=generator)
        kv = _keys_values(model, model.embed_tokens(ids.to(model.embed_tokens.weight.device)))
        table = torch.stack([t[0] for layer in kv for t in layer])  # (2L, G, P, hd)
        flat = table.permute(2, 0, 1, 3).reshape(self.num_virtual_tokens, -1)  # (P, 2L * G * hd)
        if self.transform is None:
            self.embedding.weight.copy_(flat)


class PromptEmbeddings(nn.Module):
    """Trained input embeddings of P virtual tokens (PEFT's `prompt_embeddings`, (P, D))."""

    kind = "prompt"

    def __init__(self, config, n_virtual: int):
        super().__init__()
        self.num_virtual_tokens = n_virtual
        self.embedding = nn.Embedding(n_virtual, config.n_embd)
        self._cached: tuple | None = None

    def table(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, model, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = None
        if not torch.is_grad_enabled():  # generation: the prompt's keys/values only change with the weights
            key = tuple(p._version for p in model.parameters()) + (id(model),)
            if self._cached is not None and self._cached[0] == key:
                kv = self._cached[1]
            else:
                kv = _keys_values(model, self.embedding.weight[None])
                self._cached = (key, kv)
        else:
            self._cached = None
            kv = _keys_values(model, self.embedding.weight[None])
        return [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in kv]


def _keys_values(model, embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys and values (1, G, P, hd) of `embeds` (1, P, D) at positions 0..P-1."""
    from lmforge.model.kv_cache import KVCache

    P = embeds.shape[1]
    w = model.embed_tokens.weight
    cache = KVCache(
        model.config.n_layer, 1, P, model.config.n_kv_head, model.config.head_dim, w.dtype, w.device
    )
    model(inputs_embeds=embeds.to(w.dtype), kv_cache=cache, use_prefix=False)
    return list(zip(cache.keys, cache.values))


class VirtualTokens(nn.Module):
    """`Transformer.prefix`: named prefix / prompt adapters; the active ones are concatenated in order."""

    def __init__(self, model):
        super().__init__()
        self.adapters_by_name = nn.ModuleDict()
        self.active: list[str] = []
        self._model = [model]  # not a submodule: the model owns this module

    @property
    def adapters(self) -> list[str]:
        return list(self.adapters_by_name)

    def forward(self, batch_size: int):
        model = self._model[0]
        parts = [
            self.adapters_by_name[n](model, batch_size) for n in self.active if n in self.adapters_by_name
        ]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
                for i in range(len(parts[0]))]  # fmt: skip

    def delete_adapter(self, name: str) -> None:
        self.adapters_by_name.pop(name, None)
        self.active = [a for a in self.active if a != name]


def _install(model, adapter_name: str, module: nn.Module, config):
    """Register a prefix or prompt module as adapter `adapter_name` and make it the active one."""
    _virtual_tokens(model).adapters_by_name[adapter_name] = module
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    return model


def _virtual_tokens(model) -> VirtualTokens:
    if not hasattr(model, "prefix"):
        raise ValueError("prefix and prompt tuning need an lmforge Transformer (its `prefix` seam)")
    if model.prefix is None:
        model.prefix = VirtualTokens(model)
    return model.prefix


def _checked(model, adapter_name: str) -> None:
    if any(adapter_name in m.adapters for m in adapter_layers(model)):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, [])


def add_prefix_tuning(model, config: PrefixConfig, adapter_name: str = DEFAULT, seed: int = 0):
    """Add trained per-layer keys/values of `num_virtual_tokens` virtual tokens; only they train."""
    _checked(model, adapter_name)
    w = model.embed_tokens.weight
    module = PrefixKV(model.config, config.num_virtual_tokens, config.prefix_projection,
                      config.encoder_hidden_size).to(device=w.device, dtype=w.dtype)  # fmt: skip
    if config.init == "vocab":
        module.init_from_vocab(model, torch.Generator().manual_seed(seed))
    elif config.init != "normal":
        raise ValueError(f"prefix init must be vocab or normal, got {config.init!r}")
    return _install(model, adapter_name, module, config)


def add_prompt_tuning(
    model, config: PromptConfig, adapter_name: str = DEFAULT, tokenizer=None, seed: int = 0
):
    """Add `num_virtual_tokens` trained input embeddings before every input; only they train."""
    _checked(model, adapter_name)
    w = model.embed_tokens.weight
    module = PromptEmbeddings(model.config, config.num_virtual_tokens).to(device=w.device, dtype=w.dtype)
    P = config.num_virtual_tokens
    with torch.no_grad():
        if config.init == "vocab":
            ids = torch.randint(
                0, model.config.vocab_size, (P,), generator=torch.Generator().manual_seed(seed)
            )
            module.embedding.weight.copy_(w[ids.to(w.device)])
        elif config.init == "text":
            if tokenizer is None or not config.init_text:
                raise ValueError("prompt init='text' needs init_text and a tokenizer")
            ids = tokenizer.encode(config.init_text, add_special_tokens=False)
            ids = (ids * (P // max(len(ids), 1) + 1))[:P]  # PEFT repeats the text to P tokens
            module.embedding.weight.copy_(w[torch.tensor(ids, device=w.device)])
        elif config.init != "normal":
            raise ValueError(f"prompt init must be vocab, text or normal, got {config.init!r}")
    return _install(model, adapter_name, module, config)
