"""Load and save a whole checkpoint folder: model, tokenizer and generation settings together.

A folder in Hugging Face layout: config.json, model.safetensors (or shards + index), tokenizer.json,
tokenizer_config.json, generation_config.json. `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read what `save_pretrained` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.model.decoder import Transformer
from lmforge.model.hf import CheckpointError, load_model, save_model
from lmforge.tokenizer import Tokenizer


@dataclass
class Pretrained:
    model: Transformer
    tokenizer: Tokenizer | None
    generation_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def read_generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def load_pretrained(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    require_tokenizer: bool = True,
) -> Pretrained:
    """Model, tokenizer and generation_config.json of a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder")
    model = load_model(path, dtype=dtype, device=device)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(path)
    elif require_tokenizer:
        raise CheckpointError(f"{path}: no tokenizer.json (needed to turn text into tokens)")
    return Pretrained(model, tokenizer, read_generation_config(path), path)


def save_pretrained(model: Transformer, path: str | Path, tokenizer: Tokenizer | None = None) -> None:
    """Write the model (and tokenizer) in Hugging Face layout."""
    save_model(model, path)
    if tokenizer is not None:
        tokenizer.save(path)
