"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after a sublayer's output projection.

    h = sublayer(x);   h + up(act(down(h)))      down: D -> m, up: m -> D, m << D

Houlsby places one after the attention output and one after the feed-forward output of every block, before
the residual sum; wrapping `self_attn.o_proj` and `mlp.down_proj` in place does exactly that without
touching the model code. `up` starts at zero, so an untrained adapter is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.finetune.config import BottleneckConfig
from lmforge.finetune.lora import (
    DEFAULT,
    _add_extras,
    register_config,
    set_adapter,
    wrap_targets,
)
from lmforge.model.mlp import activation


class BottleneckAdapter(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}
        self.active: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_down)

    def add_adapter(self, name: str, size: int, non_linearity: str, dropout: float, init_std: float) -> None:
        w = self.base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        down = nn.Linear(self.out_features, size, device=w.device, dtype=dtype)
        up = nn.Linear(size, self.out_features, device=w.device, dtype=dtype)
        nn.init.normal_(down.weight, std=init_std)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        activation(non_linearity)  # fail early on an unknown name
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.non_linearity[name] = non_linearity
        self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        out = h
        for name in self.active:
            act = activation(self.non_linearity[name])
            down, up = self.adapter_down[name], self.adapter_up[name]
            out = out + up(self.adapter_dropout[name](act(down(h.to(down.weight.dtype))))).to(h.dtype)
        return out

    def delete_adapter(self, name: str) -> None:
        for d in (self.adapter_down, self.adapter_up, self.adapter_dropout):
            d.pop(name, None)
        self.non_linearity.pop(name, None)
        self.active = [a for a in self.active if a != name]


def add_bottleneck(model: nn.Module, config: BottleneckConfig, adapter_name: str = DEFAULT) -> nn.Module:
    """Insert Houlsby adapters after the targeted layers; only they (and, with train_norms, the norms) train."""
    for _, layer in wrap_targets(model, config.target_modules, adapter_name, BottleneckAdapter):
        layer.add_adapter(adapter_name, config.bottleneck_size, config.non_linearity, config.adapter_dropout,
                          config.init_std)  # fmt: skip
    norms = []
    if config.train_norms:
        norms = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()
                        if n.rsplit(".", 1)[0].endswith(("layernorm", "norm"))})  # fmt: skip
    extras = list(dict.fromkeys([*(config.modules_to_save or []), *norms]))
    _add_extras(model, extras, config.trainable_token_indices, adapter_name)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    return model
