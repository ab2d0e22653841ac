"""Tokenising curated JSONL into binary shards, and the `lmforge data` / `lmforge tokenizer` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

import lmforge.cli
from lmforge.data.tokenize import find_splits, tokenize_splits
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import train_tokenizer
from lmforge.train.dataset import open_split, read_meta

DOCS = {
    "train": [
        "Return the number of items in the container.",
        "Split the string at the last occurrence of sep.",
        "",  # empty records are skipped, never written as a lone separator
        "Open the file and return a stream.\n\n    Indented detail line.",
        "A document that spells <|endoftext|> in its text must not forge a boundary.",
    ],
    "validation": ["Return a copy of the sequence.", "naïve café 日本語 🤖"],
}


def write_splits(folder: Path, docs: dict[str, list[str]] = DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts in docs.items():
        lines = [json.dumps({"id": f"{split}:{i}", "text": t, "meta": {}}) for i, t in enumerate(texts)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "rejected.jsonl").write_text(json.dumps({"id": "x", "text": "rejected text"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = [t for texts in DOCS.values() for t in texts] * 3
    return train_tokenizer(text, vocab_size=320)


def expected_stream(tok: Tokenizer, texts: list[str], eos_id: int) -> list[int]:
    """tokenizer.encode of each non-empty document, each followed by EOS; text spelling a special
    token is encoded as ordinary text (encode_special_tokens)."""
    plain = BackendTokenizer.from_str(tok.backend.to_str())
    plain.encode_special_tokens = True
    stream: list[int] = []
    for text in texts:
        if text:
            ids = tok.encode(text) if "<|" not in text else plain.encode(text).ids
            stream += ids + [eos_id]
    return stream


def test_tokenize_writes_encoded_documents_separated_by_eos(tokenizer, tmp_path):
    data = write_splits(tmp_path / "data")
    assert list(find_splits(data)) == ["train", "validation"]  # rejected.jsonl is not a split
    result = tokenize_splits(data, tokenizer, tmp_path / "shards", progress=False)
    eos = tokenizer.eos_id
    assert result.eos_id == eos == 0 and result.dtype == "uint16"
    meta = read_meta(tmp_path / "shards")
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["eos_id"] == eos
    for split, texts in DOCS.items():
        stream = open_split(tmp_path / "shards", split)
        assert stream.dtype == np.dtype("<u2")
        assert stream.tolist() == expected_stream(tokenizer, texts, eos)
        assert meta["n_tokens"][split] == len(stream)
    assert result.splits["train"].documents == 4 and result.splits["train"].skipped_empty == 1
    # the literal "<|endoftext|>" in a document is text, not the separator
    assert int((open_split(tmp_path / "shards", "train") == eos).sum()) == 4
    # the shards travel with their tokenizer
    assert Tokenizer.from_dir(tmp_path / "shards" / "tokenizer").encode("Return") == tokenizer.encode(
        "Return"
    )


def test_tokenize_is_deterministic(tokenizer, tmp_path):
    data = write_splits(tmp_path / "data")
    tokenize_splits(data, tokenizer, tmp_path / "a", progress=False, batch_size=2)
    tokenize_splits(data, tokenizer, tmp_path / "b", progress=False, batch_size=1000)
    for name in ("train.bin", "validation.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_post_processor_bos_is_kept_and_eos_not_doubled(tokenizer, tmp_path):
    tok = Tokenizer.from_dir(_saved(tokenizer, tmp_path / "tok"))
    bos, eos = tok.token_to_id("<|im_start|>"), tok.eos_id
    tok.backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|endoftext|>", special_tokens=[("<|im_start|>", bos), ("<|endoftext|>", eos)]
    )
    texts = ["First document.", "Second one."]
    data = write_splits(tmp_path / "data", {"train": texts})
    tokenize_splits(data, tok, tmp_path / "shards", progress=False)
    plain = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert open_split(tmp_path / "shards", "train").tolist() == [bos, *plain[0], eos, bos, *plain[1], eos]


def test_tokenize_reports_bad_records_with_file_and_line(tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: malformed JSON"):
        tokenize_splits(data, tokenizer, tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards" / "train.bin").exists()


def _saved(tok: Tokenizer, folder: Path) -> Path:
    tok.save(folder)
    return folder


# ---- the commands, through lmforge.cli.main ----


@pytest.fixture
def cli(monkeypatch):
    if "lmforge.data.cli" not in lmforge.cli._PLUGINS:
        monkeypatch.setattr(lmforge.cli, "_PLUGINS", [*lmforge.cli._PLUGINS, "lmforge.data.cli"])
    return lmforge.cli.main


def test_commands_end_to_end(cli, tmp_path, capsys):
    from lmforge.config import Config
    from lmforge.model import Transformer, load_model, save_model

    data, tok_dir, med, shards = (tmp_path / n for n in ("data", "tok", "med", "shards"))
    assert cli(["data", "prepare", "--out", str(data), "--max-documents=300", "--dedup.threshold=0.9",
                "--splits={train: 0.9, validation: 0.1}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "written" in out and "validation" in out
    report = json.loads((data / "report.json").read_text())
    assert report["documents_in"] == 300 and report["config"]["dedup"]["threshold"] == 0.9

    assert cli(["tokenizer", "train", "--data", str(data), "--out", str(tok_dir), "--vocab-size", "512"]) == 0
    assert "characters per token" in capsys.readouterr().out
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.vocab_size == 512 and tok.chat_template is not None

    model_dir = tmp_path / "model"
    model = Transformer(Config.from_name("tiny-llama", vocab_size=512))
    model.init_weights(seed=0)
    save_model(model, model_dir)
    codes = tmp_path / "codes.txt"
    codes.write_text("ICD10:E11.9\nICD10:I10\n\n")
    assert cli(["tokenizer", "extend", "--tokens", str(codes), "--out", str(med),
                "--tokenizer", str(tok_dir), "--model", str(model_dir)]) == 0  # fmt: skip
    assert "added 2 token(s)" in capsys.readouterr().out
    extended, resized = Tokenizer.from_dir(med), load_model(med, device="cpu")
    assert extended.encode("ICD10:I10") == [513] and resized.config.vocab_size == 514
    torch.testing.assert_close(resized.embed_tokens.weight[512], model.embed_tokens.weight.mean(0))

    assert cli(["data", "tokenize", "--data", str(data), "--tokenizer", str(med), "--out", str(shards)]) == 0
    assert "train" in capsys.readouterr().out
    meta = read_meta(shards)
    assert meta["vocab_size"] == 514 and set(meta["n_tokens"]) == {"train", "validation"}
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])["text"]
    ids = extended.encode(first)
    assert open_split(shards, "train")[: len(ids) + 1].tolist() == [*ids, extended.eos_id]


def test_prepare_reads_yaml_config_and_options_win(cli, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"Document number {i} talks about topic {i * 7} in plain words.")
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data:\n  inputs: [{corpus}]\n  output_dir: {tmp_path / 'ignored'}\n  scrub_pii: false\n"
    )
    assert (
        cli(
            [
                "data",
                "prepare",
                "--config",
                str(config),
                "--out",
                str(tmp_path / "out"),
                "--quality.min-words=3",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["documents_in"] == 6 and report["config"]["scrub_pii"] is False
    assert report["config"]["quality"]["min_words"] == 3
    assert not (tmp_path / "ignored").exists()


def _one_line_error(capsys, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    return err


def test_command_errors_are_one_line(cli, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("inputs: [a\nmax_documents: 3\n")
    assert cli(["data", "prepare", "--config", str(bad_yaml), "--out", str(tmp_path / "o")]) == 1
    _one_line_error(capsys, f"{bad_yaml}:")

    typo = tmp_path / "typo.yaml"
    typo.write_text("max_document: 3\n")
    assert cli(["data", "prepare", "--config", str(typo), "--out", str(tmp_path / "o")]) == 1
    _one_line_error(capsys, "unknown data setting(s): max_document")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"no_text": 1}\n')
    assert cli(["data", "prepare", str(bad), "--out", str(tmp_path / "o")]) == 1
    _one_line_error(capsys, f"{bad}:2: missing field 'text'")

    assert cli(["tokenizer", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 1
    _one_line_error(capsys, "no such file or folder")

    assert (
        cli(
            [
                "data",
                "tokenize",
                "--data",
                str(tmp_path),
                "--tokenizer",
                str(tmp_path),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 1
    )
    _one_line_error(capsys, "tokenizer.json")

    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, exit 2
        cli(["data", "prepare", "--max-documents=many"])
    assert exit_info.value.code == 2
    assert "expected int" in capsys.readouterr().err


def test_help_shows_examples(cli, capsys):
    for command in (
        ["data", "prepare"],
        ["data", "tokenize"],
        ["tokenizer", "train"],
        ["tokenizer", "extend"],
    ):
        with pytest.raises(SystemExit):
            cli([*command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"lmforge {' '.join(command)}" in out
