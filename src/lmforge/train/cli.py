"""`lmforge pretrain`: train a model from a YAML recipe, any key overridable as `--section.key=value`.

Registered into the `lmforge` command through `register(subparsers)`; `python -m lmforge.train` runs the
same command standalone (handy under `torchrun -m`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import types
import typing


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        return "|".join(names) + "|null"
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    from lmforge.train.config import config_keys

    p.usage = "%(prog)s [-h] [--config FILE.yaml] [--out DIR] [--section.key=VALUE ...]"
    p.add_argument(
        "--config", metavar="FILE.yaml", default=None, help="training recipe (default: built-in defaults)"
    )
    p.add_argument("--out", metavar="DIR", default=None,
                   help="run folder: checkpoints, metrics.jsonl, loss.png; rerunning resumes from it")  # fmt: skip
    group = p.add_argument_group(
        "config keys",
        "override any key of the recipe: --section.key=VALUE (VALUE is a YAML scalar: 40, 3e-4, true, null)",
    )
    for key, hint, default, text in config_keys():
        if key == "out_dir":
            continue
        shown = "" if default is None or isinstance(default, dict) else f" (default: {default})"
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=_type_name(hint).upper(), default=argparse.SUPPRESS,
                           help=f"{text}{shown}".replace("%", "%%"))  # fmt: skip


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.cli import CLIError
    from lmforge.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides_from_args(args))
    except ConfigError as e:
        raise CLIError(str(e)) from None
    out = args.out or cfg.out_dir
    if out is None:
        raise CLIError("no output folder: pass --out DIR")

    from lmforge.train.trainer import train

    try:
        result = train(cfg, out_dir=out)
    except (ConfigError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if result.interrupted:
        try:
            return 128 + signal.Signals[result.interrupted].value
        except KeyError:
            return 128 + signal.SIGTERM.value
    if result.rank != 0:
        return 0
    parts = [f"step {result.step}", f"{result.tokens_seen:,} tokens"]
    if result.loss is not None:
        parts.append(f"loss {result.loss:.4f}")
    if result.val_loss is not None:
        parts.append(f"val_loss {result.val_loss:.4f}")
    print(f"pretrain: done ({', '.join(parts)}); model: {result.checkpoint}", file=sys.stderr)
    return 0


EXAMPLES = """
    lmforge pretrain --config recipes/tiny.yaml --out runs/tiny
    lmforge pretrain --config recipes/tiny.yaml --out runs/tiny --data.path=data/tokens --train.max_steps=2000
    lmforge pretrain --config recipes/tiny.yaml --out runs/tiny --train.max_steps=40 --train.save_every=10
    torchrun --nproc_per_node=8 -m lmforge.train --config recipes/tiny.yaml --out runs/tiny --dist.strategy=fsdp
    (rerun the same command to resume from the newest complete checkpoint; Ctrl-C saves one and stops)
"""


def register(subparsers) -> None:
    from lmforge.cli import add_command

    p = add_command(subparsers, "pretrain", cmd_pretrain,
                    "train a language model from a YAML recipe (resumable; torchrun for DDP / FSDP2)", EXAMPLES)  # fmt: skip
    add_pretrain_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """`python -m lmforge.train ARGS` == `lmforge pretrain ARGS`."""
    from lmforge.cli import CLIError, add_command

    parser = argparse.ArgumentParser(prog="python -m lmforge.train")
    sub = parser.add_subparsers(dest="command")
    add_pretrain_arguments(add_command(sub, "pretrain", cmd_pretrain, "train a language model", EXAMPLES))
    args = parser.parse_args(["pretrain", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, OSError) as e:
        print(f"lmforge pretrain: error: {e}", file=sys.stderr)
        return 1
