"""Multi-adapter serving: several adapters over one base model, chosen per request by the `model` field.

The engine needs one thing of adapters: `activate(name)` switches the model to adapter `name` (None: the
base model) before a forward. Rows of different adapters are decoded in separate forwards (the engine
keeps each adapter's rows together), so adapters that replace `nn.Linear` modules in place and switch by
name work unchanged; the base weights are loaded once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class AdapterError(Exception):
    pass


@dataclass
class AdapterSet:
    """Named adapters already placed on a model, and the switch between them."""

    names: list[str] = field(default_factory=list)
    activate: Callable[[str | None], None] = lambda name: None
    paths: dict[str, Path] = field(default_factory=dict)


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """["sql=out/lora-sql", ...] -> {"sql": Path("out/lora-sql")}; names are unique and non-empty."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise AdapterError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise AdapterError(f"--adapter {name!r} is given twice")
        out[name] = Path(path)
    return out


def load_adapters(model, specs: dict[str, Path]) -> AdapterSet:
    """Load PEFT adapter folders (LoRA/DoRA, bottleneck, prefix/prompt tuning) onto `model` once, each
    under its name, with lmforge.finetune; `activate(name)` is `set_adapter(model, name)`."""
    if not specs:
        return AdapterSet()
    for name, path in specs.items():
        if not Path(path).is_dir():
            raise AdapterError(f"adapter {name!r}: {path}: no such folder")
    from lmforge.finetune import load_adapter, set_adapter

    for name, path in specs.items():
        try:
            load_adapter(model, path, adapter_name=name)
        except ValueError as e:  # finetune's AdapterError is a ValueError
            raise AdapterError(f"adapter {name!r}: {e}") from None
    model.eval()  # adapter dropout off

    def activate(name: str | None) -> None:
        set_adapter(model, name)

    activate(None)
    return AdapterSet(list(specs), activate, dict(specs))
