"""Training configuration: plain dataclasses, loaded from YAML, any key overridable as `--section.key=value`.

    model:      preset + any `lmforge.config.Config` field (n_layer, vocab_size, ...)
    data:       token shards folder (or synthetic tokens), sequence length
    train:      optimiser, schedule, batch, precision, evaluation, checkpoints
    dist:       ddp | fsdp
    objective:  name + the objective's own fields (chunk_size, ...)

Override values are parsed as YAML scalars (`40`, `3e-4`, `true`, `null`, `[0.9, 0.95]`) and then
coerced to the field's type, so `--train.lr=3e-4` is a float even though YAML 1.1 reads it as text.
This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad training config: the message names the key."""


@dataclass
class ModelSection:
    preset: str = "tiny-llama"  # a name from lmforge.config.PRESETS
    init_from: str | None = None  # a HF checkpoint folder to start from (continued pretraining)
    dropout: float | None = None  # sets attn_dropout, resid_dropout and embd_dropout at once
    config: dict[str, Any] = field(default_factory=dict)  # Config overrides, written flat in YAML


@dataclass
class DataSection:
    path: str | None = None  # folder of token shards: {split}.bin + meta.json; wins over synthetic
    synthetic: bool = False  # without a path: a generated corpus of repeated phrases (smoke tests)
    synthetic_tokens: int = 200_000  # size of the synthetic training split
    seq_len: int = 256  # tokens per training sequence (windows of seq_len + 1)
    train_split: str = "train"  # {train_split}.bin is read for training
    val_split: str | None = None  # null -> "val" or "validation", whichever exists; none -> no eval
    seed: int | None = None  # data order; null -> train.seed
    mask_documents: bool = False  # attend within each document only; positions restart after EOS


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # sequences per rank per forward
    grad_accum_steps: int = 1  # global batch = micro_batch_size * grad_accum_steps * world_size
    lr: float = 3e-4  # peak learning rate, reached after warmup
    min_lr: float = 3e-5  # the cosine decays to this
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps
    lr_decay_steps: int | None = None  # cosine reaches min_lr here; null -> max_steps
    weight_decay: float = 0.1  # decoupled (AdamW); never on norms, biases, embeddings
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    grad_clip: float | None = 1.0  # max global grad norm; null or 0 = no clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (+ GradScaler) autocast; auto = bf16 on CUDA
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile forward + loss (under DDP the model, under FSDP2 its blocks)
    seed: int = 0  # model init, dropout (seed + rank) and, unless data.seed, data order
    device: str = "auto"  # auto | cpu | cuda | mps
    eval_every: int = 100  # steps; 0 = only at the end
    eval_sequences: int = 256  # validation windows per evaluation: the first N, whatever the world size
    save_every: int = 500  # steps; 0 = only at the end
    keep_last: int = 3  # complete checkpoints kept
    progress: bool = True  # a tqdm bar on rank 0
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)


@dataclass
class DistSection:
    strategy: str = "ddp"  # ddp | fsdp (FSDP2: fully_shard per block, then the root)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3) or not


@dataclass
class ObjectiveSection:
    name: str = "causal_lm"  # a key of lmforge.train.objectives.OBJECTIVES
    options: dict[str, Any] = field(default_factory=dict)  # the objective's fields, written flat in YAML


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    out_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict in the YAML layout (model and objective options written flat)."""
        d = dataclasses.asdict(self)
        model = d["model"]
        model.update(model.pop("config"))
        objective = d["objective"]
        objective.update(objective.pop("options"))
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "dist": DistSection,
    "objective": ObjectiveSection,
}
# The section field that collects keys the section does not declare itself.
_FLAT = {"model": "config", "objective": "options"}


def _model_fields() -> dict[str, Any]:
    from lmforge.config import Config

    return typing.get_type_hints(Config)


def _objective_fields() -> dict[str, Any]:
    from lmforge.train.objectives import OBJECTIVES

    hints: dict[str, Any] = {}
    for cls in OBJECTIVES.values():
        hints.update(typing.get_type_hints(cls))
    return hints


def _extra_fields(section: str) -> dict[str, Any]:
    return _model_fields() if section == "model" else _objective_fields()


def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field of a dataclass's source: the help text, written once."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", source, flags=re.MULTILINE)
    return dict(found)


def config_keys() -> list[tuple[str, Any, Any, str]]:
    """Every dotted key a config accepts: [("train.lr", float, 3e-4, help), ...]."""
    from lmforge.config import Config
    from lmforge.train.objectives import OBJECTIVES

    keys: list[tuple[str, Any, Any, str]] = [("out_dir", str | None, None, "the run folder")]
    for name, cls in SECTIONS.items():
        hints, comments = typing.get_type_hints(cls), _field_comments(cls)
        for f in dataclasses.fields(cls):
            if _FLAT.get(name) != f.name:
                keys.append((f"{name}.{f.name}", hints[f.name], f.default, comments.get(f.name, "")))
        if name in _FLAT:
            own = {f.name for f in dataclasses.fields(cls)}
            sources = [Config] if name == "model" else list(OBJECTIVES.values())
            comments = {k: v for c in sources for k, v in _field_comments(c).items()}
            what = "lmforge.config.Config field" if name == "model" else "objective option"
            for key, hint in _extra_fields(name).items():
                if key not in own and key != "name":
                    keys.append((f"{name}.{key}", hint, None, comments.get(key) or what))
    return keys


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint; text becomes a number where the field is numeric."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(v, item, key) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)} - {_FLAT.get(name)}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in values.items():
        if key in own:
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        elif name in _FLAT:
            allowed = _extra_fields(name)
            if key not in allowed:
                what = "lmforge.config.Config field" if name == "model" else "objective option"
                raise ConfigError(f"{name}.{key}: unknown key (neither a {name} setting nor a {what})")
            extra[key] = _coerce(value, allowed[key], f"{name}.{key}")
        else:
            known = ", ".join(sorted(own))
            raise ConfigError(f"{name}.{key}: unknown key; {name} accepts {known}")
    if name in _FLAT:
        kwargs[_FLAT[name]] = extra
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and type-check a TrainConfig from the nested YAML layout."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"a training config is a mapping of sections, got {type(values).__name__}")
    unknown = sorted(set(values) - set(SECTIONS) - {"out_dir"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}, out_dir")
    sections = {name: _build_section(name, values.get(name) or {}) for name in SECTIONS}
    out_dir = values.get("out_dir")
    cfg = TrainConfig(**sections, out_dir=None if out_dir is None else _coerce(out_dir, str, "out_dir"))
    validate(cfg)
    return cfg


def parse_overrides(args: list[str] | dict[str, Any]) -> dict[str, Any]:
    """`["--train.lr=3e-4", "--data.synthetic", "true"]` or `{"train.lr": 3e-4}` -> {"train.lr": "3e-4", ...}."""
    if isinstance(args, dict):
        return dict(args)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"expected --section.key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            value = args[i + 1]
            i += 1
        out[key] = yaml.safe_load(value) if isinstance(value, str) else value
        i += 1
    return out


def apply_overrides(
    values: dict[str, Any],
    overrides: dict[str, Any],
    sections: tuple[str, ...] | None = None,
    scalars: tuple[str, ...] = ("out_dir",),
) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); values given as text are parsed as YAML scalars.
    A key must start with one of `sections` (default: the training config's) or be one of `scalars`."""
    import copy

    sections = tuple(SECTIONS) if sections is None else sections
    values = copy.deepcopy(values or {})
    for key, value in overrides.items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else value
        parts = key.split(".")
        if parts[0] not in sections and not (len(parts) == 1 and parts[0] in scalars):
            raise ConfigError(f"--{key}: unknown key; expected one of {', '.join([*scalars, *sections])}")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is not a section")
        node[parts[-1]] = value
    return values


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML config file as a dict ({} for None), with one-line errors naming the file."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply `--section.key=value` overrides."""
    values = read_yaml(path)
    if overrides:
        values = apply_overrides(values, parse_overrides(overrides))
    return config_from_dict(values)


def validate(cfg: TrainConfig) -> None:
    t, d = cfg.train, cfg.data
    checks = [
        (t.max_steps >= 0, "train.max_steps must be >= 0"),
        (t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (t.lr >= 0 and t.min_lr >= 0, "train.lr and train.min_lr must be >= 0"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.precision in ("fp32", "bf16", "fp16", "auto"), "train.precision must be fp32, bf16, fp16 or auto"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.eval_every >= 0 and t.save_every >= 0, "train.eval_every and train.save_every must be >= 0"),
        (t.eval_sequences >= 1, "train.eval_sequences must be >= 1"),
        (d.seq_len >= 1, "data.seq_len must be >= 1"),
        (cfg.dist.strategy in ("ddp", "fsdp"), "dist.strategy must be ddp or fsdp"),
        (cfg.dist.backend in ("auto", "nccl", "gloo"), "dist.backend must be auto, nccl or gloo"),
        (
            d.path is not None or d.synthetic,
            "data: give data.path (a folder of token shards) or data.synthetic: true",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from lmforge.train.objectives import OBJECTIVES

    if cfg.objective.name not in OBJECTIVES:
        raise ConfigError(f"objective.name={cfg.objective.name!r}; known objectives: {', '.join(OBJECTIVES)}")
