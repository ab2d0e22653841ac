"""`lmforge finetune` and `lmforge merge`, registered into the `lmforge` command through `register(subparsers)`."""

from __future__ import annotations

import argparse
import signal
import sys

FINETUNE_EXAMPLES = """
    lmforge finetune --model ./base --data train.jsonl --method lora --out runs/lora
    lmforge finetune --model ./base --data chat.jsonl --method dora --config recipes/lora.yaml --lora.r=16 --out runs/dora
    lmforge finetune --model ./base --data train.jsonl --method full --config recipes/sft.yaml --out runs/sft
    lmforge finetune --model ./base --data reviews.jsonl --method lora --task classification --out runs/cls
    lmforge generate --model ./base --adapter runs/lora/final --prompt "..."
    (data: JSONL/Parquet with {"text"}, {"prompt", "completion"} or {"messages": [...]}; rerunning resumes)
"""

MERGE_EXAMPLES = """
    lmforge merge --model ./base --adapter runs/lora/final --out ./merged
    lmforge merge --model ./base --adapter style=runs/a/final --adapter facts=runs/b/final --out ./merged
"""


def _type_name(hint) -> str:
    from lmforge.train.cli import _type_name as name

    return name(hint)


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    from lmforge.finetune.run import METHODS, config_keys

    p.usage = ("%(prog)s [-h] --model DIR --data FILE --method {" + ",".join(METHODS) + "} --out DIR "
               "[--config FILE.yaml] [--section.key=VALUE ...]")  # fmt: skip
    p.add_argument(
        "--model", metavar="DIR", default=None, help="base checkpoint folder (Hugging Face layout)"
    )
    p.add_argument("--data", metavar="FILE", default=None, help="training records: JSONL, JSON or Parquet")
    p.add_argument(
        "--method", choices=METHODS, default=None, help="what trains (default: the recipe's, else lora)"
    )
    p.add_argument("--task", choices=["sft", "classification"], default=None, help="default: sft")
    p.add_argument(
        "--config", metavar="FILE.yaml", default=None, help="a finetune recipe (recipes/lora.yaml, ...)"
    )
    p.add_argument("--out", metavar="DIR", default=None,
                   help="run folder: final/, metrics.jsonl, loss.png, report.md; rerunning resumes")  # fmt: skip
    group = p.add_argument_group(
        "recipe keys", "override any key of the recipe: --section.key=VALUE (VALUE is a YAML scalar or list)"
    )
    for key, hint, default, text in config_keys():
        if key in ("method", "model", "task", "out_dir"):
            continue
        shown = "" if default is None or isinstance(default, dict) else f" (default: {default})"
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=_type_name(hint).upper(), default=argparse.SUPPRESS,
                           help=f"{text}{shown}".replace("%", "%%"))  # fmt: skip


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.cli import CLIError
    from lmforge.finetune.run import finetune, load_finetune_config
    from lmforge.finetune.sft import DataError
    from lmforge.train.config import ConfigError

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    for flag, key in (("model", "model"), ("data", "data.path"), ("method", "method"), ("task", "task")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    try:
        cfg = load_finetune_config(args.config, overrides)
        result = finetune(cfg, out_dir=args.out)
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if "interrupted" in result.metrics:
        return 128 + signal.Signals[result.metrics["interrupted"]].value if result.metrics["interrupted"] in (
            "SIGINT", "SIGTERM") else 143  # fmt: skip
    m = result.metrics
    shown = [f"{m['trainable_parameters']:,} / {m['total_parameters']:,} parameters trained "
             f"({100 * m['trainable_fraction']:.3f}%)"]  # fmt: skip
    for key in ("val_loss", "val_exact_match", "val_accuracy", "val_f1"):
        if key in m["after"]:
            before = m["before"].get(key)
            shown.append(
                f"{key} {m['after'][key]:.4f}" + (f" (before {before:.4f})" if before is not None else "")
            )
    print(
        f"finetune: {'; '.join(shown)}\n  final: {result.final_dir}\n  report: {result.report}",
        file=sys.stderr,
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lmforge.finetune.run import merge_checkpoint

    out = merge_checkpoint(args.model, args.adapter, args.out, args.dtype)
    print(f"merge: wrote {out}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    from lmforge.cli import add_command

    p = add_command(subparsers, "finetune", cmd_finetune,
                    "fine-tune a checkpoint: full, LoRA, DoRA, bottleneck adapters, prefix or prompt tuning",
                    FINETUNE_EXAMPLES)  # fmt: skip
    add_finetune_arguments(p)
    p = add_command(subparsers, "merge", cmd_merge,
                    "fold adapters into the base weights and write a Hugging Face checkpoint", MERGE_EXAMPLES)  # fmt: skip
    p.add_argument("--model", required=True, metavar="DIR", help="base checkpoint folder")
    p.add_argument("--adapter", required=True, action="append", metavar="[NAME=]DIR",
                   help="a PEFT adapter folder (repeatable; all are applied)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="where the merged checkpoint goes")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: float32)")  # fmt: skip
