"""Pretraining: token shards, objectives, and one training loop (single process, DDP or FSDP2).

    from lmforge.train import load_config, train
    result = train(load_config("recipes/tiny.yaml", ["--train.max_steps=100"]), out_dir="runs/tiny")

The heavy modules (torch) load on first use, so `lmforge --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "lmforge.train.config",
    "ConfigError": "lmforge.train.config",
    "load_config": "lmforge.train.config",
    "config_from_dict": "lmforge.train.config",
    "write_token_shards": "lmforge.train.dataset",
    "open_split": "lmforge.train.dataset",
    "read_meta": "lmforge.train.dataset",
    "TokenWindows": "lmforge.train.dataset",
    "TrainBatches": "lmforge.train.dataset",
    "Objective": "lmforge.train.objectives",
    "CausalLM": "lmforge.train.objectives",
    "OBJECTIVES": "lmforge.train.objectives",
    "train": "lmforge.train.trainer",
    "TrainResult": "lmforge.train.trainer",
    "latest_checkpoint": "lmforge.train.checkpoint",
    "read_metrics": "lmforge.train.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.train' has no attribute {name!r}")
