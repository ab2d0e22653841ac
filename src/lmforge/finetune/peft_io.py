"""Adapters as PEFT folders: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's tensor names.

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight        (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight        (out, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector (out,)    DoRA
    base_model.model.score.weight                                          modules_to_save
    base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta  (n, D)  trainable tokens
    prompt_embeddings                                                      prompt / prefix tuning

Our module paths are Hugging Face Llama's without `model.`, so for the Llama family (Llama, Mistral, Qwen2,
SmolLM) a name maps by a prefix. GPT-2 fuses q, k and v into `c_attn` (a Conv1D): three LoRAs (A_q, B_q),
(A_k, B_k), (A_v, B_v) are written as one of rank 3r with A = [A_q; A_k; A_v] and B block-diagonal, which
computes exactly the same update; a PEFT `c_attn` LoRA loads as three LoRAs that share A.
Bottleneck adapters have no PEFT type; they use the same layout with `peft_type: "BOTTLENECK"`.
Adapter files are read as safetensors only: a pickled `adapter_model.bin` is refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from lmforge.finetune.bottleneck import BottleneckAdapter, BottleneckConfig, add_bottleneck
from lmforge.finetune.lora import (
    DEFAULT,
    LoraConfig,
    LoraLinear,
    ModulesToSave,
    TrainableTokens,
    _pattern_value,
    adapter_names,
    add_lora,
    register_config,
    set_adapter,
)
from lmforge.finetune.prompt import (
    PrefixConfig,
    PrefixKV,
    PromptConfig,
    add_prefix_tuning,
    add_prompt_tuning,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

_GPT2 = {  # ours (inside layers.{i}.) -> HF (inside transformer.h.{i}.)
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
    "self_attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
_GPT2_TOP = {
    "embed_tokens": "transformer.wte",
    "embed_positions": "transformer.wpe",
    "norm": "transformer.ln_f",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message says why."""


# --------------------------------------------------------------------------------------------------
# Module names


def to_hf_module(path: str, model_type: str) -> str:
    """Our module path -> the Hugging Face causal-LM module path (`lm_head` and `score` stay top level)."""
    if path in ("lm_head", "score") or path.startswith(("lm_head.", "score.")):
        return path
    if model_type != "gpt2":
        return "model." + path
    if path in _GPT2_TOP:
        return _GPT2_TOP[path]
    m = re.match(r"layers\.(\d+)\.(.+)$", path)
    if m is None:
        raise AdapterError(f"no GPT-2 name for module {path!r}")
    i, rest = m.groups()
    if rest in _QKV:
        return f"transformer.h.{i}.attn.c_attn"
    return f"transformer.h.{i}.{_GPT2[rest]}"


def from_hf_module(hf: str, model_type: str) -> str:
    if hf in ("lm_head", "score"):
        return hf
    if model_type != "gpt2":
        if not hf.startswith("model."):
            raise AdapterError(f"module {hf!r} is not part of a {model_type} model")
        return hf[len("model.") :]
    inverse_top = {v: k for k, v in _GPT2_TOP.items()}
    if hf in inverse_top:
        return inverse_top[hf]
    m = re.match(r"transformer\.h\.(\d+)\.(.+)$", hf)
    inverse = {v: k for k, v in _GPT2.items()}
    if m is None or (m.group(2) not in inverse and m.group(2) != "attn.c_attn"):
        raise AdapterError(f"module {hf!r} is not part of a GPT-2 model")
    i, rest = m.groups()
    return f"layers.{i}.self_attn.qkv" if rest == "attn.c_attn" else f"layers.{i}.{inverse[rest]}"


def _model_type(model) -> str:
    return model.config.model_type


# --------------------------------------------------------------------------------------------------
# Saving


def _tensors_for(model, name: str) -> dict[str, torch.Tensor]:
    mt = _model_type(model)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, LoraLinear]] = {}  # GPT-2 c_attn: layer -> {q,k,v: module}
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear) and name in m.adapters:
            if mt == "gpt2" and path.endswith(_QKV):
                fused.setdefault(path.rsplit(".", 2)[0], {})[path[-6]] = m
                continue
            hf = PREFIX + to_hf_module(path, mt)
            out[f"{hf}.lora_A.weight"] = m.lora_A[name].weight
            out[f"{hf}.lora_B.weight"] = m.lora_B[name].weight
            if name in m.lora_magnitude_vector:
                out[f"{hf}.lora_magnitude_vector"] = m.lora_magnitude_vector[name].weight
        elif isinstance(m, ModulesToSave) and name in m.adapters:
            hf = PREFIX + to_hf_module(path, mt)
            for key, t in m.modules_to_save[name].state_dict().items():
                out[f"{hf}.{key}"] = t
        elif isinstance(m, TrainableTokens) and name in m.adapters and not m.tied:
            out[f"{PREFIX}{to_hf_module(path, mt)}.token_adapter.trainable_tokens_delta"] = (
                m.trainable_tokens_delta[name]
            )
        elif isinstance(m, BottleneckAdapter) and name in m.adapters:
            hf = PREFIX + to_hf_module(path, mt)
            for part in ("adapter_down", "adapter_up"):
                for key, t in getattr(m, part)[name].state_dict().items():
                    out[f"{hf}.{part}.{key}"] = t
    for layer, parts in fused.items():
        out.update(_fuse_qkv(model, layer, parts, name))
    vt = getattr(model, "prefix", None)
    if vt is not None and name in vt.adapters:
        out["prompt_embeddings"] = vt.adapters_by_name[name].table()
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _fuse_qkv(model, layer: str, parts: dict[str, LoraLinear], name: str) -> dict[str, torch.Tensor]:
    """Three LoRAs on q, k, v -> one on GPT-2's c_attn: A = [A_q; A_k; A_v], B block-diagonal, scaled so
    that PEFT's alpha / r for c_attn gives the same update (a missing projection contributes zeros)."""
    config: LoraConfig = model.peft_config[name]
    i = int(layer.split(".")[1])
    hf = f"{PREFIX}transformer.h.{i}.attn.c_attn"
    some = next(iter(parts.values()))
    dtype = some.lora_A[name].weight.dtype
    As, Bs, scales = [], [], []
    for letter in "qkv":
        m = parts.get(letter)
        if m is None:
            continue
        As.append(m.lora_A[name].weight)
        Bs.append((letter, m.lora_B[name].weight))
        scales.append(m.scaling[name])
    shared = all(torch.equal(As[0], a) for a in As) and len(As) == 3 and len(set(scales)) == 1
    r_total = As[0].shape[0] if shared else sum(a.shape[0] for a in As)
    out_dims = {
        letter: model.get_submodule(f"{layer}.self_attn.{letter}_proj").out_features for letter in "qkv"
    }
    B = torch.zeros(sum(out_dims.values()), r_total, dtype=dtype)
    row, col = 0, 0
    given = dict(Bs)
    scale_of = {letter: parts[letter].scaling[name] for letter in parts}
    for letter in "qkv":
        n = out_dims[letter]
        if letter in given:
            r = given[letter].shape[1]
            c = 0 if shared else col
            B[row : row + n, c : c + r] = given[letter].detach().cpu() * (
                scale_of[letter] / _c_attn_scale(config, r_total)
            )
            col += 0 if shared else r
        row += n
    out = {
        f"{hf}.lora_A.weight": (As[0] if shared else torch.cat(As)).detach().cpu(),
        f"{hf}.lora_B.weight": B,
    }
    if config.use_dora:
        mags = []
        for letter in "qkv":
            m = parts.get(letter)
            if m is not None:
                mags.append(m.lora_magnitude_vector[name].weight.detach().cpu())
            else:
                w = model.get_submodule(f"{layer}.self_attn.{letter}_proj")
                w = w.base_layer.weight if isinstance(w, LoraLinear) else w.weight
                mags.append(torch.linalg.norm(w.detach().cpu(), dim=1))
        out[f"{hf}.lora_magnitude_vector"] = torch.cat(mags)
    return out


def _c_attn_scale(config: LoraConfig, r: int) -> float:
    alpha = config.lora_alpha * (r / config.r if not config.use_rslora else math.sqrt(r / config.r))
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _hf_targets(model, name: str, config) -> list[str] | str:
    mt = _model_type(model)
    paths = [p for p, m in model.named_modules()
             if isinstance(m, (LoraLinear, BottleneckAdapter)) and name in m.adapters]  # fmt: skip
    if mt != "gpt2" and isinstance(config.target_modules, list):
        return list(config.target_modules)
    hf = sorted({to_hf_module(p, mt) for p in paths})
    return "^(" + "|".join(re.escape(h) for h in hf) + ")$"


def _hf_modules_to_save(model, name: str) -> list[str] | None:
    mt = _model_type(model)
    found = [
        to_hf_module(p, mt)
        for p, m in model.named_modules()
        if isinstance(m, ModulesToSave) and name in m.adapters
    ]
    return found or None


def _hf_token_indices(model, name: str):
    mt = _model_type(model)
    found = {to_hf_module(p, mt).rsplit(".", 1)[-1]: m.token_indices[name] for p, m in model.named_modules()
             if isinstance(m, TrainableTokens) and name in m.adapters and not m.tied}  # fmt: skip
    if not found:
        return None
    return found["embed_tokens" if mt != "gpt2" else "wte"] if len(found) == 1 and (
        "embed_tokens" in found or "wte" in found) else found  # fmt: skip


def adapter_config_dict(model, name: str, base_model_path: str | None = None) -> dict:
    config = model.peft_config[name]
    task = "SEQ_CLS" if getattr(model, "score", None) is not None else "CAUSAL_LM"
    common = {"base_model_name_or_path": base_model_path, "task_type": task, "inference_mode": True,
              "revision": None}  # fmt: skip
    c = model.config
    if isinstance(config, LoraConfig):
        out = {"peft_type": "LORA", **common, "r": config.r, "lora_alpha": config.lora_alpha,
               "lora_dropout": config.lora_dropout, "target_modules": _hf_targets(model, name, config),
               "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": "none",
               "fan_in_fan_out": c.model_type == "gpt2", "init_lora_weights": True, "lora_bias": False,
               "modules_to_save": _hf_modules_to_save(model, name),
               "trainable_token_indices": _hf_token_indices(model, name),
               "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
               "layers_to_transform": None, "layers_pattern": None}  # fmt: skip
        if c.model_type == "gpt2":
            qkv = _fused_patterns(model, name, config)
            out["rank_pattern"].update(qkv[0])
            out["alpha_pattern"].update(qkv[1])
        return out
    if isinstance(config, BottleneckConfig):
        return {"peft_type": "BOTTLENECK", **common, "bottleneck_size": config.bottleneck_size,
                "target_modules": _hf_targets(model, name, config), "non_linearity": config.non_linearity,
                "adapter_dropout": config.adapter_dropout, "modules_to_save": _hf_modules_to_save(model, name),
                "trainable_token_indices": _hf_token_indices(model, name), "library": "lmforge"}  # fmt: skip
    prompt_common = {**common, "num_virtual_tokens": config.num_virtual_tokens, "num_layers": c.n_layer,
                     "num_transformer_submodules": 1, "modules_to_save": None}  # fmt: skip
    if isinstance(config, PrefixConfig):
        return {"peft_type": "PREFIX_TUNING", **prompt_common, "token_dim": c.n_kv_head * c.head_dim,
                "num_attention_heads": c.n_kv_head, "encoder_hidden_size": config.encoder_hidden_size,
                "prefix_projection": False}  # saved projected: a plain table  # fmt: skip
    if isinstance(config, PromptConfig):
        return {"peft_type": "PROMPT_TUNING", **prompt_common, "token_dim": c.n_embd,
                "num_attention_heads": c.n_head, "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}  # fmt: skip
    raise AdapterError(f"adapter {name!r}: unknown config {type(config).__name__}")


def _fused_patterns(model, name: str, config: LoraConfig) -> tuple[dict, dict]:
    ranks, alphas = {}, {}
    for key, t in _tensors_for(model, name).items():
        m = re.match(rf"{re.escape(PREFIX)}(transformer\.h\.\d+\.attn\.c_attn)\.lora_A\.weight$", key)
        if m is None:
            continue
        r = t.shape[0]
        if r != config.r:
            ranks[re.escape(m.group(1))] = r
            alphas[re.escape(m.group(1))] = config.lora_alpha * (
                math.sqrt(r / config.r) if config.use_rslora else r / config.r
            )
    return ranks, alphas


def save_adapter(model, out_dir: str | Path, adapter_name: str = DEFAULT, base_model_path: str | None = None,
                 tokenizer=None) -> Path:  # fmt: skip
    """Write adapter `adapter_name` as a PEFT folder (and the tokenizer, when given, beside it)."""
    from safetensors.torch import save_file

    from lmforge.model.hf import _atomic, write_text_atomic

    if adapter_name not in getattr(model, "peft_config", {}):
        raise AdapterError(f"the model has no adapter {adapter_name!r} (it has {adapter_names(model)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_for(model, adapter_name)
    config = adapter_config_dict(model, adapter_name, base_model_path)
    _atomic(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


# --------------------------------------------------------------------------------------------------
# Loading


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT folder; pickles are refused."""
    from lmforge.model.hf import read_safetensors

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from None
    if not (path / WEIGHTS_FILE).is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{path}: only adapter_model.bin (a pickle) found; lmforge refuses to unpickle files because "
                "loading a pickle can run arbitrary code. Save the adapter with safetensors."
            )
        raise AdapterError(f"{path}: no {WEIGHTS_FILE}")
    return config, read_safetensors([path / WEIGHTS_FILE])


def _strip(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def load_adapter(model, path: str | Path, adapter_name: str = DEFAULT) -> str:
    """Load a PEFT adapter folder (LoRA/DoRA, prompt tuning, prefix tuning) or an lmforge bottleneck
    adapter onto `model` as `adapter_name`, and make it the active adapter. Returns the name."""
    path = Path(path)
    config, tensors = read_adapter(path)
    kind = config.get("peft_type")
    if adapter_name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}")
    _grow_vocabulary(model, path, config)
    if kind == "LORA":
        _load_lora(model, config, tensors, adapter_name, path)
    elif kind == "BOTTLENECK":
        _load_bottleneck(model, config, tensors, adapter_name, path)
    elif kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        _load_virtual(model, config, tensors, adapter_name, path, kind)
    else:
        raise AdapterError(
            f"{path}: peft_type {kind!r} is not supported (LORA, PROMPT_TUNING, PREFIX_TUNING, BOTTLENECK)"
        )
    set_adapter(model, adapter_name)
    return adapter_name


def _grow_vocabulary(model, path: Path, config: dict) -> None:
    """An adapter trained with new tokens needs the embeddings grown first (mean-initialised rows; the
    trained rows come with the adapter)."""
    from lmforge.tokenizer_train import resize_embeddings

    want = model.config.vocab_size
    if (path / "tokenizer.json").is_file():
        from lmforge.tokenizer import Tokenizer

        want = max(want, Tokenizer.from_dir(path).vocab_size)
    indices = config.get("trainable_token_indices")
    if indices:
        flat = indices if isinstance(indices, list) else [i for v in indices.values() for i in v]
        want = max(want, max(flat) + 1)
    if want > model.config.vocab_size:
        head = model.lm_head
        inner = getattr(head, "base_layer", getattr(head, "original_module", head))
        if inner is not head or not isinstance(model.embed_tokens, nn.Embedding):
            raise AdapterError(f"{path}: needs {want} embeddings; load it before other adapters")
        resize_embeddings(model, want)


def _load_lora(model, config: dict, tensors: dict[str, torch.Tensor], name: str, path: Path) -> None:
    mt = _model_type(model)
    if config.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias=true is not supported")
    if any(".lora_embedding_A" in k for k in tensors):
        raise AdapterError(f"{path}: LoRA on embedding layers is not supported (use trainable tokens)")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = _strip(key)
        m = re.match(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$", k)
        if m is not None:
            modules.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        m = re.match(r"(.+)\.token_adapter\.trainable_tokens_delta$", k)
        if m is not None:
            tokens[from_hf_module(m.group(1), mt)] = t
            continue
        module, _, param = k.rpartition(".")
        extras.setdefault(module, {})[param] = t
    alpha = float(config.get("lora_alpha", 8))
    r_default = int(config.get("r", 8))
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    dora = bool(config.get("use_dora", False))
    targets, ranks, alphas = [], {}, {}
    plan: list[tuple[str, str, dict, slice | None]] = []  # (our path, hf path, tensors, B rows)
    for hf, parts in modules.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise AdapterError(f"{path}: {hf} lacks lora_A or lora_B")
        ours = from_hf_module(hf, mt)
        r = parts["lora_A.weight"].shape[0]
        a = float(_pattern_value(hf, alpha_pattern, alpha))
        if ours.endswith(".qkv"):  # GPT-2 c_attn -> q, k, v sharing A
            layer = ours[: -len(".qkv")]
            row = 0
            for letter in "qkv":
                p = f"{layer}.{letter}_proj"
                n = model.get_submodule(p).out_features
                plan.append((p, hf, parts, slice(row, row + n)))
                targets.append(p)
                ranks[re.escape(p)], alphas[re.escape(p)] = r, a
                row += n
        else:
            plan.append((ours, hf, parts, None))
            targets.append(ours)
            ranks[re.escape(ours)], alphas[re.escape(ours)] = r, a
    modules_to_save = [from_hf_module(m, mt) for m in extras] or None
    if "score" in extras and getattr(model, "score", None) is None:  # a SEQ_CLS adapter: the head it trained
        from lmforge.finetune.classify import add_classification_head

        add_classification_head(model, extras["score"]["weight"].shape[0])
    token_indices = config.get("trainable_token_indices")
    if isinstance(token_indices, dict):
        token_indices = {from_hf_module(_full_embed_name(k, mt), mt): v for k, v in token_indices.items()}
    lora_config = LoraConfig(r=r_default, lora_alpha=alpha, lora_dropout=float(config.get("lora_dropout", 0.0)),
                             target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
                             use_rslora=rslora, use_dora=dora, rank_pattern=ranks, alpha_pattern=alphas,
                             modules_to_save=modules_to_save, trainable_token_indices=token_indices)  # fmt: skip
    try:
        add_lora(model, lora_config, name)
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None
    with torch.no_grad():
        for ours, hf, parts, rows in plan:
            layer = model.get_submodule(ours)
            _copy(layer.lora_A[name].weight, parts["lora_A.weight"], f"{hf}.lora_A", path)
            B = parts["lora_B.weight"] if rows is None else parts["lora_B.weight"][rows]
            _copy(layer.lora_B[name].weight, B, f"{hf}.lora_B", path)
            if dora:
                if "lora_magnitude_vector" not in parts:
                    raise AdapterError(f"{path}: use_dora but {hf} has no lora_magnitude_vector")
                m = parts["lora_magnitude_vector"]
                _copy(
                    layer.lora_magnitude_vector[name].weight,
                    m if rows is None else m[rows],
                    f"{hf}.magnitude",
                    path,
                )
        for module, params in extras.items():
            wrapper = model.get_submodule(from_hf_module(module, mt))
            target = wrapper.modules_to_save[name]
            for key, t in params.items():
                _copy(target.get_parameter(key), t, f"{module}.{key}", path)
        for module, t in tokens.items():
            layer = model.get_submodule(module)
            _copy(layer.trainable_tokens_delta[name], t, f"{module}.trainable_tokens_delta", path)
    lora_config.target_modules = targets
    register_config(model, name, lora_config)


def _full_embed_name(leaf: str, mt: str) -> str:
    if mt == "gpt2":
        return {"wte": "transformer.wte", "lm_head": "lm_head"}.get(leaf, leaf)
    return {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}.get(leaf, leaf)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str, path: Path) -> None:
    if dst.shape != src.shape:
        raise AdapterError(f"{path}: {what} has shape {tuple(src.shape)}, the model needs {tuple(dst.shape)}")
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def _load_bottleneck(model, config: dict, tensors, name: str, path: Path) -> None:
    mt = _model_type(model)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = _strip(key)
        m = re.match(r"(.+)\.(adapter_down|adapter_up)\.(weight|bias)$", k)
        if m is not None:
            modules.setdefault(from_hf_module(m.group(1), mt), {})[f"{m.group(2)}.{m.group(3)}"] = t
        else:
            module, _, param = k.rpartition(".")
            extras.setdefault(module, {})[param] = t
    size = next(iter(modules.values()))["adapter_down.weight"].shape[0]
    bn = BottleneckConfig(bottleneck_size=size, target_modules="^(" + "|".join(map(re.escape, modules)) + ")$",
                          non_linearity=config.get("non_linearity", "gelu"),
                          adapter_dropout=float(config.get("adapter_dropout", 0.0)), train_norms=False,
                          modules_to_save=[from_hf_module(m, mt) for m in extras] or None)  # fmt: skip
    add_bottleneck(model, bn, name)
    with torch.no_grad():
        for ours, parts in modules.items():
            layer = model.get_submodule(ours)
            for key, t in parts.items():
                part, param = key.split(".")
                _copy(getattr(getattr(layer, part)[name], param), t, f"{ours}.{key}", path)
        for module, params in extras.items():
            target = model.get_submodule(from_hf_module(module, mt)).modules_to_save[name]
            for key, t in params.items():
                _copy(target.get_parameter(key), t, f"{module}.{key}", path)
    register_config(model, name, bn)


def _load_virtual(model, config: dict, tensors, name: str, path: Path, kind: str) -> None:
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{path}: no prompt_embeddings tensor")
    table = tensors["prompt_embeddings"]
    P = int(config.get("num_virtual_tokens", table.shape[0]))
    if int(config.get("num_transformer_submodules", 1)) != 1:
        raise AdapterError(f"{path}: num_transformer_submodules != 1 (an encoder-decoder adapter)")
    if kind == "PROMPT_TUNING":
        cfg = PromptConfig(num_virtual_tokens=P, init="normal")
        add_prompt_tuning(model, cfg, name)
        target = model.prefix.adapters_by_name[name].embedding.weight
    else:
        cfg = PrefixConfig(num_virtual_tokens=P, init="normal")
        add_prefix_tuning(model, cfg, name)
        module: PrefixKV = model.prefix.adapters_by_name[name]
        target = module.embedding.weight
    with torch.no_grad():
        _copy(target, table, "prompt_embeddings", path)
    register_config(model, name, cfg)


def adapter_kind(config) -> str:
    return {
        LoraConfig: "lora",
        BottleneckConfig: "adapter",
        PrefixConfig: "prefix",
        PromptConfig: "prompt",
    }.get(type(config), "unknown")


def parse_adapter_spec(spec: str) -> tuple[str | None, Path]:
    """`DIR` -> (None, DIR); `NAME=DIR` -> (NAME, DIR) (a folder whose own name holds "=" stays a DIR)."""
    if "=" in spec and not Path(spec).is_dir():
        name, _, directory = spec.partition("=")
        if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise AdapterError(f"--adapter {spec!r}: NAME must be letters, digits, '_', '-' or '.'")
        return name, Path(directory)
    return None, Path(spec)


def apply_adapters(model, specs: list[str]) -> list[str]:
    """Load adapters given as `DIR` or `NAME=DIR` (as `--adapter` takes them) and activate all of them
    (their updates add up). Unnamed ones are called `default`, `adapter2`, `adapter3`, ... Returns the names."""
    names = []
    for i, spec in enumerate(specs):
        name, directory = parse_adapter_spec(spec)
        if name is None:
            name = DEFAULT if DEFAULT not in names else f"adapter{i + 1}"
        if not directory.is_dir():
            raise AdapterError(f"--adapter {spec!r}: {directory} is not a folder")
        load_adapter(model, directory, name)
        names.append(name)
    if names:
        set_adapter(model, names)
    return names


def adapter_tokenizer(specs: list[str], tokenizer=None):
    """The tokenizer to use with these adapters: one saved in an adapter folder that extends the vocabulary
    (domain tokens) wins over the base's `tokenizer`; otherwise `tokenizer` itself."""
    from lmforge.tokenizer import Tokenizer

    best = tokenizer
    for spec in specs:
        _, directory = parse_adapter_spec(spec)
        if (directory / "tokenizer.json").is_file():
            candidate = Tokenizer.from_dir(directory)
            if best is None or candidate.vocab_size > best.vocab_size:
                best = candidate
    return best
