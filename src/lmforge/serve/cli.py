"""`lmforge serve`: a checkpoint behind an OpenAI-compatible API. Registered by lmforge.cli through
`register(subparsers)`; `python -m lmforge.serve` runs the same command on its own."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

EXAMPLES = """
    lmforge serve --model ./ckpt
    lmforge serve --model ./ckpt --adapter sql=./lora-sql --adapter poem=./lora-poem --port 8001
    lmforge serve --model ./ckpt --api-key-file keys.txt --request-log requests.db --max-batch 16
    # then, from Python:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).completions.create(...)
"""


def register(sub) -> None:
    from lmforge.cli import add_command

    p = add_command(
        sub, "serve", cmd_serve, "serve a checkpoint behind an OpenAI-compatible HTTP API", EXAMPLES
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder in Hugging Face layout")
    p.add_argument("--name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter folder served as model NAME (repeatable)")  # fmt: skip
    p.add_argument("--embedding-model", default="default", metavar="DIR",
                   help="embedder for /v1/embeddings: a sentence-transformers folder; default: all-MiniLM-L6-v2 "
                        "when installed; 'none' turns embeddings off")  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="API keys, one per line: every /v1 route then needs 'Authorization: Bearer <key>'")  # fmt: skip
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: 8)")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV cache slots per sequence, prompt + output (default: the context, at most 4096)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences before 429 (default: 64)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-request timeout in seconds (default: 600)"
    )
    p.add_argument("--prefix-cache-rows", type=int, default=4,
                   help="rows of recent prompts kept for prefix reuse (0: off; default: 4)")  # fmt: skip
    p.add_argument("--response-cache", type=int, default=256,
                   help="exact-match cache entries for deterministic requests (0: off; default: 256)")  # fmt: skip
    p.add_argument("--request-log", default=None, metavar="FILE", help="SQLite request log (opt-in)")
    p.add_argument("--log-prompts", action="store_true", help="also store prompts in the request log")


def cmd_serve(args) -> int:
    from pathlib import Path

    from lmforge.cli import CLIError

    if not (Path(args.model) / "config.json").is_file():
        raise CLIError(f"{args.model}: not a checkpoint folder (no config.json)")
    from lmforge.serve.adapters import AdapterError, parse_adapter_specs
    from lmforge.serve.auth import AuthError, load_api_keys

    try:
        adapters = parse_adapter_specs(args.adapter)
        keys = load_api_keys(args.api_key_file) if args.api_key_file else []
    except (AdapterError, AuthError) as e:
        raise CLIError(str(e)) from None
    for name, path in adapters.items():
        if not path.is_dir():
            raise CLIError(f"--adapter {name}: {path}: no such folder")
    if args.embedding_model not in ("default", "none") and not Path(args.embedding_model).is_dir():
        raise CLIError(f"--embedding-model {args.embedding_model}: no such folder")
    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--port", args.port),
    ):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1")
    if not keys and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without --api-key-file: anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip

    _quiet_openmp()
    import uvicorn

    from lmforge.serve.app import ServeSettings, create_app, load_models

    settings = ServeSettings(api_keys=keys, max_batch=args.max_batch, max_len=args.max_len,
                             max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                             request_timeout_s=args.timeout, prefix_pool_rows=args.prefix_cache_rows,
                             response_cache_entries=args.response_cache, request_log=args.request_log,
                             log_prompts=args.log_prompts)  # fmt: skip
    embedding = None if args.embedding_model == "none" else args.embedding_model

    def load():
        return load_models(
            args.model, adapters, embedding, dtype=args.dtype, device=args.device, name=args.name
        )

    app = create_app(load, settings)
    print(f"lmforge serve: http://{args.host}:{args.port}/v1 (GET /health is 503 until the model is loaded)",
          file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


def _quiet_openmp() -> None:
    """OpenMP workers that spin between parallel regions (the default) take the second core from the event
    loop thread, and the engine thread then waits on the GIL: on 2 CPU cores a tiny model's decode step
    went from 0.7 ms to 40 ms inside the server. Passive waiting must be set before torch loads OpenMP."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    from lmforge.cli import CLIError

    parser = argparse.ArgumentParser(prog="lmforge serve", description="serve a checkpoint behind an "
                                     "OpenAI-compatible HTTP API")  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
