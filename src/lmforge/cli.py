"""The `lmforge` command. Each subcommand is a function of its parsed arguments; heavy imports
(torch, tokenizers) happen inside the functions so `lmforge --help` starts at once.

Subcommands of other capabilities live beside their code (`lmforge/<area>/cli.py`) and register
themselves through `register(subparsers)`; they are listed in `_PLUGINS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
from collections.abc import Callable, Sequence

_PLUGINS: list[str] = [
    "lmforge.data.cli",
    "lmforge.train.cli",
    "lmforge.finetune.cli",
    "lmforge.rag.cli",
    "lmforge.serve.cli",
]  # modules with register(subparsers)


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def _fmt(examples: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")


def add_command(
    sub, name: str, func: Callable[[argparse.Namespace], int | None], help: str, examples: str
) -> argparse.ArgumentParser:
    """Add a subcommand with a one-line help and examples shown by `--help`."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=_fmt(examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder in Hugging Face layout")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="a PEFT-format adapter folder to apply (repeatable; their updates add up)")  # fmt: skip


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 (generate), 512 (chat)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: generation_config.json's, else 0.8")  # fmt: skip
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _sampling_params(args, gen_config: dict, default_max: int):
    from lmforge.generate import SamplingParams

    sampling_default = gen_config.get("do_sample", True)

    def pick(cli_value, key, fallback):
        if cli_value is not None:
            return cli_value
        return gen_config.get(key, fallback) if gen_config.get(key) is not None else fallback

    temperature = pick(args.temperature, "temperature", 0.8)
    if args.temperature is None and not sampling_default:
        temperature = 0.0
    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else default_max,
            temperature=temperature,
            top_p=pick(args.top_p, "top_p", 1.0),
            top_k=pick(args.top_k, "top_k", 0),
            min_p=pick(args.min_p, "min_p", 0.0),
            repetition_penalty=pick(args.repetition_penalty, "repetition_penalty", 1.0),
            seed=args.seed,
            stop=list(args.stop),
        )
    except ValueError as e:
        raise CLIError(str(e)) from None


def _load(args, require_tokenizer: bool = True):
    from lmforge.pretrained import load_pretrained

    pre = load_pretrained(
        args.model, dtype=args.dtype, device=args.device, require_tokenizer=require_tokenizer
    )
    if args.adapter:
        from lmforge.finetune import adapter_tokenizer, apply_adapters

        apply_adapters(pre.model, args.adapter)
        pre.tokenizer = adapter_tokenizer(args.adapter, pre.tokenizer)
    return pre


def _encode_prompt(tokenizer, text: str, chat: bool, system: str | None = None) -> list[int]:
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        rendered = _chat_render(tokenizer, messages)
        return tokenizer.encode(rendered, add_special_tokens=False)
    return tokenizer.encode(text)


def _chat_render(tokenizer, messages) -> str:
    from lmforge.tokenizer import CHATML_TEMPLATE

    if tokenizer.chat_template is None:
        print("note: the checkpoint has no chat template; using ChatML", file=sys.stderr)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    from lmforge.generate import stream

    pre = _load(args)
    params = _sampling_params(args, pre.generation_config, 128)
    prompt = _encode_prompt(pre.tokenizer, args.prompt, args.chat, args.system)
    if not prompt:
        raise CLIError("the prompt encodes to no tokens")
    out = sys.stderr if args.json else sys.stdout
    echo = not args.json or sys.stderr.isatty()  # with --json, stdout holds only the JSON line
    pieces = stream(pre.model, pre.tokenizer, prompt, params, compile=args.compile)
    try:
        while True:
            piece = next(pieces)
            if echo:
                out.write(piece)
                out.flush()
    except StopIteration as stop:
        result = stop.value
    if echo:
        out.write("\n")
    if args.json:
        print(json.dumps({
            "text": result.text,
            "tokens": result.tokens,
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(result.tokens),
                      "total_tokens": len(prompt) + len(result.tokens)},
            "timings": {"prefill_s": round(result.prefill_s, 6), "decode_s": round(result.decode_s, 6),
                        "decode_tokens_per_s": round(max(len(result.tokens) - 1, 0) / result.decode_s, 3)
                        if result.decode_s > 0 else None},
        }))  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------------
# score


def cmd_score(args) -> int:
    from lmforge.generate import score

    pre = _load(args)
    ids = pre.tokenizer.encode(args.text)
    if len(ids) < 2:
        raise CLIError(f"the text encodes to {len(ids)} token(s); scoring needs at least 2")
    try:
        logprobs, ppl = score(pre.model, ids)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps({"tokens": ids, "logprobs": logprobs, "perplexity": ppl}))
        return 0
    print(f"{'#':>4}  {'id':>7}  {'logprob':>9}  token")
    for i, (tok, lp) in enumerate(zip(ids, logprobs)):
        shown = json.dumps(pre.tokenizer.decode([tok]))
        print(
            f"{i:>4}  {tok:>7}  {'':>9}  {shown}" if lp is None else f"{i:>4}  {tok:>7}  {lp:>9.4f}  {shown}"
        )
    print(f"perplexity: {ppl:.4f}  (tokens: {len(ids)})")
    return 0


# --------------------------------------------------------------------------------------------------
# chat


def cmd_chat(args) -> int:
    from lmforge.generate import stream

    pre = _load(args)
    params = _sampling_params(args, pre.generation_config, 512)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. Commands: /reset (forget the conversation), /quit (or Ctrl-D).")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = list(system)
            print("(conversation reset)")
            continue
        messages.append({"role": "user", "content": text})
        ids = pre.tokenizer.encode(_chat_render(pre.tokenizer, messages), add_special_tokens=False)
        limit = pre.model.config.context_limit
        if limit is not None and len(ids) >= limit:
            messages.pop()
            print(f"error: the conversation has {len(ids)} tokens, the context is {limit}; /reset to start again",
                  file=sys.stderr)  # fmt: skip
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        pieces = stream(pre.model, pre.tokenizer, ids, params)
        try:
            while True:
                print(next(pieces), end="", flush=True)
        except StopIteration as stop:
            reply = stop.value.text
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


# --------------------------------------------------------------------------------------------------
# info


def cmd_info(args) -> int:
    import torch

    from lmforge.config import Config
    from lmforge.model.decoder import Transformer
    from lmforge.model.hf import safetensors_files

    config = Config.from_hf(args.model)
    from pathlib import Path

    files = safetensors_files(Path(args.model))
    dtype = _checkpoint_dtype(files)
    with torch.device("meta"):
        model = Transformer(config)
    n_params = model.num_parameters()
    bytes_per = {"F32": 4, "BF16": 2, "F16": 2}.get(dtype, 4)
    kv_per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * bytes_per
    attention = {1: "multi-query"}.get(
        config.n_kv_head, "multi-head" if config.n_kv_head == config.n_head else "grouped-query"
    )
    info = {
        "family": config.model_type,
        "parameters": n_params,
        "layers": config.n_layer,
        "hidden_size": config.n_embd,
        "heads": config.n_head,
        "kv_heads": config.n_kv_head,
        "attention": attention,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "context_length": config.max_seq_len,
        "positions": config.pos_emb
        + (f" ({config.rope_scaling['rope_type']} scaling)" if config.rope_scaling else ""),
        "sliding_window": config.sliding_window,
        "tied_embeddings": config.tie_embeddings,
        "dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtype, dtype),
        "weights_bytes": n_params * bytes_per,
        "kv_cache_bytes_per_token": kv_per_token,
        "files": [f.name for f in files],
    }
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        if key.endswith("bytes") or key.endswith("bytes_per_token"):
            value = f"{_human_bytes(value)} ({value:,} bytes)"
        elif key == "parameters":
            value = f"{value / 1e6:,.2f} M ({value:,})"
        elif isinstance(value, list):
            value = ", ".join(value)
        print(f"{key.replace('_', ' '):>26}: {value}")
    return 0


def _checkpoint_dtype(files) -> str:
    """The dtype of the first tensor, read from the safetensors header (no weights are loaded)."""
    import struct

    with open(files[0], "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    for name, meta in header.items():
        if name != "__metadata__":
            return meta["dtype"]
    return "F32"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args) -> int:
    import itertools
    from pathlib import Path

    from lmforge.config import Config
    from lmforge.data.stdlib_corpus import iter_stdlib_docstrings
    from lmforge.generate import SamplingParams, stream
    from lmforge.model.decoder import Transformer
    from lmforge.pretrained import save_pretrained
    from lmforge.tokenizer_train import train_tokenizer

    out = Path(args.out) / "model"
    texts = [d.text for d in itertools.islice(iter_stdlib_docstrings(), args.documents)]
    print(
        f"[demo] training a byte-level BPE tokenizer ({args.vocab_size} tokens) on {len(texts)} stdlib docstrings"
    )
    tokenizer = train_tokenizer(texts, kind="bpe", vocab_size=args.vocab_size)
    config = Config.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, n_layer=4, n_embd=128,
                              intermediate_size=384, max_seq_len=512, eos_token_id=tokenizer.eos_id)  # fmt: skip
    model = Transformer(config)
    model.init_weights(seed=0)
    save_pretrained(model, out, tokenizer)
    print(f"[demo] saved a {model.num_parameters() / 1e6:.2f} M-parameter Llama-style checkpoint to {out}\n")
    cmd_info(argparse.Namespace(model=str(out), json=False))
    prompt = "Return the"
    print(f"\n[demo] lmforge generate --model {out} --prompt {prompt!r} --max-new-tokens 24 --seed 0")
    print(prompt, end="", flush=True)
    for piece in stream(
        model, tokenizer, tokenizer.encode(prompt), SamplingParams(max_new_tokens=24, seed=0)
    ):
        print(piece, end="", flush=True)
    print("\n\n[demo] (random weights write gibberish; try the commands above on your own checkpoints)")
    return 0


def cmd_download(args) -> int:
    """Fetch the safetensors/JSON files of a Hub repository (the only command that uses the network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CLIError("downloading needs the huggingface_hub package: pip install huggingface_hub") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]  # never pickles (.bin, .pt)
    try:
        path = snapshot_download(
            args.repo, revision=args.revision, local_dir=args.out, allow_patterns=patterns
        )
    except Exception as e:  # the hub client raises many types; one line for each
        raise CLIError(
            f"{args.repo}: download failed ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    print(path)
    return 0


def cmd_quickstart(args) -> int:
    from lmforge.quickstart import run_quickstart

    run_quickstart(args.out, max_steps=args.max_steps, vocab_size=args.vocab_size, seed=args.seed)
    return 0


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: a readable toolkit for the whole life of a large language model.",
        epilog=_fmt("""
            lmforge generate --model ./ckpt --prompt "Once upon a time"
            lmforge chat --model ./ckpt
            lmforge <command> --help
        """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from lmforge import __version__

    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = add_command(sub, "generate", cmd_generate, "generate a continuation of a prompt, streamed to the terminal", """
        lmforge generate --model ./ckpt --prompt "The capital of France is" --max-new-tokens 20 --temperature 0
        lmforge generate --model ./ckpt --prompt "Tell me a joke" --chat --top-p 0.9 --seed 1
        lmforge generate --model ./ckpt --prompt "def add(a, b):" --stop "\\n\\n" --json
    """)  # fmt: skip
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    _sampling_args(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (slow first call, faster decoding after)",
    )
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, usage, timings) as the last line of stdout")  # fmt: skip

    p = add_command(sub, "score", cmd_score, "log-probability of each token of a text, and its perplexity", """
        lmforge score --model ./ckpt --text "The quick brown fox jumps over the lazy dog."
        lmforge score --model ./ckpt --text "Hello world" --json
    """)  # fmt: skip
    _model_args(p)
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true", help="print {tokens, logprobs, perplexity}")

    p = add_command(sub, "chat", cmd_chat, "interactive multi-turn chat using the checkpoint's chat template", """
        lmforge chat --model ./ckpt
        lmforge chat --model ./ckpt --system "You are terse." --temperature 0.7
        (in the chat: /reset forgets the conversation, /quit or Ctrl-D leaves)
    """)  # fmt: skip
    _model_args(p)
    p.add_argument("--system", default=None, help="system message")
    _sampling_args(p)

    p = add_command(sub, "info", cmd_info, "describe a checkpoint: family, size, shape, dtype, memory", """
        lmforge info --model ./ckpt
        lmforge info --model ./ckpt --json
    """)  # fmt: skip
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder in Hugging Face layout")
    p.add_argument("--json", action="store_true")

    p = add_command(sub, "quickstart", cmd_quickstart, "curate, train a tokenizer, pretrain, evaluate and sample: "
                    "the whole path on the built-in stdlib corpus, minutes on a CPU", """
        lmforge quickstart --out runs/quickstart
        lmforge generate --model runs/quickstart/final --prompt "Return the"
        lmforge quickstart --out runs/qs --max-steps 100     # a shorter run
    """)  # fmt: skip
    p.add_argument(
        "--out",
        default="runs/quickstart",
        metavar="DIR",
        help="run folder; the checkpoint ends in DIR/final (default: runs/quickstart)",
    )
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps of pretraining")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)

    p = add_command(sub, "download", cmd_download, "download a checkpoint from the Hugging Face Hub (safetensors only)", """
        lmforge download HuggingFaceTB/SmolLM2-135M --out checkpoints/smollm2-135m
        lmforge generate --model checkpoints/smollm2-135m --prompt "Gravity is"
    """)  # fmt: skip
    p.add_argument("repo", help="a Hub repository id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--revision", default=None, help="branch, tag or commit")

    p = add_command(sub, "demo", cmd_demo, "build a small checkpoint from scratch, describe it, generate from it", """
        lmforge demo --out runs/demo
        lmforge generate --model runs/demo/model --prompt "Return the"
    """)  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="where the checkpoint goes (DIR/model)")
    p.add_argument("--documents", type=int, default=2000, help="stdlib docstrings to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=2048)

    for module in _PLUGINS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError) as e:  # CheckpointError and AdapterError are ValueErrors
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
