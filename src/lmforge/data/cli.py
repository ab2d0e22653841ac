"""``lmforge data ...`` and ``lmforge tokenizer ...``: the command-line doors to data preparation,
tokenizer training/extension and tokenisation into shards.

    lmforge data prepare      curate raw text into train/validation/test JSONL  (lmforge.data.prepare)
    lmforge tokenizer train   train a BPE / WordPiece / Unigram tokenizer       (lmforge.tokenizer_train)
    lmforge tokenizer extend  add domain tokens; optionally grow a model's embeddings
    lmforge data tokenize     JSONL splits -> binary token shards               (lmforge.data.tokenize)

Each command is a thin shell over the Python function named beside it; this module imports them only
when the command runs, so ``lmforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from lmforge.cli import CLIError, add_command


def register(sub) -> None:
    """Add the ``data`` and ``tokenizer`` command groups to the top-level subparsers."""
    _register_data(sub)
    _register_tokenizer(sub)


def _group(sub, name: str, help: str) -> Any:
    group = sub.add_parser(name, help=help, description=help)
    inner = group.add_subparsers(dest=f"{name}_command", metavar="<command>")
    group.set_defaults(func=lambda args: _print_help(group))
    return inner


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _command(inner, group: str, name: str, func, help: str, examples: str) -> argparse.ArgumentParser:
    """add_command, and name the full command (``data prepare``) in lmforge.cli.main's error line."""

    def run(args: argparse.Namespace) -> int | None:
        args.command = f"{group} {name}"
        return func(args)

    return add_command(inner, name, run, help, examples)


# --------------------------------------------------------------------------------------------------
# data prepare

# Hand-written help for the common settings; every other field gets its default as help.
_PREPARE_HELP = {
    "text_field": "JSONL key / Parquet column holding the text",
    "on_error": "what to do with a bad record: fail (stop, naming file:line) or skip (count and report)",
    "max_documents": "stop after reading this many documents (quick trials)",
    "decontaminate": "evaluation files/folders; training documents sharing a word n-gram with them are dropped",
    "splits": "split fractions, e.g. '{train: 0.9, validation: 0.05, test: 0.05}'",
    "split_seed": "salt of the hash that assigns splits",
    "write_rejected": "also write rejected.jsonl with every removed document and why",
    "progress": "progress bar (default: only on a terminal)",
}
_NOT_OPTIONS = {"inputs", "output_dir", "quality", "dedup"}


def _setting_options(p: argparse.ArgumentParser) -> None:
    """One ``--key=value`` option per setting of PrepareConfig, DedupConfig (``--dedup.*``) and
    QualityConfig (``--quality.*``), generated from the dataclasses so they cannot drift apart."""
    from lmforge.data import DedupConfig, PrepareConfig, QualityConfig

    sections = [
        (p.add_argument_group("settings (override the --config file)"), PrepareConfig, ""),
        (p.add_argument_group("deduplication settings"), DedupConfig, "dedup."),
        (
            p.add_argument_group("quality filter bounds ('none' turns a filter off)"),
            QualityConfig,
            "quality.",
        ),
    ]
    for group, cls, prefix in sections:
        for f in fields(cls):
            if not prefix and f.name in _NOT_OPTIONS:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            key = prefix + f.name
            group.add_argument(
                "--" + prefix + f.name.replace("_", "-"),
                dest=f"setting:{key}",
                type=_converter(str(f.type)),
                default=argparse.SUPPRESS,
                metavar=_metavar(str(f.type)),
                help=f"{_PREPARE_HELP.get(key, '')} (default: {default})".lstrip(),
            )


def _metavar(annotation: str) -> str:
    base = [t.strip() for t in annotation.split("|") if t.strip() != "None"][0]
    return {"int": "N", "float": "X", "bool": "BOOL", "str": "TEXT"}.get(base, "YAML")


def _converter(annotation: str):
    """Parse an option value by the field's annotation; YAML for lists and mappings."""
    types = [t.strip() for t in annotation.split("|")]
    base = [t for t in types if t != "None"][0]

    def convert(raw: str) -> Any:
        import yaml

        if "None" in types and raw.lower() in ("none", "null", "~"):
            return None
        if base == "str":
            return raw
        if base == "bool":
            if raw.lower() in ("true", "yes", "on", "1"):
                return True
            if raw.lower() in ("false", "no", "off", "0"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")
        if base in ("int", "float"):
            try:
                return int(raw) if base == "int" else float(raw)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {base}, got {raw!r}") from None
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"not valid YAML ({str(e).splitlines()[0]})") from None
        if base.startswith("list") and isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    return convert


def _load_yaml_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CLIError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    if isinstance(data.get("data"), dict):  # a project config file: use its data: section
        data = data["data"]
    return data


def cmd_data_prepare(args) -> int:
    from lmforge.data import DataError, PrepareConfig, prepare

    values: dict[str, Any] = _load_yaml_config(args.config) if args.config else {}
    for dest, value in vars(args).items():
        if dest.startswith("setting:"):
            *sections, name = dest.removeprefix("setting:").split(".")
            target = values
            for section in sections:
                if not isinstance(target.get(section), dict):
                    target[section] = {}
                target = target[section]
            target[name] = value
    if args.inputs:
        values["inputs"] = list(args.inputs)
    if args.out:
        values["output_dir"] = args.out
    elif "output_dir" not in values:
        raise CLIError("no output folder: give --out DIR (or output_dir in the --config file)")
    try:
        config = PrepareConfig.from_dict(values)
    except (DataError, TypeError) as e:
        raise CLIError(f"{args.config}: {e}" if args.config else str(e)) from None
    report = prepare(config)
    _print_prepare_summary(report)
    return 0


def _print_prepare_summary(report) -> None:
    rows = [("read", report.documents_in, report.chars_in)]
    rows += [
        (f"removed by {stage.name}", stage.removed_documents, stage.removed_chars)
        for stage in report.stages.values()
        if stage.removed_documents
    ]
    rows.append(("written", report.documents_out, report.chars_out))
    rows += [(f"  {name}", split.documents, split.chars) for name, split in report.splits.items()]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'documents':>10}  {'characters':>12}")
    for label, docs, chars in rows:
        print(f"{label:<{width}}  {docs:>10,}  {chars:>12,}")
    extras = []
    if report.read_errors:
        extras.append(f"{report.read_errors} bad record(s) skipped")
    if report.pii:
        extras.append("PII replaced: " + ", ".join(f"{n} {kind}" for kind, n in sorted(report.pii.items())))
    if report.stopped_early:
        extras.append("stopped early at max_documents")
    for line in extras:
        print(line)
    print(
        f"wrote {report.output_dir}/ (report.md, report.json, length_histogram.png) in {report.seconds:.1f} s"
    )


# --------------------------------------------------------------------------------------------------
# data tokenize


def cmd_data_tokenize(args) -> int:
    from lmforge.data.tokenize import tokenize_splits

    result = tokenize_splits(
        args.data,
        args.tokenizer,
        args.out,
        splits=args.splits,
        text_field=args.text_field,
        eos_token=args.eos_token,
        split_special_tokens=not args.keep_special_tokens,
        batch_size=args.batch_size,
        progress=None,
    )
    width = max([len("split"), *map(len, result.splits)])
    print(f"{'split':<{width}}  {'documents':>10}  {'tokens':>12}  file")
    for name, split in result.splits.items():
        print(f"{name:<{width}}  {split.documents:>10,}  {split.tokens:>12,}  {split.path}")
        if split.skipped_empty:
            print(f"{'':<{width}}  ({split.skipped_empty} empty document(s) skipped)")
    print(
        f"vocab_size {result.vocab_size}, {result.dtype}, EOS id {result.eos_id} between documents; "
        f"meta.json and tokenizer/ in {result.out_dir} ({result.seconds:.1f} s)"
    )
    return 0


def _register_data(sub) -> None:
    inner = _group(sub, "data", "prepare training data: curate raw text, tokenise it into shards")

    p = _command(inner, "data", "prepare", cmd_data_prepare,
                 "clean, filter, deduplicate, decontaminate and split raw text into JSONL", """
        lmforge data prepare --out out/data                      # the embedded stdlib-docstring corpus
        lmforge data prepare corpus/ extra.jsonl --out out/my-data --on-error=skip
        lmforge data prepare --config data.yaml --dedup.threshold=0.7 --quality.min-words=50
        lmforge data prepare corpus/ --out out/d --decontaminate evals/ --max-documents=1000
    """)  # fmt: skip
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files (.txt .md .rst .jsonl .parquet), folders, or builtin:stdlib (the default)")  # fmt: skip
    p.add_argument(
        "--out", metavar="DIR", help="output folder (train.jsonl, validation.jsonl, test.jsonl, reports)"
    )
    p.add_argument("--config", metavar="FILE.yaml",
                   help="settings as YAML (or the data: section of a project config); options below win")  # fmt: skip
    _setting_options(p)
    p.usage = "lmforge data prepare [INPUT ...] --out DIR [--config FILE.yaml] [--SETTING=VALUE ...]"

    p = _command(inner, "data", "tokenize", cmd_data_tokenize,
                 "tokenise JSONL splits into binary token shards (<split>.bin + meta.json) for training", """
        lmforge data tokenize --data out/data --tokenizer out/tok --out out/shards
        lmforge data tokenize --data out/data --tokenizer ./ckpt --out out/shards --splits train validation
    """)  # fmt: skip
    p.add_argument(
        "--data", required=True, metavar="DIR", help="output folder of `lmforge data prepare` (or one .jsonl)"
    )
    p.add_argument(
        "--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json (a checkpoint works)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="shard folder to write")
    p.add_argument(
        "--splits", nargs="+", metavar="NAME", help="splits to tokenise (default: every <name>.jsonl)"
    )
    p.add_argument("--text-field", default="text", help="JSONL key holding the text (default: text)")
    p.add_argument("--eos-token", default=None, metavar="TOKEN",
                   help="separator between documents (default: the tokenizer's eos_token, else sep_token)")  # fmt: skip
    p.add_argument("--keep-special-tokens", action="store_true",
                   help="let text such as '<|im_end|>' become the special token (default: encode it as plain text)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1024, help="documents per batch encode (default: 1024)")


# --------------------------------------------------------------------------------------------------
# tokenizer train


def _training_texts(data: list[str], split: str, text_field: str, max_documents: int | None, stats: dict):
    """Texts of a prepare() folder's split, or of files/folders/builtin:stdlib read as documents."""
    from lmforge.data import iter_documents

    inputs: list[str | Path] = []
    for item in data:
        path = Path(item)
        inputs.append(
            path / f"{split}.jsonl" if path.is_dir() and (path / f"{split}.jsonl").is_file() else item
        )
    for doc in iter_documents(inputs, text_field, None, stats["ignored"]):
        if max_documents is not None and stats["documents"] >= max_documents:
            return
        stats["documents"] += 1
        stats["chars"] += len(doc.text)
        yield doc.text


def cmd_tokenizer_train(args) -> int:
    import time

    from lmforge.tokenizer_train import parse_special_tokens, train_tokenizer

    named = extra = None
    if args.special_tokens is not None:
        try:
            named, extra = parse_special_tokens(args.special_tokens)
        except ValueError as e:
            raise CLIError(f"--special-tokens: {e}") from None
    stats = {"documents": 0, "chars": 0, "ignored": []}
    started = time.perf_counter()
    tokenizer = train_tokenizer(
        _training_texts(args.data, args.split, args.text_field, args.max_documents, stats),
        kind=args.kind,
        vocab_size=args.vocab_size,
        special_tokens=named,
        extra_special_tokens=extra,
        min_frequency=args.min_frequency,
        chat_template=None if args.no_chat_template else "auto",
        progress=sys.stderr.isatty(),
    )
    tokenizer.save(args.out)
    seconds = time.perf_counter() - started

    print(f"trained a {args.kind} tokenizer on {stats['documents']:,} documents ({stats['chars']:,} characters) "
          f"in {seconds:.1f} s")  # fmt: skip
    print(f"vocab_size: {tokenizer.vocab_size:,}")
    specials = {
        name: f"{tok} ({tokenizer.token_to_id(tok)})" for name, tok in tokenizer.special_tokens.items()
    }
    print("special tokens: " + ", ".join(f"{name}={value}" for name, value in specials.items()))
    extras = [
        t
        for t in tokenizer.backend.get_added_tokens_decoder().values()
        if t.content not in tokenizer.special_tokens.values()
    ]
    if extras:
        print(
            "other special tokens: "
            + ", ".join(f"{t.content} ({tokenizer.token_to_id(t.content)})" for t in extras)
        )
    print(f"chat template: {'ChatML' if tokenizer.chat_template else 'none'}")
    heldout = _heldout_file(args.data, args.split)
    if heldout is not None:
        ratio = _chars_per_token(tokenizer, heldout, args.text_field)
        if ratio is not None:
            print(f"compression: {ratio:.2f} characters per token on {heldout}")
    if stats["ignored"]:
        print(f"{len(stats['ignored'])} file(s) of unknown type passed over, e.g. {stats['ignored'][0]}")
    print(f"wrote {Path(args.out) / 'tokenizer.json'} and tokenizer_config.json")
    return 0


def _heldout_file(data: list[str], split: str) -> Path | None:
    """The validation split next to the training split, to measure compression on unseen text."""
    if len(data) != 1 or not Path(data[0]).is_dir():
        return None
    for name in ("validation", "val", "test"):
        path = Path(data[0]) / f"{name}.jsonl"
        if name != split and path.is_file():
            return path
    return None


def _chars_per_token(tokenizer, path: Path, text_field: str, limit: int = 2000) -> float | None:
    from itertools import islice

    from lmforge.data import ErrorLog, iter_jsonl

    texts = [doc.text for doc in islice(iter_jsonl(path, text_field, ErrorLog("skip")), limit)]
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts, add_special_tokens=False))
    return sum(map(len, texts)) / tokens if tokens else None


# --------------------------------------------------------------------------------------------------
# tokenizer extend


def _read_tokens(items: list[str]) -> list[str]:
    """Tokens from the command line; an argument naming an existing file contributes one token per line."""
    tokens: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise CLIError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            for lineno, line in enumerate(lines, 1):
                token = line.strip()
                if token:
                    tokens.append(token)
                elif line:
                    raise CLIError(f"{path}:{lineno}: a line of only whitespace is not a token")
        else:
            tokens.append(item)
    if not tokens:
        raise CLIError("--tokens gave no tokens")
    return tokens


def cmd_tokenizer_extend(args) -> int:
    import shutil

    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer_train import extend_tokenizer

    source = args.tokenizer or args.model
    if source is None:
        raise CLIError("give --tokenizer DIR (or --model DIR holding a tokenizer)")
    tokens = _read_tokens(args.tokens)
    tokenizer = Tokenizer.from_dir(source)
    extended, added = extend_tokenizer(tokenizer, tokens)
    skipped = len(dict.fromkeys(tokens)) - len(added)

    model_note = None
    if args.model is not None:
        import json

        from lmforge.model import load_model, save_model
        from lmforge.tokenizer_train import resize_embeddings

        config_file = Path(args.model) / "config.json"
        hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")  # keep the checkpoint's dtype
        if dtype not in ("float32", "bfloat16", "float16"):
            dtype = None
        model = load_model(args.model, dtype=dtype, device="cpu")
        old_rows = model.config.vocab_size
        if extended.vocab_size > old_rows:
            resize_embeddings(model, extended.vocab_size)
            model_note = (f"model: embeddings grown from {old_rows:,} to {extended.vocab_size:,} rows "
                          "(new rows = mean of the old)")  # fmt: skip
        else:
            model_note = (f"model: its {old_rows:,} embedding rows already cover the {extended.vocab_size:,} ids "
                          "(padded vocabulary); rows kept as they are")  # fmt: skip
        save_model(model, args.out)
        generation = Path(args.model) / "generation_config.json"
        if generation.is_file() and generation.resolve() != (Path(args.out) / generation.name).resolve():
            shutil.copyfile(generation, Path(args.out) / generation.name)
    extended.save(args.out)

    ids = f" (ids {added[0]}..{added[-1]})" if added else ""
    print(f"added {len(added)} token(s){ids}; vocab_size {tokenizer.vocab_size:,} -> {extended.vocab_size:,}")
    if skipped:
        print(f"{skipped} token(s) were already in the vocabulary and got no new id")
    if model_note:
        print(model_note)
    print(f"wrote {args.out}")
    return 0


def _register_tokenizer(sub) -> None:
    inner = _group(sub, "tokenizer", "train a tokenizer, or extend one with domain tokens")

    p = _command(inner, "tokenizer", "train", cmd_tokenizer_train,
                 "train a byte-level BPE, WordPiece or Unigram tokenizer; saves tokenizer.json + config", """
        lmforge tokenizer train --data out/data --out out/tok                 # train.jsonl of `data prepare`
        lmforge tokenizer train --data builtin:stdlib --out out/tok --vocab-size 4096
        lmforge tokenizer train --data notes/ more.jsonl --out out/wp --kind wordpiece
        lmforge tokenizer train --data out/data --out out/tok --special-tokens eos=</s> bos=<s> "<tool>"
    """)  # fmt: skip
    p.add_argument("--data", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="a `data prepare` folder (its train split), or text/JSONL/Parquet files, folders, builtin:stdlib")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram"],
                   help="bpe (GPT-2 byte level, decoder LMs; default), wordpiece (BERT), unigram (SentencePiece)")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                   help="whole vocabulary incl. special tokens (default: 8192)")  # fmt: skip
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="minimum count of a merge/piece (bpe, wordpiece; default: 2)")  # fmt: skip
    p.add_argument("--special-tokens", nargs="+", metavar="TOKEN",
                   help="replace the defaults: NAME=TOKEN for named ones (bos, eos, pad, unk, ...), bare TOKEN for "
                        "others (default bpe/unigram: <|endoftext|> as bos/eos/pad, <|im_start|> <|im_end|>)")  # fmt: skip
    p.add_argument("--no-chat-template", action="store_true", help="do not store the ChatML chat template")
    p.add_argument(
        "--split", default="train", help="split to read from a `data prepare` folder (default: train)"
    )
    p.add_argument(
        "--text-field", default="text", help="JSONL key / Parquet column with the text (default: text)"
    )
    p.add_argument(
        "--max-documents", type=int, default=None, metavar="N", help="train on the first N documents only"
    )

    p = _command(inner, "tokenizer", "extend", cmd_tokenizer_extend,
                 "add domain tokens to a tokenizer (one id each); with --model also grow the model's embeddings", """
        lmforge tokenizer extend --tokenizer out/tok --tokens ICD10:E11.9 ICD10:I10 --out out/tok-med
        lmforge tokenizer extend --tokenizer ./ckpt --tokens codes.txt --out ./ckpt-med --model ./ckpt
        (codes.txt: one token per line)
    """)  # fmt: skip
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the --model folder)")
    p.add_argument("--tokens", required=True, nargs="+", metavar="FILE_OR_TOKEN",
                   help="tokens, or files with one token per line")  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the extended tokenizer (and model)"
    )
    p.add_argument("--model", metavar="DIR",
                   help="Hugging Face checkpoint folder to resize and save into --out with the tokenizer")  # fmt: skip
