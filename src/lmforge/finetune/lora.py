"""LoRA and DoRA: low-rank updates that wrap `nn.Linear` modules in place, several named adapters per base.

    LoRA (Hu et al. 2021):   y = W x + b + s * B A dropout(x),   A (r, in), B (out, r),  s = alpha / r
    rsLoRA (Kalajdzievski 2023):  s = alpha / sqrt(r)
    DoRA (Liu et al. 2024):  y = m / ||W + s B A||_row * (W + s B A) x + b,  m (out,) initialised to ||W||_row,
                             the norm treated as a constant in backward (section 4.3), as PEFT computes it

A is Kaiming-uniform (a = sqrt(5), as `nn.Linear` and PEFT), B is zero, so an untrained adapter changes
nothing. Module and parameter names are PEFT's (`base_layer`, `lora_A.<adapter>`, `lora_B.<adapter>`,
`lora_magnitude_vector.<adapter>`), so state dicts line up with PEFT's once the adapter name is dropped.

    model = load_model("ckpt")
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))  # "default"
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"), adapter_name="math")
    with use_adapter(model, "math"): ...        # per call; set_adapter(model, ...) for good
    merge(model); unmerge(model)                # bit-exact round trip (the original weights are kept)
    plain = merge_and_unload(model)             # a plain Transformer with the active adapters folded in
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.finetune.config import LoraConfig

DEFAULT = "default"


# --------------------------------------------------------------------------------------------------
# Layers


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of a linear base layer: nn.Linear, lmforge Int8Linear, bitsandbytes 4-bit."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":  # bitsandbytes NF4
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight.data, weight.quant_state)
    return weight


class DoraMagnitude(nn.Module):
    """The trained magnitude m (out,) of one DoRA adapter (PEFT: `lora_magnitude_vector.<name>.weight`)."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm.clone())


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)  # (out,)


class LoraLinear(nn.Module):
    """A linear layer plus named low-rank adapters; `active` adapters are summed into the output."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []  # adapters folded into base_layer's weight
        self._original: torch.Tensor | None = None  # the weight before merging, for an exact unmerge

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    dora: bool = False) -> None:  # fmt: skip
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        w = base_weight(self.base_layer)
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if dora:
            with torch.no_grad():
                self.lora_magnitude_vector[name] = DoraMagnitude(_row_norm(w.detach().to(dtype)))
        self.active.append(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A, (out, in)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = base_out = self.base_layer(x)
        for name in self.active:
            if name in self.merged:
                continue
            A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
            dropout = self.lora_dropout[name]
            h = x.to(A.weight.dtype)
            if name not in self.lora_magnitude_vector:
                down = A(dropout(h))  # (…, r)
                if down.dtype == result.dtype and B.bias is None:
                    # result + s * down B^T in one addmm: the scaling rides in the GEMM, with no (…, out)
                    # temporary for `* s` in forward or backward
                    out = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                                      B.weight.t(), alpha=s)  # fmt: skip
                    result = out.view(result.shape)
                else:
                    result = result + (B(down) * s).to(result.dtype)
                continue
            # DoRA, as PEFT: (m / ||W + s B A|| - 1) W x + m / ||W + s B A|| * s * B A x
            weight = base_weight(self.base_layer).to(h.dtype)
            lora_weight = B.weight @ A.weight  # (out, in)
            norm = _row_norm(weight + s * lora_weight.detach()).detach()
            scale = self.lora_magnitude_vector[name].weight / norm  # (out,)
            if isinstance(dropout, nn.Identity) or not self.training:
                base = base_out.to(h.dtype)  # W x of the base alone, also when several adapters are active
                if getattr(self.base_layer, "bias", None) is not None:
                    base = base - self.base_layer.bias
            else:
                h = dropout(h)
                base = F.linear(h, weight)
            result = result + ((scale - 1) * base + scale * B(A(h)) * s).to(result.dtype)
        return result

    # ---- merging -------------------------------------------------------------------------------
    def merged_weight(self, names: Sequence[str]) -> torch.Tensor:
        """W0 plus the adapters `names`, computed from the unmerged weight W0 the way forward computes them:
        LoRA adds s B A; DoRA adds m / ||W0 + s B A|| * (W0 + s B A) - W0."""
        w0 = (self._original if self._original is not None else base_weight(self.base_layer)).detach()
        w = w0.float().clone()
        for name in names:
            delta = self.delta_weight(name).detach().float()
            if name in self.lora_magnitude_vector:
                target = w0.float() + delta
                scale = self.lora_magnitude_vector[name].weight.detach().float() / _row_norm(target)
                delta = scale[:, None] * target - w0.float()
            w += delta
        return w.to(w0.dtype)

    def merge(self, names: Sequence[str] | None = None) -> None:
        names = [n for n in (self.active if names is None else names) if n not in self.merged]
        if not names:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise ValueError(
                f"cannot merge into a {type(self.base_layer).__name__} base layer; use merge_and_unload, "
                "which dequantizes"
            )
        if self._original is None:
            self._original = self.base_layer.weight.detach().clone()
        with torch.no_grad():
            self.base_layer.weight.copy_(self.merged_weight(self.merged + names))
        self.merged += names

    def unmerge(self) -> None:
        """Restore the weight from before the first merge, bit for bit."""
        if self._original is None:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._original)
        self._original, self.merged = None, []

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge first")
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.active = [a for a in self.active if a != name]


class ModulesToSave(nn.Module):
    """A module trained whole for an adapter (a classification head, lm_head): one copy per adapter, the
    original kept for when none is active (PEFT's ModulesToSaveWrapper)."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module
        self.active.append(name)

    def current(self) -> nn.Module:
        live = [a for a in self.active if a in self.modules_to_save]
        if len(live) > 1:
            raise ValueError(f"adapters {live} each replace this module; activate only one of them")
        return self.modules_to_save[live[0]] if live else self.original_module

    @property
    def weight(self) -> torch.Tensor:
        return self.current().weight

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def delete_adapter(self, name: str) -> None:
        self.modules_to_save.pop(name, None)
        self.active = [a for a in self.active if a != name]


class TrainableTokens(nn.Module):
    """Embedding (or output head) rows trained for an adapter: the new values of rows `token_indices`
    (PEFT's `trainable_tokens_delta`, which holds values, not differences) replace the base rows.

    Sharing `values` with the embedding's wrapper ties the rows of a tied output head."""

    def __init__(self, base_layer: nn.Module, shared: TrainableTokens | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = shared.trainable_tokens_delta if shared else nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = shared.token_indices if shared else {}
        self.tied = shared is not None
        self.active: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(self.token_indices)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add_adapter(self, name: str, indices: Sequence[int]) -> None:
        if not self.tied:
            n = self.base_layer.weight.shape[0]
            bad = [i for i in indices if not 0 <= i < n]
            if bad:
                raise ValueError(f"trainable token indices {bad[:5]} are outside the vocabulary ({n} rows)")
            self.token_indices[name] = [int(i) for i in indices]
            rows = self.base_layer.weight.detach()[list(indices)].clone()
            self.trainable_tokens_delta[name] = nn.Parameter(rows)
        self.active.append(name)

    def merged_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        for name in self.active:
            if name in self.token_indices:
                index = torch.tensor(self.token_indices[name], device=w.device)
                w = w.index_copy(0, index, self.trainable_tokens_delta[name].to(w.dtype))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not any(a in self.token_indices for a in self.active):
            return self.base_layer(x)
        w = self.merged_weight()
        if isinstance(self.base_layer, nn.Embedding):
            return F.embedding(x, w, self.base_layer.padding_idx)
        return F.linear(x, w, self.base_layer.bias)

    def delete_adapter(self, name: str) -> None:
        if not self.tied:
            self.token_indices.pop(name, None)
            self.trainable_tokens_delta.pop(name, None)
        self.active = [a for a in self.active if a != name]


# --------------------------------------------------------------------------------------------------
# Finding and replacing modules


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry matches the name or a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Int8Linear", "Linear4bit")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def target_names(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Paths of the linear layers that `targets` selects (LoRA wrappers count as their base layer)."""
    heads = {"lm_head", "score"}
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            module = module.base_layer
        elif ".base_layer" in name or name.endswith("base_layer") or not is_linear(module):
            continue
        if targets == "all-linear":
            if name.rsplit(".", 1)[-1] not in heads:
                found.append(name)
        elif _matches(name, targets):
            found.append(name)
    return found


def wrap_targets(model: nn.Module, targets, adapter_name: str, wrapper: type) -> list[tuple[str, nn.Module]]:
    """The common start of adding an adapter: check the targets and the name, freeze the model, switch
    the other adapters off, and wrap each targeted layer in `wrapper` (once). Returns (path, wrapper)."""
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"target_modules={targets!r} matches no linear layer of the model")
    if any(adapter_name in m.adapters for m in adapter_layers(model)):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, [])
    wrapped = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, wrapper):
            layer = wrapper(layer)
            set_submodule(model, name, layer)
        wrapped.append((name, layer))
    return wrapped


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT) -> nn.Module:
    """Wrap the targeted linear layers with LoRA (or DoRA) adapter `adapter_name`, in place.

    Everything but the new adapter is frozen (PEFT's default), so `requires_grad` chooses what trains;
    other adapters already on the model stay but are deactivated, and the new one is the active one.
    """
    for name, layer in wrap_targets(model, config.target_modules, adapter_name, LoraLinear):
        r = _pattern_value(name, config.rank_pattern, config.r)
        alpha = _pattern_value(name, config.alpha_pattern, config.lora_alpha)
        layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora)
    _add_extras(model, config.modules_to_save, config.trainable_token_indices, adapter_name)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    return model


def _add_extras(model: nn.Module, modules_to_save, token_indices, adapter_name: str) -> None:
    for target in modules_to_save or []:
        hits = [n for n, m in model.named_modules() if _matches(n, [target]) and not isinstance(m, ModulesToSave)
                and ".original_module" not in n and ".modules_to_save." not in n]  # fmt: skip
        if not hits:
            raise ValueError(f"modules_to_save: no module named {target!r}")
        for name in hits:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                parent = name.rpartition(".")[0]
                wrapped = model.get_submodule(parent) if parent else model
                if isinstance(wrapped, ModulesToSave):
                    module = wrapped
                else:
                    module = ModulesToSave(module)
                    set_submodule(model, name, module)
            module.add_adapter(adapter_name)
    if token_indices:
        by_module = token_indices if isinstance(token_indices, dict) else {"embed_tokens": token_indices}
        for target, indices in by_module.items():
            name = _find_one(model, target)
            layer = model.get_submodule(name)
            if not isinstance(layer, TrainableTokens):
                layer = TrainableTokens(layer)
                set_submodule(model, name, layer)
            layer.add_adapter(adapter_name, indices)
            tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
            if tied and name == "embed_tokens" and "lm_head" not in by_module:
                head = model.lm_head
                if not isinstance(head, TrainableTokens):
                    head = TrainableTokens(head, shared=layer)
                    model.lm_head = head
                head.add_adapter(adapter_name, indices)


def _find_one(model: nn.Module, target: str) -> str:
    hits = [n for n, m in model.named_modules() if _matches(n, [target]) and ".base_layer" not in n
            and not n.endswith("base_layer")]  # fmt: skip
    if len(hits) != 1:
        raise ValueError(f"trainable_token_indices: {target!r} names {len(hits)} modules, expected one")
    return hits[0]


def register_config(model: nn.Module, name: str, config) -> None:
    """Remember how adapter `name` was made (model.peft_config, as PEFT), for saving it later."""
    if not hasattr(model, "peft_config"):
        model.peft_config = {}
    model.peft_config[name] = config


# --------------------------------------------------------------------------------------------------
# Choosing adapters


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """Every module that carries named adapters (LoRA, bottleneck, prefix, modules_to_save, tokens)."""
    return [m for m in model.modules() if hasattr(m, "adapters") and hasattr(m, "active")]


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for m in adapter_layers(model):
        names.update(dict.fromkeys(m.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for m in adapter_layers(model):
        names.update(dict.fromkeys(a for a in m.active if a in m.adapters))
    return list(names)


def set_adapter(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Make `names` the active adapters (their outputs add up); [] or None switches every adapter off."""
    names = [names] if isinstance(names, str) else list(names or [])
    unknown = set(names) - set(adapter_names(model))
    if unknown:
        raise ValueError(f"unknown adapter(s) {sorted(unknown)}; the model has {adapter_names(model)}")
    for m in adapter_layers(model):
        if getattr(m, "merged", None) and set(m.merged) - set(names):
            raise ValueError("an adapter is merged into the weights; unmerge(model) before switching")
        m.active = [n for n in names if n in m.adapters]


@contextlib.contextmanager
def use_adapter(model: nn.Module, names: str | Sequence[str] | None) -> Iterator[nn.Module]:
    """Run with adapters `names` active (None or []: the base model), restoring the previous choice after."""
    before = [(m, list(m.active)) for m in adapter_layers(model)]
    set_adapter(model, names)
    try:
        yield model
    finally:
        for m, active in before:
            m.active = active


def disable_adapters(model: nn.Module):
    """The base model's outputs for the duration of a `with` block."""
    return use_adapter(model, None)


def delete_adapter(model: nn.Module, name: str) -> None:
    for m in adapter_layers(model):
        m.delete_adapter(name)
    getattr(model, "peft_config", {}).pop(name, None)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():  # quantized weights are buffers
        if hasattr(m, "dequantize") and hasattr(m, "qweight"):
            total += m.qweight.numel()
    return trainable, total


# --------------------------------------------------------------------------------------------------
# Merging


def merge(model: nn.Module) -> None:
    """Fold the active LoRA/DoRA adapters into the base weights (forward then skips them)."""
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge(): the base weights return to their values before it, bit for bit."""
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the weights and remove every adapter module, in place: the model is a
    plain Transformer again (a quantized base is dequantized). Prefix/prompt tuning cannot be folded."""
    from lmforge.finetune.bottleneck import BottleneckAdapter

    if getattr(model, "prefix", None) is not None and getattr(model.prefix, "active", None):
        raise ValueError(
            "prefix and prompt tuning cannot be merged into the weights; save the adapter instead"
        )
    replaced: list[str] = []
    for name, m in list(model.named_modules()):
        if any(name.startswith(r + ".") for r in replaced):
            continue  # inside a module already replaced
        plain = None
        if isinstance(m, LoraLinear):
            names = [a for a in m.active if a not in m.merged]
            plain = _plain_linear(m.base_layer, m.merged_weight(m.merged + names))
        elif isinstance(m, ModulesToSave):
            plain = m.current()
        elif isinstance(m, TrainableTokens):
            if m.tied:
                continue
            with torch.no_grad():
                m.base_layer.weight.copy_(m.merged_weight().detach())
            plain = m.base_layer
        elif isinstance(m, BottleneckAdapter):
            raise ValueError("bottleneck adapters add layers and cannot be merged into the weights")
        elif type(m).__name__ in ("Int8Linear", "Linear4bit"):
            plain = _plain_linear(m, base_weight(m))
        if plain is not None:
            set_submodule(model, name, plain)
            replaced.append(name)
    if isinstance(getattr(model, "lm_head", None), TrainableTokens):  # tied to the embedding again
        model.lm_head = model.lm_head.base_layer
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight
    if hasattr(model, "prefix"):
        model.prefix = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _plain_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    weight = weight.detach()
    if not weight.dtype.is_floating_point:
        weight = weight.float()
    bias = getattr(base, "bias", None)
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias.detach().to(weight.dtype))
    return plain
