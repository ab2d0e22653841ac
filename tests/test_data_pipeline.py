"""End to end: prepare() on a small hand-made corpus, with exact counts in the report."""

import json
from pathlib import Path

import pytest

from lmforge.data import DataError, PrepareConfig, prepare

GOOD = (
    "The module provides a small set of helpers for reading configuration files written in a "
    "simple format. Each section starts with a name in brackets, followed by key and value pairs "
    "separated by an equals sign. Comments begin with a semicolon and run to the end of their line. "
    "Values keep their surrounding quotes unless the parser is told to strip them, which makes it "
    "possible to store strings containing leading spaces. Errors name the file and the line number "
    "where parsing stopped, so that mistakes are quick to find."
)
OTHER = (
    "A queue hands work from producers to consumers running in separate threads. Putting an item "
    "blocks while the queue is full and getting one blocks while it is empty, unless a timeout is "
    "given. The task_done method lets a consumer report that it finished an item."
)
EVAL = (
    "Evaluation question: which planet in our solar system has the largest number of known moons "
    "according to the most recent survey published by astronomers last year?"
)
CONTAMINATED = (
    "Some trivia for the quiz night: which planet in our solar system has the largest number of "
    "known moons according to the most recent survey? Saturn, it seems."
)
PII = "Questions about the release go to maintainer@example.org or to the office at 555-123-4567 during the week."


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a_good.txt").write_text(GOOD, encoding="utf-8")
    (root / "b_exact_copy.md").write_text(GOOD.upper().replace(". ", ".\n\n"), encoding="utf-8")
    (root / "c_near_copy.txt").write_text(GOOD.replace("semicolon", "hash"), encoding="utf-8")
    (root / "d_short.txt").write_text("Too short.", encoding="utf-8")
    (root / "e_empty.txt").write_text(" \t\n\x00\n", encoding="utf-8")
    (root / "notes.csv").write_text("not,read", encoding="utf-8")
    lines = [
        json.dumps({"text": OTHER, "lang": "en"}),
        '{"text": "broken',
        json.dumps({"text": PII}),
        json.dumps({"text": CONTAMINATED}),
    ]
    (root / "sub" / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"question": EVAL, "answer": "Saturn"}) + "\n", encoding="utf-8"
    )
    return root


def _config(corpus: Path, out: Path, **overrides) -> PrepareConfig:
    values = dict(
        inputs=[str(corpus)],
        output_dir=str(out),
        on_error="skip",
        decontaminate=[str(corpus.parent / "eval.jsonl")],
        splits={"train": 0.5, "validation": 0.25, "test": 0.25},
        progress=False,
        write_rejected=True,
    )
    values.update(overrides)
    return PrepareConfig(**values)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_report_counts_every_document(corpus, tmp_path):
    out = tmp_path / "out"
    report = prepare(_config(corpus, out))

    assert report.documents_in == 8
    assert report.read_errors == 1
    assert report.read_error_examples == [
        f"{corpus / 'sub' / 'records.jsonl'}:2: malformed JSON: Unterminated string starting at (column 10)"
    ]
    assert report.ignored_files == [f"{corpus / 'notes.csv'}: unknown file type"]
    removed = {name: stage.removed_documents for name, stage in report.stages.items()}
    assert removed == {
        "cleaning": 1,
        "exact_dedup": 1,
        "quality": 1,
        "near_dedup": 1,
        "decontamination": 1,
        "pii": 0,
    }
    assert {r: s.documents for r, s in report.stages["quality"].reasons.items()} == {"word_count": 1}
    assert report.stages["quality"].reasons["word_count"].examples[0].detail == "word_count: 2 < min 3"
    near = report.stages["near_dedup"].reasons["near_duplicate"].examples[0]
    assert near.id == str(corpus / "c_near_copy.txt") and f"similar to {corpus / 'a_good.txt'}" in near.detail
    assert report.pii == {"email": 1, "phone": 1}
    assert report.stages["pii"].modified_documents == 1
    assert report.documents_out == 3
    assert sum(split.documents for split in report.splits.values()) == 3
    assert report.documents_in == report.documents_out + sum(removed.values())

    written = {name: _lines(out / f"{name}.jsonl") for name in ("train", "validation", "test")}
    assert {name: len(records) for name, records in written.items()} == {
        name: split.documents for name, split in report.splits.items()
    }
    texts = {r["text"] for records in written.values() for r in records}
    assert texts == {
        GOOD,
        OTHER,
        PII.replace("maintainer@example.org", "<EMAIL>").replace("555-123-4567", "<PHONE>"),
    }
    other = next(r for records in written.values() for r in records if r["text"] == OTHER)
    assert other["meta"] == {"lang": "en", "source": str(corpus / "sub" / "records.jsonl"), "line": 1}
    assert len(_lines(out / "rejected.jsonl")) == 5


def test_report_files_and_no_temporary_files(corpus, tmp_path):
    out = tmp_path / "out"
    report = prepare(_config(corpus, out))
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "length_histogram.png",
        "rejected.jsonl",
        "report.json",
        "report.md",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["documents_in"] == 8 and saved["documents_out"] == report.documents_out
    assert saved["stages"]["quality"]["reasons"]["word_count"]["documents"] == 1
    assert saved["config"]["splits"] == {"train": 0.5, "validation": 0.25, "test": 0.25}
    assert PrepareConfig.from_dict(saved["config"]) == _config(corpus, out)  # the run can be repeated
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| read | 8 |" in markdown and "| removed by near_dedup | 1 |" in markdown
    assert (out / "length_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_are_identical(corpus, tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    prepare(_config(corpus, first))
    prepare(_config(corpus, second))
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "rejected.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_failure_leaves_previous_output_untouched(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("previous run\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"records.jsonl:2: malformed JSON"):
        prepare(_config(corpus, out, on_error="fail"))
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]
    assert (out / "train.jsonl").read_text(encoding="utf-8") == "previous run\n"


def test_stages_can_be_switched_off_from_a_dict(corpus, tmp_path):
    config = PrepareConfig.from_dict(
        {
            "inputs": str(corpus),  # a single path is accepted
            "output_dir": tmp_path / "out",
            "on_error": "skip",
            "quality_filter": False,
            "dedup": {"exact": False, "near": False},
            "scrub_pii": False,
            "progress": False,
            "max_documents": 6,
        }
    )
    report = prepare(config)
    assert list(report.stages) == ["cleaning"]
    assert report.stopped_early and report.documents_in == 6 and report.documents_out == 5
    assert report.pii == {}


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="unknown data setting"):
        PrepareConfig.from_dict({"inptus": ["x"]})
    with pytest.raises(DataError, match="unknown dedup setting"):
        PrepareConfig.from_dict({"dedup": {"treshold": 0.5}})
    with pytest.raises(DataError, match="must sum to 1"):
        prepare({"inputs": [str(tmp_path)], "splits": {"train": 0.5}, "output_dir": str(tmp_path / "o")})
    with pytest.raises(DataError, match="inside the input folder"):
        prepare({"inputs": [str(tmp_path)], "output_dir": str(tmp_path / "out")})
