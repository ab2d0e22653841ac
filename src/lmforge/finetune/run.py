"""`lmforge finetune` as a function: load a checkpoint, apply a method, train with the shared loop, export.

    build:  base checkpoint (+ new domain tokens) -> method (full | lora | dora | adapter | prefix | prompt,
            optionally on an int8 / NF4 base) -> SFT or classification data
    train:  lmforge.train.train with the SFT (or classification) objective; checkpoints of a PEFT run hold
            only the trained tensors; rerunning the same command resumes
    export: out/final (a PEFT adapter folder, or a Hugging Face checkpoint for `full`), metrics.jsonl,
            loss.png, report.md / report.json (trainable-parameter fraction, validation metrics before and
            after, sample generations)

The recipe is YAML (recipes/lora.yaml, recipes/sft.yaml, ...); any key can be overridden on the command
line as --section.key=VALUE, as for `lmforge pretrain`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.finetune.config import BottleneckConfig, LoraConfig, PrefixConfig, PromptConfig
from lmforge.train.config import (
    ConfigError,
    TrainSection,
    _coerce,
    _field_comments,
    apply_overrides,
    parse_overrides,
    read_yaml,
)

METHODS = ("full", "lora", "dora", "adapter", "prefix", "prompt")
TASKS = ("sft", "classification")
# Learning rates that work for each method when the recipe gives none (PEFT's and the papers' examples).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "dora": 2e-4, "adapter": 1e-3, "prefix": 1e-2, "prompt": 3e-2}


@dataclass
class DataOptions:
    path: str | None = None  # training records: JSONL, JSON list or Parquet in TRL's formats
    val_path: str | None = None  # validation records; null -> hold out val_fraction of path
    val_fraction: float = 0.05  # held out (seeded) when there is no val_path
    max_len: int = 512  # tokens per example (longer ones are truncated) and per packed row
    packing: bool = False  # fill rows with several examples (block-diagonal attention) instead of padding
    completion_only: bool = True  # loss on completions / assistant turns only; false: on every token
    add_eos: bool = True  # end text and completion examples with EOS (chat templates end turns themselves)
    on_error: str = "raise"  # raise | skip: what a malformed record does (each is reported as file:line)
    chat_template: str | None = None  # for a tokenizer without one: "chatml" or a Jinja template


@dataclass
class FullOptions:
    trainable: list[str] | None = None  # parameter-name globs that train (e.g. "layers.3.*"); null: all
    freeze: list[str] = field(default_factory=list)  # parameter-name globs kept frozen (embed_tokens, ...)


@dataclass
class QuantizeOptions:
    bits: int | None = None  # 8: int8 frozen base (any device); 4: NF4 via bitsandbytes (CUDA); LoRA / DoRA


@dataclass
class TokensOptions:
    add: list[str] = field(default_factory=list)  # domain tokens: extend the tokenizer; new rows train too


@dataclass
class ClassificationOptions:
    labels: list[str] | None = None  # class names in id order; null: the sorted distinct labels of the data
    text_field: str = "text"  # the record field holding the text
    label_field: str = "label"  # the record field holding the label (a name or an id)


@dataclass
class EvalOptions:
    exact_match: bool = True  # greedy generations vs references on the validation prompts
    max_examples: int = 64  # validation prompts generated per evaluation
    before: bool = True  # also evaluate the model before training (reported side by side)
    samples: int = 5  # sample generations shown in the report


def _finetune_train_defaults() -> TrainSection:
    return TrainSection(max_steps=300, micro_batch_size=8, lr=DEFAULT_LR["lora"], min_lr=DEFAULT_LR["lora"] / 10,
                        warmup_steps=10, weight_decay=0.0, eval_every=100, eval_sequences=256, save_every=100,
                        keep_last=1)  # fmt: skip


@dataclass
class FinetuneConfig:
    method: str = "lora"  # full | lora | dora | adapter | prefix | prompt
    model: str | None = None  # the base checkpoint folder (Hugging Face layout)
    task: str = "sft"  # sft | classification
    adapter_name: str = "default"  # the adapter's name inside the model
    data: DataOptions = field(default_factory=DataOptions)
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter: BottleneckConfig = field(default_factory=BottleneckConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    full: FullOptions = field(default_factory=FullOptions)
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    tokens: TokensOptions = field(default_factory=TokensOptions)
    classification: ClassificationOptions = field(default_factory=ClassificationOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    train: TrainSection = field(default_factory=_finetune_train_defaults)
    out_dir: str | None = None  # the run folder (--out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS = ("data", "lora", "adapter", "prefix", "prompt", "full", "quantize", "tokens", "classification",
             "eval", "train")  # fmt: skip
_SCALARS = ("method", "model", "task", "adapter_name", "out_dir")


def config_keys() -> list[tuple[str, Any, Any, str]]:
    """Every dotted key of a finetune recipe: [(key, type, default, help)]."""
    keys = []
    top_hints, top_comments = typing.get_type_hints(FinetuneConfig), _field_comments(FinetuneConfig)
    for name in _SCALARS:
        keys.append((name, top_hints[name], getattr(FinetuneConfig(), name), top_comments.get(name, "")))
    defaults = FinetuneConfig()
    for name in _SECTIONS:
        cls = type(getattr(defaults, name))
        hints, comments = typing.get_type_hints(cls), _field_comments(cls)
        for f in dataclasses.fields(cls):
            keys.append((f"{name}.{f.name}", hints[f.name], getattr(getattr(defaults, name), f.name),
                         comments.get(f.name, "")))  # fmt: skip
    return keys


def config_from_dict(values: dict[str, Any] | None) -> FinetuneConfig:
    values = dict(values or {})
    unknown = sorted(set(values) - set(_SECTIONS) - set(_SCALARS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; a finetune recipe has {', '.join([*_SCALARS, *_SECTIONS])}"
        )
    cfg = FinetuneConfig()
    hints = typing.get_type_hints(FinetuneConfig)
    for name in _SCALARS:
        if name in values:
            setattr(cfg, name, _coerce(values[name], hints[name], name))
    lr_given = isinstance(values.get("train"), dict) and "lr" in values["train"]
    min_lr_given = isinstance(values.get("train"), dict) and "min_lr" in values["train"]
    for name in _SECTIONS:
        given = values.get(name) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{name}: expected a mapping, got {given!r}")
        section = getattr(cfg, name)
        section_hints = typing.get_type_hints(type(section))
        kwargs = {}
        for key, value in given.items():
            if key not in section_hints:
                raise ConfigError(f"{name}.{key}: unknown key; {name} accepts {', '.join(section_hints)}")
            kwargs[key] = _coerce(value, section_hints[key], f"{name}.{key}")
        try:
            setattr(cfg, name, dataclasses.replace(section, **kwargs))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: {e}") from None
    if not lr_given:
        cfg.train.lr = DEFAULT_LR.get(cfg.method, cfg.train.lr)
    if not min_lr_given:
        cfg.train.min_lr = cfg.train.lr / 10
    validate(cfg)
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    checks = [
        (cfg.method in METHODS, f"method={cfg.method!r}: expected one of {', '.join(METHODS)}"),
        (cfg.task in TASKS, f"task={cfg.task!r}: expected sft or classification"),
        (cfg.data.max_len >= 2, "data.max_len must be >= 2"),
        (0 <= cfg.data.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
        (cfg.data.on_error in ("raise", "skip"), "data.on_error must be raise or skip"),
        (cfg.quantize.bits in (None, 4, 8), "quantize.bits must be null, 8 or 4"),
        (cfg.quantize.bits is None or cfg.method in ("lora", "dora"), "quantize.bits needs method lora or dora"),
        (not cfg.tokens.add or cfg.method in ("full", "lora", "dora", "adapter"),
         "tokens.add works with full, lora, dora and adapter"),
        (cfg.task == "sft" or not cfg.data.packing, "data.packing is for sft"),
        (cfg.task == "sft" or cfg.method not in ("prefix", "prompt"),
         "classification works with full, lora, dora and adapter"),
        (cfg.train.max_steps >= 0 and cfg.train.micro_batch_size >= 1, "train.max_steps / micro_batch_size"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_finetune_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> FinetuneConfig:
    """A recipe (or the defaults) with `--section.key=value` overrides applied, type-checked."""
    values = read_yaml(path)
    if overrides:
        values = apply_overrides(values, parse_overrides(overrides), _SECTIONS, _SCALARS)
    return config_from_dict(values)


def set_trainable(model, trainable: list[str] | None, freeze: list[str]) -> None:
    """Full or partial fine-tuning: parameters matching `trainable` globs (all when None) train, except
    those matching `freeze`. A glob without wildcards also matches everything under that module path."""

    def hit(name: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or name.startswith(p.rstrip(".") + ".") for p in patterns)

    for name, p in model.named_parameters():
        p.requires_grad_((trainable is None or hit(name, trainable)) and not hit(name, freeze))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"full.trainable={trainable} / full.freeze={freeze} leave nothing to train")


def apply_method(model, cfg: FinetuneConfig, tokenizer=None, new_token_ids: list[int] | None = None):
    """Make `model` ready to train with cfg.method (in place); returns the model."""
    import torch

    from lmforge.finetune.bottleneck import add_bottleneck
    from lmforge.finetune.lora import add_lora
    from lmforge.finetune.prompt import add_prefix_tuning, add_prompt_tuning
    from lmforge.finetune.quant import quantize_base

    torch.manual_seed(cfg.train.seed)  # adapter initialisation
    name, m = cfg.adapter_name, cfg.method
    extra_save = ["score"] if cfg.task == "classification" else []
    token_indices = None
    if new_token_ids:
        token_indices = new_token_ids if model.config.tie_embeddings else {"embed_tokens": new_token_ids,
                                                                           "lm_head": new_token_ids}  # fmt: skip
    if m == "full":
        set_trainable(model, cfg.full.trainable, cfg.full.freeze)
        return model
    if cfg.quantize.bits is not None:
        quantize_base(model, cfg.quantize.bits)
    if m in ("lora", "dora"):
        lora = dataclasses.replace(cfg.lora, use_dora=cfg.lora.use_dora or m == "dora")
        lora.modules_to_save = list(dict.fromkeys([*(lora.modules_to_save or []), *extra_save])) or None
        lora.trainable_token_indices = lora.trainable_token_indices or token_indices
        add_lora(model, lora, name)
    elif m == "adapter":
        bn = dataclasses.replace(cfg.adapter)
        bn.modules_to_save = list(dict.fromkeys([*(bn.modules_to_save or []), *extra_save])) or None
        bn.trainable_token_indices = bn.trainable_token_indices or token_indices
        add_bottleneck(model, bn, name)
    elif m == "prefix":
        add_prefix_tuning(model, cfg.prefix, name, seed=cfg.train.seed)
    elif m == "prompt":
        add_prompt_tuning(model, cfg.prompt, name, tokenizer=tokenizer, seed=cfg.train.seed)
    return model


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class FinetuneResult:
    out_dir: Path
    final_dir: Path
    report: Path
    metrics: dict[str, Any]


def _log(message: str) -> None:
    import sys

    print(f"finetune: {message}", file=sys.stderr, flush=True)


def finetune(cfg: FinetuneConfig, out_dir: str | Path | None = None) -> FinetuneResult:
    """Run a fine-tuning recipe; see the module docstring. Returns where things went and the metrics."""
    import torch

    from lmforge.finetune.lora import trainable_parameters
    from lmforge.pretrained import load_pretrained, save_pretrained
    from lmforge.tokenizer import CHATML_TEMPLATE
    from lmforge.tokenizer_train import extend_tokenizer, resize_embeddings
    from lmforge.train.config import DataSection, ModelSection, ObjectiveSection, TrainConfig
    from lmforge.train.trainer import train

    target = out_dir if out_dir is not None else cfg.out_dir
    if not target:
        raise ConfigError("no output folder: pass --out DIR")
    out = Path(target)
    if cfg.model is None:
        raise ConfigError("no base model: pass --model DIR (or set model: in the recipe)")
    if cfg.data.path is None:
        raise ConfigError("no data: pass --data FILE (or set data.path in the recipe)")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.yaml").write_text(cfg.to_yaml())

    pre = load_pretrained(cfg.model, dtype=torch.float32, device="cpu")
    model, tokenizer = pre.model, pre.tokenizer
    if cfg.data.chat_template is not None:
        tokenizer.chat_template = (
            CHATML_TEMPLATE if cfg.data.chat_template == "chatml" else cfg.data.chat_template
        )
    new_ids: list[int] = []
    if cfg.tokens.add:
        tokenizer, new_ids = extend_tokenizer(tokenizer, cfg.tokens.add)
        resize_embeddings(model, tokenizer.vocab_size)
        _log(f"added {len(new_ids)} token(s) to the vocabulary ({tokenizer.vocab_size} now)")
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None), 0)

    # ---- data
    if cfg.task == "sft":
        from lmforge.finetune.sft import SFTData, load_examples, split_validation

        examples, load_report = load_examples(cfg.data.path, tokenizer, cfg.data.max_len, cfg.data.completion_only,
                                              cfg.data.add_eos, cfg.data.on_error)  # fmt: skip
        for line in load_report.errors[:10]:
            _log(f"skipped {line}")
        if cfg.data.val_path:
            val, _ = load_examples(cfg.data.val_path, tokenizer, cfg.data.max_len, cfg.data.completion_only,
                                   cfg.data.add_eos, cfg.data.on_error)  # fmt: skip
            train_ex = examples
        else:
            train_ex, val = split_validation(examples, cfg.data.val_fraction, cfg.train.seed)
        data = SFTData(train_ex, val, pad_id, cfg.data.max_len, cfg.data.packing, cfg.train.seed)
        load_info = {"records": load_report.records, "skipped": len(load_report.errors),
                     "truncated": load_report.truncated, "dropped": load_report.dropped,
                     "formats": load_report.formats}  # fmt: skip
    else:
        from lmforge.finetune.classify import ClassificationData, add_classification_head, load_labeled
        from lmforge.finetune.sft import split_validation

        c = cfg.classification
        examples, labels = load_labeled(
            cfg.data.path, tokenizer, cfg.data.max_len, c.labels, c.text_field, c.label_field
        )
        if cfg.data.val_path:
            val, _ = load_labeled(
                cfg.data.val_path, tokenizer, cfg.data.max_len, labels, c.text_field, c.label_field
            )
            train_ex = examples
        else:
            train_ex, val = split_validation(examples, cfg.data.val_fraction, cfg.train.seed)
        data = ClassificationData(train_ex, val, pad_id, cfg.data.max_len, cfg.train.seed)
        add_classification_head(model, len(labels), cfg.train.seed)
        load_info = {"records": len(examples), "labels": labels}

    # ---- method
    apply_method(model, cfg, tokenizer, new_ids)
    n_trainable, n_total = trainable_parameters(model)
    _log(
        f"method {cfg.method}: {n_trainable:,} of {n_total:,} parameters train ({100 * n_trainable / n_total:.3f}%)"
    )

    # ---- validation metrics beyond the loss
    def eval_fn(m) -> dict:
        if cfg.task == "classification":
            from lmforge.finetune.classify import classification_metrics

            return classification_metrics(m, data)
        if not cfg.eval.exact_match:
            return {}
        from lmforge.finetune.sft import exact_match

        return exact_match(m, tokenizer, data.val, cfg.eval.max_examples)

    has_eval = bool(data.val) and (cfg.task == "classification" or cfg.eval.exact_match)
    before = {}
    if has_eval and cfg.eval.before:
        before = eval_fn(model)
        if before:
            _log(
                "before training: "
                + ", ".join(f"{k} {v:.4f}" for k, v in before.items() if isinstance(v, float))
            )

    objective = "sft" if cfg.task == "sft" else "sequence_classification"
    tcfg = TrainConfig(model=ModelSection(), data=DataSection(seq_len=cfg.data.max_len), train=cfg.train,
                       objective=ObjectiveSection(name=objective), out_dir=str(out))  # fmt: skip
    from lmforge.train.objectives import build_objective

    result = train(tcfg, out_dir=out, model=model, objective=build_objective(objective, {}), data=data,
                   eval_fn=eval_fn if has_eval else None)  # fmt: skip
    if result.interrupted:
        return FinetuneResult(out, out / "final", out / "report.md", {"interrupted": result.interrupted})

    # ---- export
    final = out / "final"
    model.eval()
    if cfg.method == "full":
        if cfg.task == "classification":
            save_classifier(model, final, labels)
            tokenizer.save(final)
        else:
            save_pretrained(model, final, tokenizer)
    else:
        from lmforge.finetune.peft_io import save_adapter

        save_adapter(
            model,
            final,
            cfg.adapter_name,
            base_model_path=str(Path(cfg.model).resolve()),
            tokenizer=tokenizer,
        )
    after_records = [r for r in result.metrics if any(k.startswith("val_") for k in r)]
    after = dict(after_records[-1]) if after_records else {}
    after.pop("step", None)
    samples = []
    if cfg.task == "sft" and cfg.eval.samples and data.val:
        from lmforge.finetune.sft import generations

        samples = generations(model, tokenizer, data.val, cfg.eval.samples)
    metrics = {
        "method": cfg.method, "task": cfg.task, "base_model": str(cfg.model), "data": str(cfg.data.path),
        "trainable_parameters": n_trainable, "total_parameters": n_total,
        "trainable_fraction": n_trainable / n_total, "steps": result.step, "train_loss": result.loss,
        "before": before, "after": after, "data_stats": {**data.stats(), **load_info},
        "new_tokens": len(new_ids), "quantize_bits": cfg.quantize.bits,
        "wall_time_s": time.perf_counter() - started, "final": str(final),
    }  # fmt: skip
    report = write_report(out, metrics, samples)
    _log(f"done: {final} ({report})")
    return FinetuneResult(out, final, report, metrics)


def save_classifier(model, path: str | Path, labels: list[str]) -> None:
    """A Hugging Face *ForSequenceClassification folder: the decoder, `score.weight`, the label names."""
    from safetensors.torch import save_file

    from lmforge.model.hf import _atomic, save_model, write_text_atomic

    path = Path(path)
    score = model.score
    del model.score
    try:
        save_model(model, path)
    finally:
        model.score = score
    from lmforge.model.hf import read_safetensors

    tensors = read_safetensors([path / "model.safetensors"])
    tensors["score.weight"] = score.weight.detach().cpu().contiguous()
    _atomic(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = json.loads((path / "config.json").read_text())
    family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2"}[
        model.config.model_type
    ]
    config["architectures"] = [f"{family}ForSequenceClassification"]
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")


def write_report(out: Path, metrics: dict[str, Any], samples: list[dict[str, str]]) -> Path:
    """report.md (for people) and report.json (the same numbers, for scripts)."""
    from lmforge.model.hf import write_text_atomic

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    before, after = metrics["before"], metrics["after"]
    lines = [
        f"# Fine-tuning report: {metrics['method']} ({metrics['task']})",
        "",
        f"- base model: `{metrics['base_model']}`",
        f"- data: `{metrics['data']}`",
        f"- trainable parameters: **{metrics['trainable_parameters']:,}** of {metrics['total_parameters']:,} "
        f"(**{100 * metrics['trainable_fraction']:.3f}%**)",
        f"- steps: {metrics['steps']}, final training loss {fmt(metrics['train_loss'])}, "
        f"wall time {metrics['wall_time_s']:.1f} s",
        f"- result: `{metrics['final']}`"
        + (
            " (PEFT adapter folder)" if metrics["method"] != "full" else " (Hugging Face checkpoint)"
        ),  # fmt: skip
    ]
    if metrics.get("new_tokens"):
        lines.append(f"- new tokens: {metrics['new_tokens']} (their embedding rows trained)")
    if metrics.get("quantize_bits"):
        lines.append(f"- frozen base quantized to {metrics['quantize_bits']} bits")
    keys = sorted(k for k in {*before, *after} if isinstance((after.get(k, before.get(k))), (int, float)))
    if keys:
        lines += ["", "## Validation", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(before.get(k, '-'))} | {fmt(after.get(k, '-'))} |" for k in keys]
    lines += ["", "## Data", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in metrics["data_stats"].items()]
    lines += ["", "## Loss", "", "![loss curve](loss.png)", ""]
    if samples:
        lines += ["## Sample generations (validation, greedy)", ""]
        for s in samples:
            ok = "✓" if s["generated"].strip() == s["reference"].strip() else "✗"
            lines += [f"- {ok} prompt: `{json.dumps(s['prompt'])[1:-1]}`", f"  - reference: `{json.dumps(s['reference'])[1:-1]}`",
                      f"  - generated: `{json.dumps(s['generated'])[1:-1]}`"]  # fmt: skip
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    write_text_atomic(
        out / "report.json", json.dumps({**metrics, "samples": samples}, indent=2, default=str) + "\n"
    )
    return out / "report.md"


# --------------------------------------------------------------------------------------------------
# Merging


def merge_checkpoint(
    model_dir: str | Path, adapters: list[str], out_dir: str | Path, dtype: str | None = None
) -> Path:
    """Fold adapters (`DIR` or `NAME=DIR`, all applied) into the base and write a plain Hugging Face checkpoint
    (with the adapter's tokenizer when it grew the vocabulary, else the base's)."""
    import shutil

    import torch

    from lmforge.finetune.lora import merge_and_unload
    from lmforge.finetune.peft_io import adapter_tokenizer, apply_adapters
    from lmforge.pretrained import load_pretrained, save_pretrained

    pre = load_pretrained(model_dir, dtype=torch.float32, device="cpu", require_tokenizer=False)
    apply_adapters(pre.model, adapters)
    model = merge_and_unload(pre.model)
    if dtype is not None:
        from lmforge.model.hf import DTYPES

        model.to(DTYPES[dtype])
    tokenizer = adapter_tokenizer(adapters, pre.tokenizer)
    out = Path(out_dir)
    save_pretrained(model, out, tokenizer)
    base_gen = Path(model_dir) / "generation_config.json"
    if base_gen.is_file() and not (out / "generation_config.json").is_file():
        shutil.copyfile(base_gen, out / "generation_config.json")
    return out
