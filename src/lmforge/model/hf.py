"""Hugging Face checkpoints: key maps per family (both directions), safetensors loading and saving.

Our parameter names follow HF Llama's module names without the `model.` prefix, so PEFT tensor names
map one to one. GPT-2 differs: fused q/k/v (`c_attn`) and Conv1D layers that store weights as (in, out).

Weights are read only from safetensors: pickle files (`.bin`, `.pt`, `.pth`, `.ckpt`) can run arbitrary
code when loaded, so they are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.config import Config
from lmforge.model.decoder import Transformer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------------
# Key maps. Each `to_hf` yields (hf_name, tensor) for our state dict; each `from_hf` the reverse.

_GPT2_LAYER = {  # ours (inside layers.{i}.) -> HF (inside h.{i}.)
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
    "self_attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
_GPT2_TOP = {"embed_tokens.weight": "wte.weight", "embed_positions.weight": "wpe.weight", "norm": "ln_f"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _to_hf_llama(sd: dict[str, torch.Tensor], config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in sd.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                yield name, t
        else:
            yield "model." + name, t


def _from_hf_llama(hf: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in hf.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = t
        elif name.startswith("model."):
            out[name[len("model.") :]] = t
        elif not name.endswith("rotary_emb.inv_freq"):  # an old buffer some checkpoints carry
            out[name] = t  # reported as unexpected by the caller
    return out


def _to_hf_gpt2(sd: dict[str, torch.Tensor], config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue  # GPT-2 always ties the head to wte
        m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m is None:
            top = name.rsplit(".", 1)
            hf = _GPT2_TOP.get(name) or f"{_GPT2_TOP[top[0]]}.{top[1]}"
            yield "transformer." + hf, t
            continue
        i, module, kind = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(i), kind), {})[module[-6]] = t
            continue
        hf = f"h.{i}.{_GPT2_LAYER[module]}.{kind}"
        yield "transformer." + hf, (t.t().contiguous() if hf.endswith(_CONV1D) else t)
    for (i, kind), parts in sorted(qkv.items()):
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, D) or (3D,)
        yield f"transformer.h.{i}.attn.c_attn.{kind}", (fused.t().contiguous() if kind == "weight" else fused)


def _from_hf_gpt2(hf: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    inverse_layer = {v: k for k, v in _GPT2_LAYER.items()}
    inverse_top = {v: k for k, v in _GPT2_TOP.items()}
    out = {}
    for name, t in hf.items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied head; old causal-mask buffers
        m = re.match(r"h\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m is None:
            top = name.rsplit(".", 1)
            ours = inverse_top.get(name) or (
                f"{inverse_top[top[0]]}.{top[1]}" if top[0] in inverse_top else name
            )
            out[ours] = t
            continue
        i, module, kind = m.groups()
        if name.endswith(_CONV1D):
            t = t.t()
        if module == "attn.c_attn":
            q, k, v = t.chunk(3, dim=0)
            for letter, part in zip("qkv", (q, k, v)):
                out[f"layers.{i}.self_attn.{letter}_proj.{kind}"] = part.contiguous()
            continue
        if module not in inverse_layer:
            out[name] = t  # reported as unexpected by the caller
            continue
        out[f"layers.{i}.{inverse_layer[module]}.{kind}"] = t.contiguous()
    return out


KEY_MAPS = {
    "gpt2": (_to_hf_gpt2, _from_hf_gpt2),
    "llama": (_to_hf_llama, _from_hf_llama),
    "mistral": (_to_hf_llama, _from_hf_llama),
    "qwen2": (_to_hf_llama, _from_hf_llama),
}


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    to_hf, _ = KEY_MAPS[model.config.model_type]
    return dict(to_hf(model.state_dict(), model.config))


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    _, from_hf = KEY_MAPS[config.model_type]
    return from_hf(hf, config)


# --------------------------------------------------------------------------------------------------
# Files


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, sharded or not; pickle-only folders are refused."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}); lmforge refuses to unpickle files "
            "because loading a pickle can run arbitrary code. Convert the checkpoint to safetensors first."
        )
    raise CheckpointError(f"{folder}: no model.safetensors or {SAFETENSORS_INDEX} found")


def read_safetensors(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return tensors


def check_not_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle files are refused (loading a pickle can run arbitrary code); use safetensors"
        )


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: str | None
) -> torch.dtype:
    """float32 on CPU unless asked (bfloat16 matmuls are slower there); the checkpoint's dtype elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
        return DTYPES[dtype]
    if device.type == "cpu" or checkpoint_dtype not in DTYPES:
        return torch.float32
    return DTYPES[checkpoint_dtype]


def check_weights(path: Path, model, state: dict[str, torch.Tensor], what: str, optional=frozenset()) -> None:
    """Raise a one-line CheckpointError unless `state` has exactly the (meta) model's tensors and shapes."""
    expected = set(model.state_dict()) - set(optional)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match {what}"
            + (f"; missing: {', '.join(missing[:5])}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected[:5])}" if unexpected else "")
        )
    for name, t in state.items():
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, config implies {tuple(want)}")


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """Load a HF-format checkpoint folder (config.json + safetensors) into a `Transformer`."""
    path = Path(path)
    check_not_pickle(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a checkpoint folder with config.json)")
    config = Config.from_hf(path)
    hf_config = json.loads((path / "config.json").read_text())
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device, hf_config.get("torch_dtype") or hf_config.get("dtype"))
    hf_tensors = read_safetensors(safetensors_files(path))
    state = from_hf_state_dict(hf_tensors, config)
    with torch.device("meta"):
        model = Transformer(config)
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    check_weights(path, model, state, f"a {config.model_type} model", tied)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def save_model(model: Transformer, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + model.safetensors (sharded with an index above `max_shard_bytes`) into `path`.

    Each file is written under a temporary name and renamed, so a crash never leaves a half-written file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(model).items()}
    dtype = next(iter(tensors.values())).dtype
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / SAFETENSORS_INDEX]:
        old.unlink(missing_ok=True)  # a previous save with another sharding must not leave stale files
    if len(shards) == 1:
        _atomic(path / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic(path / fname, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(path / SAFETENSORS_INDEX, json.dumps(index, indent=2))
    write_text_atomic(path / "config.json", json.dumps(hf_config, indent=2) + "\n")
    gen = {
        k: hf_config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if hf_config.get(k) is not None
    }
    if gen:
        write_text_atomic(path / "generation_config.json", json.dumps(gen, indent=2) + "\n")


def _atomic(final: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(final: Path, text: str) -> None:
    _atomic(Path(final), lambda tmp: Path(tmp).write_text(text))


# --------------------------------------------------------------------------------------------------
# Encoders (BERT family): `BertModel` / `BertForMaskedLM` checkpoints <-> lmforge.model.encoder.Encoder.
# A BertForMaskedLM checkpoint prefixes the backbone with `bert.`; its decoder is tied to the word embeddings.

_BERT_LAYER = {  # ours (inside layers.{i}.) -> HF (inside encoder.layer.{i}.)
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.o_proj": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "up_proj": "intermediate.dense",
    "down_proj": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
_BERT_TOP = {  # ours -> HF, backbone modules (under `bert.` in BertForMaskedLM)
    "embed_tokens": "embeddings.word_embeddings",
    "embed_positions": "embeddings.position_embeddings",
    "embed_token_types": "embeddings.token_type_embeddings",
    "embed_norm": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
}
_BERT_HEAD = {  # ours -> HF, masked-LM head
    "mlm_head.dense": "cls.predictions.transform.dense",
    "mlm_head.norm": "cls.predictions.transform.LayerNorm",
    "mlm_head.bias": "cls.predictions.bias",
}
_BERT_IGNORED = (  # buffers, tied copies and the next-sentence head, never needed to run the encoder
    "embeddings.position_ids",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
)


def bert_to_hf(sd: dict[str, torch.Tensor], mlm_head: bool) -> dict[str, torch.Tensor]:
    prefix = "bert." if mlm_head else ""
    out = {}
    for name, t in sd.items():
        m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m is not None:
            i, module, kind = m.groups()
            out[f"{prefix}encoder.layer.{i}.{_BERT_LAYER[module]}.{kind}"] = t
        elif name in _BERT_HEAD:
            out[_BERT_HEAD[name]] = t
        else:
            module, kind = name.rsplit(".", 1)
            hf = _BERT_HEAD.get(module) or prefix + _BERT_TOP[module]
            out[f"{hf}.{kind}"] = t
    return out


def bert_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse_layer = {v: k for k, v in _BERT_LAYER.items()}
    inverse = {v: k for k, v in {**_BERT_TOP, **_BERT_HEAD}.items()}
    out = {}
    for name, t in hf.items():
        name = name.removeprefix("bert.")
        if name.endswith(_BERT_IGNORED):
            continue
        name = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        )
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m is not None and m.group(2) in inverse_layer:
            i, module, kind = m.groups()
            out[f"layers.{i}.{inverse_layer[module]}.{kind}"] = t
        elif name in inverse:
            out[inverse[name]] = t
        elif "." in name and name.rsplit(".", 1)[0] in inverse:
            module, kind = name.rsplit(".", 1)
            out[f"{inverse[module]}.{kind}"] = t
        else:
            out[name] = t  # reported as unexpected by the caller
    return out


def load_encoder(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """Load a HF BERT-family folder (config.json + safetensors) into an `Encoder`.

    The pooler and the masked-LM head are built when the checkpoint has their weights.
    """
    from lmforge.model.encoder import Encoder, EncoderConfig

    path = Path(path)
    check_not_pickle(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a checkpoint folder with config.json)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json")
    hf_config = json.loads((path / "config.json").read_text())
    try:
        config = EncoderConfig.from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state = bert_from_hf(read_safetensors(safetensors_files(path)))
    config.pooler = "pooler.weight" in state
    config.mlm_head = "mlm_head.dense.weight" in state
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device, hf_config.get("torch_dtype") or hf_config.get("dtype"))
    with torch.device("meta"):
        model = Encoder(config)
    check_weights(path, model, state, "a BERT encoder")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def save_encoder(model, path: str | Path) -> None:
    """Write config.json + model.safetensors as a HF `BertModel` (or `BertForMaskedLM` with the MLM head)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors = bert_to_hf(sd, model.mlm_head is not None)
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    for old in list(path.glob("model*.safetensors")) + [path / SAFETENSORS_INDEX]:
        old.unlink(missing_ok=True)
    _atomic(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(path / "config.json", json.dumps(hf_config, indent=2) + "\n")
