"""Retrieval evaluation: recall@k, MRR and nDCG@10 for BM25, dense and hybrid side by side.

A question set is JSONL, one object per line:
    {"query": "Return the largest item of an iterable.", "relevant": ["stdlib:builtins...:12"]}
`relevant` lists document ids (a chunk counts when its document is relevant; `question` is accepted for
`query`). Rankings are over documents: the chunks of a result list are reduced to their documents in
order of first appearance, so several chunks of one document count once. A line with
`"answerable": false` is a question the index cannot answer, used only to calibrate abstention.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.rag.index import MODES, Index


def read_qa(path: str | Path) -> list[dict[str, Any]]:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            query = record.get("query", record.get("question"))
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"{path}:{lineno}: no 'query' (or 'question') string")
            relevant = record.get("relevant", [])
            relevant = [relevant] if isinstance(relevant, str) else list(relevant)
            items.append({**record, "query": query, "relevant": [str(r) for r in relevant]})
    return items


def write_qa(items: Sequence[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def document_ranking(doc_ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(doc_ids))


def recall_at(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def reciprocal_rank(ranking: Sequence[str], relevant: set[str]) -> float:
    return next((1.0 / i for i, d in enumerate(ranking, 1) if d in relevant), 0.0)


def ndcg_at(ranking: Sequence[str], relevant: set[str], k: int = 10) -> float:
    """Binary-gain nDCG: sum over relevant ranks i <= k of 1/log2(i+1), over the ideal ordering's sum."""
    dcg = sum(1.0 / math.log2(i + 1) for i, d in enumerate(ranking[:k], 1) if d in relevant)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return dcg / ideal if ideal else 0.0


def evaluate(
    index: Index,
    items: Sequence[dict[str, Any]],
    modes: Sequence[str] = MODES,
    ks: Sequence[int] = (1, 5, 10),
    fetch_chunks: int = 30,
    **search_options,
) -> dict[str, dict[str, float]]:
    """{mode: {"recall@k": ..., "mrr": ..., "ndcg@10": ..., "queries": n}} over the answerable items."""
    items = [it for it in items if it.get("answerable", True) and it["relevant"]]
    if not items:
        raise ValueError("no answerable questions with relevant documents to evaluate")
    vectors = index.embedder.encode([it["query"] for it in items]) if set(modes) - {"bm25"} else None
    depth = max(max(ks), 10, fetch_chunks)
    results = {}
    for mode in modes:
        sums: dict[str, float] = {f"recall@{k}": 0.0 for k in ks} | {"mrr": 0.0, "ndcg@10": 0.0}
        for i, item in enumerate(items):
            qv = vectors[i] if vectors is not None and mode != "bm25" else None
            hits = index.search(item["query"], k=depth, mode=mode, query_vector=qv, **search_options)
            ranking = document_ranking([h.chunk.doc_id for h in hits])
            relevant = set(item["relevant"])
            for k in ks:
                sums[f"recall@{k}"] += recall_at(ranking, relevant, k)
            sums["mrr"] += reciprocal_rank(ranking, relevant)
            sums["ndcg@10"] += ndcg_at(ranking, relevant, 10)
        results[mode] = {name: value / len(items) for name, value in sums.items()} | {"queries": len(items)}
    return results


def tune_weights(
    index: Index,
    items: Sequence[dict[str, Any]],
    bm25_weights: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0),
    rrf_k: int = 60,
) -> dict[str, Any]:
    """The hybrid (bm25, dense) weights with the best recall@5 (then MRR) on `items`; dense weight 1.

    Tune on questions kept apart from those you report, or the report flatters the index."""
    trials = []
    for w in bm25_weights:
        r = evaluate(index, items, modes=("hybrid",), weights=(w, 1.0), rrf_k=rrf_k)["hybrid"]
        trials.append({"weights": [w, 1.0], "recall@5": r["recall@5"], "mrr": r["mrr"]})
    best = max(trials, key=lambda t: (round(t["recall@5"], 9), round(t["mrr"], 9), -abs(t["weights"][0] - 1)))
    return {"weights": best["weights"], "rrf_k": rrf_k, "trials": trials, "questions": len(items)}


def format_results(results: dict[str, dict[str, float]]) -> str:
    """A plain table, one row per mode."""
    metrics = [m for m in next(iter(results.values())) if m != "queries"]
    lines = [f"{'mode':<12}" + "".join(f"{m:>11}" for m in metrics)]
    for mode, values in results.items():
        lines.append(f"{mode:<12}" + "".join(f"{values[m]:>11.4f}" for m in metrics))
    lines.append(f"({next(iter(results.values()))['queries']} queries)")
    return "\n".join(lines)


def best_scores(index: Index, queries: Sequence[str], k: int = 5, mode: str = "hybrid") -> np.ndarray:
    """The retrieval confidence `ask` compares with the abstention threshold: the best cosine between
    the query and the chunks it retrieves."""
    vectors = index.embedder.encode(list(queries))
    out = np.zeros(len(queries), dtype=np.float64)
    for i, q in enumerate(queries):
        hits = index.search(q, k=k, mode=mode, query_vector=vectors[i])
        out[i] = max((h.scores.get("dense", -1.0) for h in hits), default=-1.0)
    return out


def calibrate_threshold(answerable: np.ndarray, unanswerable: np.ndarray) -> dict[str, float]:
    """The threshold on retrieval confidence that best separates answerable from unanswerable questions
    (highest balanced accuracy; midway between neighbouring scores)."""
    answerable, unanswerable = np.asarray(answerable, float), np.asarray(unanswerable, float)
    if not len(answerable) or not len(unanswerable):
        raise ValueError("calibration needs both answerable and unanswerable questions")
    values = np.unique(np.concatenate([answerable, unanswerable]))
    candidates = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-6]])
    best = None
    for t in candidates:
        kept = float((answerable >= t).mean())
        rejected = float((unanswerable < t).mean())
        score = (kept + rejected) / 2
        if best is None or score > best["balanced_accuracy"] + 1e-12:
            best = {"threshold": float(t), "balanced_accuracy": score, "answerable_kept": kept,
                    "unanswerable_rejected": rejected}  # fmt: skip
    assert best is not None
    return best | {"n_answerable": len(answerable), "n_unanswerable": len(unanswerable)}


#: Questions no ordinary technical knowledge base answers, the default unanswerable side of calibration.
OFF_TOPIC_QUESTIONS = (
    "What is the capital of Australia?",
    "How long should I boil an egg for a soft yolk?",
    "Who won the football World Cup in 1998?",
    "What is the boiling point of water at the top of Mount Everest?",
    "How many moons does Jupiter have?",
    "Which painter cut off part of his own ear?",
    "What is a good recipe for banana bread?",
    "How do I change a flat tyre on a bicycle?",
    "What year did the Berlin Wall fall?",
    "How many bones are in the adult human body?",
    "What is the tallest mountain in Africa?",
    "Who wrote the novel Pride and Prejudice?",
    "What is photosynthesis in plants?",
    "How fast can a cheetah run?",
    "What are the rules of cricket?",
    "Which planet is known as the red planet?",
    "How do I grow tomatoes on a balcony?",
    "What is the population of Brazil?",
    "Who composed the Four Seasons violin concertos?",
    "What causes the northern lights?",
    "How much caffeine is in a cup of espresso?",
    "What language is spoken in Portugal?",
    "When did the first humans land on the Moon?",
    "How do whales sleep?",
    "What is the best way to learn to swim as an adult?",
    "Which river flows through Cairo?",
    "How many players are on a rugby union team?",
    "What is the main ingredient of guacamole?",
    "Why is the sky blue during the day?",
    "Who painted the ceiling of the Sistine Chapel?",
    "What is the recommended tyre pressure for a family car?",
    "How do bees make honey?",
)
