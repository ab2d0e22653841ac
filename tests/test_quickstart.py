"""The quickstart end to end, shortened: every stage runs and leaves its files; the checkpoint loads
in transformers and in `lmforge generate`."""

from __future__ import annotations

import json

from lmforge.cli import main


def test_quickstart_short_run(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--max-steps", "6", "--vocab-size", "512"]) == 0
    printed = capsys.readouterr().out
    assert "validation perplexity" in printed and "unigram baseline" in printed
    for path in ("data/report.json", "tokenizer/tokenizer.json", "tokens/meta.json", "run/metrics.jsonl",
                 "final/config.json", "final/model.safetensors", "final/tokenizer.json", "report.md"):  # fmt: skip
        assert (out / path).is_file(), path
    steps = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == list(range(1, 7))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert main(["generate", "--model", str(out / "final"), "--prompt", "Return the", "--max-new-tokens", "5",
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["usage"]["completion_tokens"] <= 5
