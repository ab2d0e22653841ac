"""Fine-tuning: supervised/instruction tuning and parameter-efficient methods, interoperable with PEFT.

    from lmforge.finetune import LoraConfig, add_lora, save_adapter, load_adapter, merge_and_unload
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, "out/adapter")          # adapter_config.json + adapter_model.safetensors (PEFT's)

Heavy modules (torch) load on first use, so `lmforge --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoraConfig": "lmforge.finetune.config",
    "LoraLinear": "lmforge.finetune.lora",
    "add_lora": "lmforge.finetune.lora",
    "set_adapter": "lmforge.finetune.lora",
    "use_adapter": "lmforge.finetune.lora",
    "disable_adapters": "lmforge.finetune.lora",
    "delete_adapter": "lmforge.finetune.lora",
    "adapter_names": "lmforge.finetune.lora",
    "active_adapters": "lmforge.finetune.lora",
    "merge": "lmforge.finetune.lora",
    "unmerge": "lmforge.finetune.lora",
    "merge_and_unload": "lmforge.finetune.lora",
    "trainable_parameters": "lmforge.finetune.lora",
    "BottleneckConfig": "lmforge.finetune.config",
    "add_bottleneck": "lmforge.finetune.bottleneck",
    "PrefixConfig": "lmforge.finetune.config",
    "PromptConfig": "lmforge.finetune.config",
    "add_prefix_tuning": "lmforge.finetune.prompt",
    "add_prompt_tuning": "lmforge.finetune.prompt",
    "quantize_base": "lmforge.finetune.quant",
    "Int8Linear": "lmforge.finetune.quant",
    "AdapterError": "lmforge.finetune.peft_io",
    "save_adapter": "lmforge.finetune.peft_io",
    "load_adapter": "lmforge.finetune.peft_io",
    "apply_adapters": "lmforge.finetune.peft_io",
    "adapter_tokenizer": "lmforge.finetune.peft_io",
    "finetune": "lmforge.finetune.run",
    "load_finetune_config": "lmforge.finetune.run",
    "merge_checkpoint": "lmforge.finetune.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.finetune' has no attribute {name!r}")
