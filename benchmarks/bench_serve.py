"""Serving throughput and latency: a load generator against `lmforge serve` on 127.0.0.1.

    python benchmarks/bench_serve.py                                # smollm2-135m shape, 1 / 8 / 32 clients
    python benchmarks/bench_serve.py --preset tiny-llama --requests 16 --max-tokens 32

Every sampled token decodes to text (the tokenizer is filled up to the model's vocabulary), so each
token is one streamed chunk and TTFT/ITL are per token. The server runs in its own process (as in production; the client's Python does not share its GIL) on a
randomly initialised checkpoint built here. Each concurrency level sends the same requests (distinct
prompts of --prompt-tokens tokens, greedy, --max-tokens new tokens, streamed with usage); `clients`
workers each keep one request in flight. Reported, as vLLM's benchmark_serving reports them:
requests/s, output tokens/s, TTFT (time to first token), TPOT (time per output token after the first)
and ITL (time between streamed chunks), each as p50 / p95 / p99 in ms.

The 1-client level is the baseline of serving the same requests one after another; the speed-up at 8
clients is output tok/s at 8 over output tok/s at 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
)


def build_checkpoint(preset: str, folder: Path, n_layer: int | None) -> None:
    """A random `preset`-shaped model with a small byte-level BPE tokenizer, filled up to the model's
    vocabulary with added tokens (" w12345"), so every sampled id decodes to text and streams a chunk."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    from lmforge.config import Config
    from lmforge.model.decoder import Transformer
    from lmforge.pretrained import save_pretrained
    from lmforge.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator([_TEXT] * 50, trainer)
    vocab = Config.from_name(preset).vocab_size
    n = backend.get_vocab_size()
    backend.add_tokens([AddedToken(f" w{i}", normalized=False) for i in range(n, vocab)])
    tokenizer = Tokenizer(
        backend, special_tokens={"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    )
    overrides = {"eos_token_id": tokenizer.eos_id, "vocab_size": vocab}
    if n_layer:
        overrides["n_layer"] = n_layer
    model = Transformer(Config.from_name(preset, **overrides))
    model.init_weights(seed=0)
    save_pretrained(model, folder, tokenizer)


def make_prompts(n: int, n_tokens: int, folder: Path) -> list[str]:
    """n distinct prompts of about n_tokens tokens each."""
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(folder)
    words = _TEXT.split()
    prompts = []
    for i in range(n):
        text, k = f"Request {i}:", i
        while len(tok.encode(text)) < n_tokens:
            text += " " + words[k % len(words)]
            k += 7
        prompts.append(text)
    return prompts


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    xs = sorted(values)

    def pick(q):
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1000

    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "mean": statistics.fmean(xs) * 1000}


async def one_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    chunk_times, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            if data["choices"] and data["choices"][0]["text"]:
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    out = usage["completion_tokens"] if usage else len(chunk_times)
    ttft = (chunk_times[0] if chunk_times else end) - start
    return {"start": start, "end": end, "ttft": ttft, "output_tokens": out,
            "tpot": (end - start - ttft) / (out - 1) if out > 1 else None,
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])]}  # fmt: skip


async def run_level(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, prompts[0], 4)  # warm up the connection and the server

        async def worker():
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await one_request(client, url, prompt, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["output_tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_ms": percentiles([r["ttft"] for r in ok]),
        "tpot_ms": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": percentiles([x for r in ok for x in r["itl"]]),
    }


def start_server(folder: Path, port: int, max_batch: int, max_len: int, omp_wait_policy: str | None):
    cmd = [sys.executable, "-m", "lmforge.serve", "--model", str(folder), "--name", "bench", "--port", str(port),
           "--embedding-model", "none", "--max-batch", str(max_batch), "--max-len", str(max_len),
           "--max-queue", "1024", "--response-cache", "0"]  # fmt: skip
    env = dict(os.environ)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument(
        "--n-layer", type=int, default=None, help="override the preset's layers (a smaller model)"
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=32, help="requests per level (the same ones each level)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    ap.add_argument(
        "--omp-wait-policy",
        default=None,
        choices=["PASSIVE", "ACTIVE"],
        help="the server's OMP_WAIT_POLICY (default: what `lmforge serve` sets, PASSIVE)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_checkpoint(args.preset, folder, args.n_layer)
        prompts = make_prompts(args.requests, args.prompt_tokens, folder)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        max_len = args.prompt_tokens + args.max_tokens + 64
        proc = start_server(folder, port, args.max_batch, max_len, args.omp_wait_policy)
        url = f"http://127.0.0.1:{port}"
        try:
            levels = [asyncio.run(run_level(url, prompts, c, args.max_tokens)) for c in args.concurrency]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}  # fmt: skip
    print(f"\n{args.preset}{f' ({args.n_layer} layers)' if args.n_layer else ''}, CPU float32, {args.requests} "
          f"requests of {args.prompt_tokens} prompt tokens -> {args.max_tokens} new tokens, greedy, streamed; {machine}")  # fmt: skip
    print(f"{'clients':>7} {'req/s':>7} {'out tok/s':>9} | {'TTFT p50/p95/p99 ms':>22} | "
          f"{'TPOT p50/p95/p99 ms':>20} | {'ITL p50/p95/p99 ms':>20} | errors")  # fmt: skip
    for lv in levels:
        t, o, i = lv["ttft_ms"], lv["tpot_ms"], lv["itl_ms"]
        print(f"{lv['clients']:>7} {lv['requests_per_s']:>7.2f} {lv['output_tokens_per_s']:>9.1f} | "
              f"{t['p50']:>6.0f} {t['p95']:>6.0f} {t['p99']:>6.0f}     | {o['p50']:>6.1f} {o['p95']:>6.1f} "
              f"{o['p99']:>6.1f} | {i['p50']:>6.1f} {i['p95']:>6.1f} {i['p99']:>6.1f} | {lv['errors']}")  # fmt: skip
    base = next((lv for lv in levels if lv["clients"] == 1), None)
    if base:
        for lv in levels:
            if lv["clients"] != 1:
                speedup = lv["output_tokens_per_s"] / base["output_tokens_per_s"]
                print(
                    f"speed-up at {lv['clients']} clients over one after another: {speedup:.2f}x output tok/s"
                )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"machine": machine, "args": vars(args), "levels": levels}, indent=2)
        )


if __name__ == "__main__":
    main()
