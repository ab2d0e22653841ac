"""`lmforge serve`: flags, user errors, and a real server process answering on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lmforge.cli import CLIError
from lmforge.serve.cli import register


def _parse(argv):
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_flags_and_defaults(tmp_path):
    args = _parse(["--model", str(tmp_path), "--adapter", "sql=a", "--adapter", "poem=b"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.adapter == ["sql=a", "poem=b"]
    assert args.embedding_model == "default" and args.api_key_file is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adapter", "nameonly"], "expected NAME=DIR"),
        (["--adapter", "a=x", "--adapter", "a=y"], "given twice"),
        (["--adapter", "a=/no/such/dir"], "no such folder"),
        (["--api-key-file", "/no/such/file"], "no such API key file"),
        (["--max-batch", "0"], "--max-batch"),
    ],
)
def test_user_errors_are_one_line(checkpoints, extra, message):
    args = _parse(["--model", str(checkpoints["llama"][0]), "--embedding-model", "none", *extra])
    with pytest.raises(CLIError, match=message):
        args.func(args)


def test_not_a_checkpoint_is_an_error(tmp_path):
    args = _parse(["--model", str(tmp_path)])
    with pytest.raises(CLIError, match="config.json"):
        args.func(args)


def test_serve_process_answers_with_api_key(checkpoints, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# clients\nprocess-key-0123456789\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmforge.serve", "--model", str(checkpoints["llama"][0]), "--name", "tiny",
           "--embedding-model", "none", "--port", str(port), "--api-key-file", str(keys),
           "--request-log", str(tmp_path / "log.db")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        headers = {"Authorization": "Bearer process-key-0123456789"}
        body = {"model": "tiny", "prompt": "The quick", "max_tokens": 4, "temperature": 0}
        assert httpx.post(base + "/v1/completions", json=body).status_code == 401
        r = httpx.post(base + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(base + "/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert (tmp_path / "log.db").is_file()
