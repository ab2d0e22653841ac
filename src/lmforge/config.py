"""Model configuration: one dataclass for every decoder family, named presets, and HF `config.json` I/O.

A family differs by fields, not by classes (the litgpt habit): GPT-2 is `norm="layernorm", mlp="gelu",
pos_emb="learned"`; Llama/Mistral/Qwen2/SmolLM are `norm="rmsnorm", mlp="swiglu", pos_emb="rope"` with
different biases, head counts and rope settings. Every field is a plain value, so a config round-trips
through JSON/YAML. This module imports no torch, so `lmforge --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: HF `model_type` values whose checkpoints load with exact numerical parity.
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")


@dataclass
class Config:
    """Hyper-parameters of a decoder-only transformer.

    Shapes use: V vocab, D `n_embd`, H `n_head` query heads, G `n_kv_head` key/value heads
    (G == H multi-head, 1 < G < H grouped-query, G == 1 multi-query), hd `head_dim`, F `intermediate_size`.
    """

    name: str = "custom"
    model_type: str = "llama"  # the HF family used for checkpoint key maps
    vocab_size: int = 32000
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (multi-head attention)
    head_dim: int | None = None  # None -> n_embd // n_head
    intermediate_size: int | None = None  # None -> 4 * n_embd (gelu) or the Llama 2/3*4D rule (swiglu)
    max_seq_len: int = 2048  # HF max_position_embeddings / n_positions
    # positions: "rope" (rotary), "learned" (absolute table), "sinusoidal" (Vaswani et al.), "none"
    pos_emb: str = "rope"
    rope_theta: float = 10000.0
    # HF rope scaling dict, e.g. {"rope_type": "llama3", "factor": 32.0, ...}; None -> plain RoPE
    rope_scaling: dict[str, Any] | None = None
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # "swiglu" (gate/up/down) | "gelu" (up/down)
    activation: str = "silu"  # "silu" for swiglu; "gelu_new" (tanh approx, GPT-2) or "gelu" for the gelu MLP
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None  # attend to at most this many most recent tokens (itself included)
    # per-layer "full_attention" | "sliding_attention"; None -> every layer slides when sliding_window is set
    layer_types: list[str] | None = None
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra_hf: dict[str, Any] = field(default_factory=dict)  # HF fields we carry but do not interpret

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp == "swiglu":  # Llama's rule: 2/3 of 4D, rounded up to a multiple of 256
                hidden = int(2 * 4 * self.n_embd / 3)
                self.intermediate_size = 256 * ((hidden + 255) // 256)
            else:
                self.intermediate_size = 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        for name, value, allowed in (
            ("pos_emb", self.pos_emb, ("rope", "learned", "sinusoidal", "none")),
            ("norm", self.norm, ("rmsnorm", "layernorm")),
            ("mlp", self.mlp, ("swiglu", "gelu")),
        ):
            if value not in allowed:
                raise ValueError(f"config field {name}={value!r}: expected one of {', '.join(allowed)}")
        if self.layer_types is not None and len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for n_layer={self.n_layer}")

    # ----------------------------------------------------------------------------------------------
    def window_for_layer(self, i: int) -> int | None:
        """The sliding window of layer i, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def context_limit(self) -> int | None:
        """Most tokens a sequence may hold: a learned position table ends at max_seq_len, and so does
        plain or statically scaled RoPE by convention; dynamic NTK RoPE exists to run past it."""
        if self.pos_emb == "rope" and (self.rope_scaling or {}).get("rope_type") == "dynamic":
            return None
        return self.max_seq_len

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A named preset, with keyword overrides: `Config.from_name("llama-3.2-1b", n_layer=2)`."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        values = dict(PRESETS[key])
        values.update(overrides)
        values.setdefault("name", key)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    # ----------------------------------------------------------------------------------------------
    # Hugging Face config.json
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> Config:
        """Build from a HF `config.json` (a path to the file or its folder, or the parsed dict)."""
        if isinstance(source, dict):
            hf, where = source, "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no config.json found")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            where = str(path)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            if model_type == "gpt2":
                return _from_hf_gpt2(hf)
            return _from_hf_llama_like(hf)
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that `transformers.AutoConfig` reads back into the same model."""
        if self.model_type == "gpt2":
            return _to_hf_gpt2(self)
        if self.model_type in ("llama", "mistral", "qwen2"):
            return _to_hf_llama_like(self)
        raise ValueError(
            f"model_type {self.model_type!r} cannot be saved in HF format; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


# --------------------------------------------------------------------------------------------------
# HF <-> Config, one function per direction and family.


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """transformers v5 keeps rope settings in `rope_parameters`; v4 in `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # older spelling
        scaling["rope_type"] = scaling.pop("type")
    if not scaling or scaling.get("rope_type", "default") == "default":
        return theta, None
    if scaling["rope_type"] not in ("linear", "dynamic", "llama3"):
        raise ValueError(f"rope type {scaling['rope_type']!r} is not supported (linear, dynamic, llama3 are)")
    return theta, scaling


def _from_hf_llama_like(hf: dict[str, Any]) -> Config:
    model_type = hf["model_type"]
    n_head = hf["num_attention_heads"]
    n_embd = hf["hidden_size"]
    theta, scaling = _rope_from_hf(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported for {model_type} (silu is)")
    sliding_window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if model_type == "qwen2":
        # Qwen2 only slides when use_sliding_window is set, and then from layer max_window_layers on
        if not hf.get("use_sliding_window", False):
            sliding_window, layer_types = None, None
        elif layer_types is None:
            first = hf.get("max_window_layers", hf["num_hidden_layers"])
            layer_types = [
                "sliding_attention" if i >= first else "full_attention"
                for i in range(hf["num_hidden_layers"])
            ]
    elif model_type == "llama":
        sliding_window, layer_types = None, None
    if layer_types is not None and all(t == "full_attention" for t in layer_types):
        sliding_window, layer_types = None, None
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    return Config(
        name=hf.get("_name_or_path") or model_type,
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or n_embd // n_head,
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        pos_emb="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        activation="silu",
        qkv_bias=qkv_bias,
        attn_out_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        layer_types=list(layer_types) if layer_types is not None else None,
        attn_dropout=float(hf.get("attention_dropout", 0.0)),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def _to_hf_llama_like(c: Config) -> dict[str, Any]:
    if c.norm != "rmsnorm" or c.mlp != "swiglu" or c.pos_emb != "rope":
        raise ValueError(f"a {c.model_type} checkpoint needs norm=rmsnorm, mlp=swiglu, pos_emb=rope")
    rope_parameters: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling:
        rope_parameters.update(c.rope_scaling)
    hf: dict[str, Any] = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
                c.model_type
            ]
        ],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # v4 readers
        "rope_scaling": c.rope_scaling,  # v4 readers
        "rope_parameters": rope_parameters,  # v5 readers
        "tie_word_embeddings": c.tie_embeddings,
        "attention_dropout": c.attn_dropout,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if c.model_type == "qwen2":
        if not (c.qkv_bias and not c.attn_out_bias and not c.mlp_bias):
            raise ValueError("a qwen2 checkpoint has q/k/v biases and no other biases")
        hf["use_sliding_window"] = c.sliding_window is not None
        hf["sliding_window"] = c.sliding_window
        types = c.layer_types or ["sliding_attention" if c.sliding_window else "full_attention"] * c.n_layer
        hf["layer_types"] = types
        first_sliding = next((i for i, t in enumerate(types) if t == "sliding_attention"), c.n_layer)
        hf["max_window_layers"] = first_sliding
    else:
        if c.qkv_bias != c.attn_out_bias:
            raise ValueError(f"a {c.model_type} checkpoint has biases on all of q/k/v/o or none")
        hf["attention_bias"] = c.qkv_bias
        if c.model_type == "llama":
            hf["mlp_bias"] = c.mlp_bias
            if c.sliding_window is not None:
                raise ValueError("llama has no sliding window; use model_type=mistral")
        else:
            if c.mlp_bias or c.layer_types is not None:
                raise ValueError("a mistral checkpoint has no MLP bias and one window for all layers")
            hf["sliding_window"] = c.sliding_window
    return hf


def _from_hf_gpt2(hf: dict[str, Any]) -> Config:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r} is not supported for gpt2 (gelu_new, gelu are)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"gpt2 option {flag}=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise ValueError("gpt2 option scale_attn_weights=false is not supported")
    n_embd = hf["n_embd"]
    return Config(
        name=hf.get("_name_or_path") or "gpt2",
        model_type="gpt2",
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_embd=n_embd,
        n_head=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        max_seq_len=hf.get("n_positions", 1024),
        pos_emb="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        activation="gelu_new" if act == "gelu_pytorch_tanh" else act,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        attn_dropout=hf.get("attn_pdrop", 0.0),
        resid_dropout=hf.get("resid_pdrop", 0.0),
        embd_dropout=hf.get("embd_pdrop", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def _to_hf_gpt2(c: Config) -> dict[str, Any]:
    if not (c.norm == "layernorm" and c.mlp == "gelu" and c.pos_emb == "learned" and c.tie_embeddings):
        raise ValueError("a gpt2 checkpoint needs norm=layernorm, mlp=gelu, pos_emb=learned, tied embeddings")
    if c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.n_embd:
        raise ValueError("a gpt2 checkpoint needs multi-head attention with head_dim = n_embd / n_head")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.intermediate_size,
        "n_positions": c.max_seq_len,
        "n_ctx": c.max_seq_len,
        "activation_function": c.activation,
        "layer_norm_epsilon": c.norm_eps,
        "attn_pdrop": c.attn_dropout,
        "resid_pdrop": c.resid_dropout,
        "embd_pdrop": c.embd_dropout,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------------
# Named presets. Each real one mirrors the HF config.json of the checkpoint named in its comment.

_LLAMA = dict(model_type="llama", pos_emb="rope", norm="rmsnorm", mlp="swiglu", activation="silu")
_GPT2 = dict(
    model_type="gpt2", pos_emb="learned", norm="layernorm", mlp="gelu", activation="gelu_new",
    qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, vocab_size=50257,
    max_seq_len=1024, bos_token_id=50256, eos_token_id=50256,
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/openai-community/gpt2/blob/main/config.json
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    # https://huggingface.co/openai-community/gpt2-medium/blob/main/config.json
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    # https://huggingface.co/openai-community/gpt2-large/blob/main/config.json
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    "llama-2-7b": dict(
        _LLAMA, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008,
        max_seq_len=4096, norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    ),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    "llama-3.2-1b": dict(
        _LLAMA, vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, head_dim=64,
        intermediate_size=8192, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001,
    ),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama-3.1-8b": dict(
        _LLAMA, vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
        max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001,
    ),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
    "smollm2-135m": dict(
        _LLAMA, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
        max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    ),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json
    "smollm2-360m": dict(
        _LLAMA, vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560,
        max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    ),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    "qwen2.5-0.5b": dict(
        _LLAMA, model_type="qwen2", vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
        intermediate_size=4864, max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True,
        qkv_bias=True, bos_token_id=151643, eos_token_id=151643,
    ),
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "mistral-7b": dict(
        _LLAMA, model_type="mistral", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
        intermediate_size=14336, max_seq_len=32768, norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
        bos_token_id=1, eos_token_id=2,
    ),
    # Tiny presets for tests and laptops: same families, a few hundred thousand parameters.
    "tiny-llama": dict(
        _LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128,
        max_seq_len=256, rope_theta=10000.0,
    ),
    "tiny-gpt2": dict(_GPT2, vocab_size=512, n_layer=2, n_head=4, n_embd=64, max_seq_len=256,
                      bos_token_id=None, eos_token_id=None),
    "tiny-mistral": dict(
        _LLAMA, model_type="mistral", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
        intermediate_size=128, max_seq_len=256, sliding_window=16,
    ),
    "tiny-qwen2": dict(
        _LLAMA, model_type="qwen2", vocab_size=512, n_layer=2, n_head=4, n_kv_head=1, n_embd=64,
        intermediate_size=128, max_seq_len=256, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
    ),
}  # fmt: skip
