"""Retrieval speed: index build throughput and query latency for BM25, dense and hybrid search.

    python benchmarks/bench_rag.py                       # 10k and 100k chunks, flat and HNSW
    python benchmarks/bench_rag.py --sizes 10000 --queries 100 --json results.json

Embedding dominates building an index, so it is measured on its own (real MiniLM on ~190-token chunks).
The large indexes then use synthetic chunks (Zipf-distributed pseudo-words, ~130 words each) with
random unit vectors standing in for their embeddings; "build" is everything else (chunk bookkeeping,
FAISS, BM25, writing the folder). Query latency always includes embedding the query with MiniLM, as a
user's query would be; hybrid = both retrievers + weighted RRF.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.embed import SentenceEncoder
from lmforge.rag.chunking import Chunk
from lmforge.rag.index import Index

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "ti",
    "vo",
    "ze",
    "pa",
    "qui",
    "dor",
    "fen",
    "gal",
    "hus",
    "jin",
]


def vocabulary(n: int, rng: np.random.Generator) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES, size=rng.integers(2, 5))))
    return sorted(words)


def synthetic_texts(n: int, words: list[str], rng: np.random.Generator, length: int = 130) -> list[str]:
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1  # Zipf-like word frequencies, as in natural text
    ids = rng.choice(len(words), size=(n, length), p=p / p.sum())
    vocab = np.array(words)
    return [" ".join(row) + "." for row in vocab[ids]]


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def bench_embedding(embedder: SentenceEncoder, n: int = 192) -> dict:
    from lmforge.rag.stdlib_kb import stdlib_documents

    text = " ".join(d.text for d in stdlib_documents(limit=400))
    ids = embedder.tokenizer.encode(text, add_special_tokens=False)
    chunks = [embedder.tokenizer.decode(ids[i : i + 190]) for i in range(0, 190 * n, 190)][:n]
    embedder.encode(chunks[:8])
    t0 = time.perf_counter()
    embedder.encode(chunks, batch_size=32)
    seconds = time.perf_counter() - t0
    return {
        "chunks": len(chunks),
        "tokens_per_chunk": 190,
        "seconds": seconds,
        "chunks_per_s": len(chunks) / seconds,
    }


def bench_index(
    embedder, size: int, kind: str, n_queries: int, rng: np.random.Generator, words: list[str]
) -> dict:
    texts = synthetic_texts(size, words, rng)
    chunks = [Chunk(f"doc{i}", t, 0, len(t), 130, {"source": f"doc{i}.txt"}) for i, t in enumerate(texts)]
    vectors = rng.standard_normal((size, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        index = Index.create(Path(tmp) / "idx", embedder, dense=kind)
        t0 = time.perf_counter()
        index.add_chunks(chunks, vectors)
        index.save()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = Index.load(Path(tmp) / "idx", embedder)
        load_s = time.perf_counter() - t0
        queries = [" ".join(rng.choice(words[:3000], size=5)) for _ in range(n_queries)]
        out = {
            "chunks": size,
            "dense": kind,
            "build_s": build_s,
            "build_chunks_per_s": size / build_s,
            "load_s": load_s,
        }
        runs = {
            "bm25": lambda q: index.search(q, k=5, mode="bm25"),
            "dense": lambda q: index.search(q, k=5, mode="dense"),
            "hybrid": lambda q: index.search(q, k=5, mode="hybrid"),
            "embed_query": index.embed_query,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i, q in enumerate(queries[:10] + queries):  # the first 10 warm up
            for name, run in runs.items():  # interleaved, so load from other processes hits all alike
                t0 = time.perf_counter()
                run(q)
                if i >= 10:
                    times[name].append(time.perf_counter() - t0)
        for name, values in times.items():
            out[f"{name}_p50_ms"], out[f"{name}_p95_ms"] = percentiles(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--kinds", default="flat,hnsw", help="FAISS index kinds to measure")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: theirs)")
    parser.add_argument("--json", metavar="FILE", default=None)
    args = parser.parse_args()
    if args.threads:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    embedder = SentenceEncoder.load()
    results = {"machine": machine(), "embedding": bench_embedding(embedder), "indexes": []}
    e = results["embedding"]
    print(f"machine: {results['machine']}")
    print(f"embedding (all-MiniLM-L6-v2): {e['chunks_per_s']:.1f} chunks/s of {e['tokens_per_chunk']} tokens")
    words = vocabulary(20000, rng)
    header = "| chunks | dense | build (chunks/s) | BM25 p50 / p95 | dense p50 / p95 | hybrid p50 / p95 | query embedding p50 |"
    print("\n" + header + "\n|" + "---|" * 7)
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            r = bench_index(embedder, size, kind, args.queries, rng, words)
            results["indexes"].append(r)
            print(f"| {size:,} | {kind} | {r['build_chunks_per_s']:,.0f} | {r['bm25_p50_ms']:.1f} / {r['bm25_p95_ms']:.1f} ms "
                  f"| {r['dense_p50_ms']:.1f} / {r['dense_p95_ms']:.1f} ms | {r['hybrid_p50_ms']:.1f} / {r['hybrid_p95_ms']:.1f} ms "
                  f"| {r['embed_query_p50_ms']:.1f} ms |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
