"""The `lmforge` command: the model-core subcommands, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.cli import main


def run(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def test_help_lists_commands_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "score", "chat", "info"):
        assert cmd in out
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_generate_json(checkpoints, capsys):
    folder = str(checkpoints["llama"][0])
    assert main(["generate", "--model", folder, "--prompt", "The quick", "--max-new-tokens", "7",
                 "--temperature", "0", "--json"]) == 0  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert len(result["tokens"]) == result["usage"]["completion_tokens"] == 7
    assert result["usage"]["prompt_tokens"] > 0
    assert set(result["timings"]) >= {"prefill_s", "decode_s"}
    assert isinstance(result["text"], str)


def test_generate_streams_text(checkpoints, capsys):
    folder = str(checkpoints["gpt2"][0])
    assert main(["generate", "--model", folder, "--prompt", "Pack my box", "--max-new-tokens", "12",
                 "--seed", "1"]) == 0  # fmt: skip
    assert capsys.readouterr().out.endswith("\n")


def test_score_json(checkpoints, capsys):
    folder = str(checkpoints["qwen2"][0])
    assert main(["score", "--model", folder, "--text", "The quick brown fox", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["logprobs"]) == len(result["tokens"]) and result["logprobs"][0] is None
    assert all(lp < 0 for lp in result["logprobs"][1:])
    assert result["perplexity"] > 1


def test_info(checkpoints, capsys):
    folder = str(checkpoints["mistral"][0])
    assert main(["info", "--model", folder, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "mistral" and info["layers"] == 2 and info["kv_heads"] == 2
    assert info["attention"] == "grouped-query" and info["sliding_window"] == 8
    assert info["weights_bytes"] == info["parameters"] * 4
    assert main(["info", "--model", folder]) == 0
    assert "parameters" in capsys.readouterr().out


def test_chat_multi_turn_with_reset(checkpoints):
    folder = str(checkpoints["llama"][0])
    proc = run("chat", "--model", folder, "--max-new-tokens", "5", "--temperature", "0",
               stdin="Hello\nHow are you?\n/reset\nAgain\n/quit\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(conversation reset)" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line != "(conversation reset)"]
    assert len(lines) >= 3  # one reply line per user turn


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nonexistent/ckpt", "--prompt", "x"], "no such folder"),
        (["info", "--model", "/nonexistent/ckpt"], "no config.json"),
    ],
)
def test_errors_are_one_line(args, message, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("lmforge ")


def test_bad_config_and_unknown_family_and_long_prompt(checkpoints, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["info", "--model", str(tmp_path)]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "unsupported model_type 'bloom'" in err and "llama" in err
    folder = str(checkpoints["gpt2"][0])
    assert main(["generate", "--model", folder, "--prompt", "fox " * 200]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "context is 128" in err


def test_cli_as_subprocess_has_no_traceback(checkpoints):
    proc = run("generate", "--model", "/nonexistent", "--prompt", "x")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_download_offline_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "nobody/nothing", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "download failed" in err


def test_generate_and_score_with_adapter(checkpoints, tmp_path, capsys):
    import torch

    from lmforge.finetune import LoraConfig, add_lora, save_adapter
    from lmforge.model import load_model

    folder = str(checkpoints["llama"][0])
    model = load_model(folder, device="cpu")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a trained-looking adapter: B nonzero, so it changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "ad")

    def score(*extra):
        assert main(["score", "--model", folder, "--text", "The quick brown fox", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["logprobs"]

    base, adapted = score(), score("--adapter", f"mine={tmp_path / 'ad'}")
    assert base[1:] != adapted[1:]
    assert main(["generate", "--model", folder, "--prompt", "Pack", "--adapter", str(tmp_path / "ad"),
                 "--max-new-tokens", "3", "--temperature", "0", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["usage"]["completion_tokens"] == 3
    assert main(["score", "--model", folder, "--text", "x y", "--adapter", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err
