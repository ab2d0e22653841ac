"""A retrieval index: chunks, their embeddings, a BM25 index (bm25s) and a dense index (FAISS), in one folder.

    INDEX/manifest.json   embedding model (name, path, fingerprint, dim), chunking settings, dense index kind,
                          counts, abstention threshold; written last on every save
    INDEX/chunks.jsonl    one chunk per line: id, doc_id, offsets, n_tokens, text, meta
    INDEX/vectors.npy     (N, D) float32 chunk embeddings, row i = line i of chunks.jsonl
    INDEX/dense.faiss     FAISS IndexIDMap2 over IndexFlatIP (exact, default) or IndexHNSWFlat
    INDEX/bm25/           the bm25s index over the chunk texts

Adding documents embeds only their new chunks (a chunk whose text is already indexed reuses its vector),
deleting removes their chunks and vectors; neither re-embeds the rest. BM25's statistics (document
frequencies, average length) depend on every chunk, so the BM25 part is rebuilt from the stored texts,
which takes seconds per 100k chunks and needs no model. An HNSW graph cannot remove vectors: deleted ids
are kept as tombstones that searches skip, and the graph is rebuilt from the stored vectors once they
pass a quarter of it.

Retrieval modes: "bm25", "dense" (cosine: the vectors are unit length) and "hybrid", weighted reciprocal
rank fusion (Cormack et al. 2009):  score(c) = sum_r w_r / (k + rank_r(c)),  ranks from 1, k = 60.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.document import Document
from lmforge.rag.chunking import Chunk, chunk_document

INDEX_FORMAT = "lmforge-rag-index"
INDEX_VERSION = 1
MODES = ("bm25", "dense", "hybrid")
_COMPACT_FRACTION = 0.25  # rebuild an HNSW graph when this share of it is tombstones


class RagIndexError(ValueError):
    """An index folder that cannot be used as asked; the message says why and what to do."""


class IndexMismatchError(RagIndexError):
    """The index was built with another embedding model than the one given."""


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the mode's score: BM25, cosine, or the fused RRF score
    rank: int  # from 1
    scores: dict[str, float] = field(default_factory=dict)  # bm25, bm25_rank, dense, dense_rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, **self.scores, "chunk": self.chunk.to_dict()}


@dataclass
class AddReport:
    documents: int = 0
    chunks: int = 0
    embedded: int = 0  # chunks that went through the model
    reused: int = 0  # chunks whose vector was already in the index
    replaced: int = 0  # documents that replaced an indexed version
    seconds: float = 0.0


Filters = dict[str, Any]


def _text_key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _matches(value: Any, wanted: Any) -> bool:
    if callable(wanted):
        return bool(wanted(value))
    if isinstance(wanted, (list, tuple, set, frozenset)):
        return value in wanted
    return value == wanted


def _atomic_write(final: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Index:
    """Open with `Index.create(path, ...)` or `Index.load(path)`; `add_documents`, `delete_documents`,
    `search`; changes reach the disk on `save()`."""

    def __init__(self, path: Path, manifest: dict[str, Any], embedder=None):
        self.path = Path(path)
        self.manifest = manifest
        self._embedder = embedder
        self.chunks: list[Chunk] = []
        self.vectors = np.zeros((0, manifest["embedder"]["dim"]), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)
        self._row: dict[int, int] = {}
        self._tombstones: set[int] = set()
        self._faiss = None
        self._bm25 = None  # None = must be rebuilt from the chunk texts
        self._by_text: dict[str, int] | None = None

    # ---- creating and opening ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        embedder=None,
        chunk_tokens: int = 200,
        overlap_tokens: int = 32,
        dense: str = "flat",
        hnsw_m: int = 32,
        ef_search: int = 64,
        overwrite: bool = False,
        bm25_fields: Sequence[str] = ("title", "section", "text"),
    ) -> Index:
        """An empty index in `path` (nothing is written until `save`). Default embedder: all-MiniLM-L6-v2."""
        from lmforge import __version__
        from lmforge.embed import SentenceEncoder

        path = Path(path)
        if (path / "manifest.json").exists() and not overwrite:
            raise RagIndexError(
                f"{path}: an index already exists there (add to it, or rebuild with overwrite)"
            )
        if dense not in ("flat", "hnsw"):
            raise ValueError(f"dense index {dense!r}: expected flat or hnsw")
        embedder = embedder if embedder is not None else SentenceEncoder.load()
        if chunk_tokens > embedder.max_seq_len - 2:
            raise ValueError(
                f"chunk_tokens={chunk_tokens} does not fit the embedder's {embedder.max_seq_len} tokens "
                f"(with [CLS] and [SEP]: at most {embedder.max_seq_len - 2})"
            )
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError("overlap_tokens must be in [0, chunk_tokens)")
        model_path = embedder.path
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "embedder": {
                "name": embedder.name,
                "path": str(model_path) if model_path is not None else None,
                "fingerprint": embedder.fingerprint(),
                "dim": embedder.dim,
                "pooling": embedder.pooling,
                "normalize": embedder.normalize,
                "max_seq_len": embedder.max_seq_len,
            },
            "chunking": {"chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens,
                         "tokenizer": "the embedder's", "boundaries": "paragraph, sentence, token"},
            "dense": {"library": "faiss", "kind": dense, "metric": "inner_product",
                      "hnsw_m": hnsw_m, "ef_search": ef_search},
            "bm25": {"library": "bm25s", "k1": 1.5, "b": 0.75, "stopwords": "en", "fields": list(bm25_fields)},
            "hybrid": {"weights": [1.0, 1.0], "rrf_k": 60},  # weighted RRF: (bm25, dense) weights and k
            "abstain_threshold": None,
            "n_documents": 0,
            "n_chunks": 0,
            "next_id": 0,
            "created": now,
            "updated": now,
            "lmforge_version": __version__,
        }  # fmt: skip
        index = cls(path, manifest, embedder)
        index._faiss = index._new_faiss()
        return index

    @classmethod
    def load(cls, path: str | Path, embedder=None) -> Index:
        """Open an index folder. `embedder` must be the model it was built with (checked by fingerprint);
        without one, the model recorded in the manifest is loaded when a query needs it."""
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise RagIndexError(
                f"{path}: not an index (no manifest.json); build one with `lmforge rag index`"
            )
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != INDEX_FORMAT:
            raise RagIndexError(f"{manifest_file}: not an lmforge retrieval index")
        if manifest.get("version", 0) > INDEX_VERSION:
            raise RagIndexError(
                f"{manifest_file}: index format {manifest['version']} is newer than this lmforge reads"
            )
        index = cls(path, manifest, None)
        if embedder is not None:
            index._check_embedder(embedder)
            index._embedder = embedder
        with open(path / "chunks.jsonl", encoding="utf-8") as f:
            index.chunks = [Chunk.from_dict(json.loads(line)) for line in f if line.strip()]
        index.vectors = np.load(path / "vectors.npy", allow_pickle=False)
        index.ids = np.array([c.id for c in index.chunks], dtype=np.int64)
        if len(index.chunks) != manifest["n_chunks"] or index.vectors.shape != (
            len(index.chunks),
            manifest["embedder"]["dim"],
        ):
            raise RagIndexError(
                f"{path}: chunks.jsonl, vectors.npy and the manifest disagree; rebuild the index"
            )
        index._row = {int(i): r for r, i in enumerate(index.ids)}
        import faiss

        index._faiss = faiss.read_index(str(path / "dense.faiss"))
        tomb = path / "tombstones.npy"
        index._tombstones = set(np.load(tomb).tolist()) if tomb.is_file() else set()
        if (path / "bm25").is_dir():
            import bm25s

            index._bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False)
        return index

    @property
    def embedder(self):
        """The embedding model, loaded from the manifest's path on first use."""
        if self._embedder is None:
            from lmforge.embed import DEFAULT_EMBEDDER, SentenceEncoder

            info = self.manifest["embedder"]
            path = info.get("path")
            if path is None or not Path(path).is_dir():
                if info["name"] != DEFAULT_EMBEDDER:
                    raise RagIndexError(
                        f"{self.path}: the embedding model {info['name']} ({path}) is not there; pass it with --embedder"
                    )
                path = None
            embedder = SentenceEncoder.load(path)
            self._check_embedder(embedder)
            self._embedder = embedder
        return self._embedder

    def _check_embedder(self, embedder) -> None:
        info = self.manifest["embedder"]
        if embedder.fingerprint() != info["fingerprint"] or embedder.dim != info["dim"]:
            raise IndexMismatchError(
                f"{self.path}: the index was built with embedding model {info['name']} (fingerprint "
                f"{info['fingerprint']}, dim {info['dim']}), not {embedder.name} (fingerprint "
                f"{embedder.fingerprint()}, dim {embedder.dim}); query it with the same model or rebuild it"
            )

    def _new_faiss(self):
        import faiss

        dense, dim = self.manifest["dense"], self.manifest["embedder"]["dim"]
        if dense["kind"] == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, dense["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = dense["ef_search"]
        else:
            inner = faiss.IndexFlatIP(dim)
        return faiss.IndexIDMap2(inner)

    # ---- contents ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def document_ids(self) -> list[str]:
        return list(dict.fromkeys(c.doc_id for c in self.chunks))

    def chunk(self, chunk_id: int) -> Chunk:
        return self.chunks[self._row[chunk_id]]

    def add_documents(
        self, documents: Iterable[Document], replace: bool = False, progress=None, batch_size: int = 32
    ) -> AddReport:
        """Chunk, embed and index documents. A document whose id is indexed already is an error unless
        `replace` (then its old chunks go: an update). `progress(done, total)` follows the embedding."""
        t0 = time.perf_counter()
        report = AddReport()
        chunking = self.manifest["chunking"]
        tokenizer = self.embedder.tokenizer
        indexed = set(self.document_ids)
        new_chunks: list[Chunk] = []
        seen: set[str] = set()
        to_replace = []
        for doc in documents:
            if doc.id in seen:
                raise RagIndexError(f"document {doc.id!r} appears twice in the input")
            seen.add(doc.id)
            if doc.id in indexed:
                if not replace:
                    raise RagIndexError(f"document {doc.id!r} is already indexed (use update / --replace)")
                to_replace.append(doc.id)
            new_chunks += chunk_document(doc, tokenizer, chunking["chunk_tokens"], chunking["overlap_tokens"])
            report.documents += 1
        # vectors already computed for identical texts (e.g. the unchanged parts of an updated document)
        by_text = self._text_rows()
        known = {key: self.vectors[row] for key, row in by_text.items()}
        vectors = np.zeros((len(new_chunks), self.vectors.shape[1]), dtype=np.float32)
        missing = []
        for i, chunk in enumerate(new_chunks):
            key = _text_key(chunk.text)
            if key in known:
                vectors[i] = known[key]
                report.reused += 1
            else:
                missing.append(i)
        if missing:
            vectors[missing] = self.embedder.encode(
                [new_chunks[i].text for i in missing], batch_size, progress
            )
        report.embedded = len(missing)
        if to_replace:  # only once the new version is embedded, so a failure leaves the index as it was
            report.replaced = len(to_replace)
            self.delete_documents(to_replace)
        self._append(new_chunks, vectors)
        report.chunks = len(new_chunks)
        report.seconds = time.perf_counter() - t0
        return report

    def update_documents(self, documents: Iterable[Document], progress=None) -> AddReport:
        """Add documents, replacing the indexed versions of those already there."""
        return self.add_documents(documents, replace=True, progress=progress)

    def add_chunks(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Index ready-made chunks with their unit vectors (benchmarks, or embeddings computed elsewhere)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.vectors.shape[1]):
            raise ValueError(
                f"vectors have shape {vectors.shape}; expected ({len(chunks)}, {self.vectors.shape[1]})"
            )
        self._append(list(chunks), vectors)

    def _append(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        if not chunks:
            return
        start = self.manifest["next_id"]
        ids = np.arange(start, start + len(chunks), dtype=np.int64)
        for chunk, i in zip(chunks, ids):
            chunk.id = int(i)
        self.manifest["next_id"] = int(start + len(chunks))
        base = len(self.chunks)
        self.chunks += chunks
        self.vectors = np.concatenate([self.vectors, vectors]) if base else vectors
        self.ids = np.concatenate([self.ids, ids])
        self._row.update({int(i): base + r for r, i in enumerate(ids)})
        self._faiss.add_with_ids(vectors, ids)
        if self._by_text is not None:
            for r, chunk in enumerate(chunks):
                self._by_text.setdefault(_text_key(chunk.text), base + r)
        self._bm25 = None
        self._touch()

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove every chunk of these documents; returns how many chunks went."""
        gone = set(doc_ids)
        keep = np.array([c.doc_id not in gone for c in self.chunks], dtype=bool)
        removed = self.ids[~keep]
        if not len(removed):
            return 0
        if self.manifest["dense"]["kind"] == "hnsw":
            self._tombstones.update(int(i) for i in removed)
        else:
            self._faiss.remove_ids(removed)
        self.chunks = [c for c, k in zip(self.chunks, keep) if k]
        self.vectors = self.vectors[keep]
        self.ids = self.ids[keep]
        self._row = {int(i): r for r, i in enumerate(self.ids)}
        self._by_text = None
        self._bm25 = None
        if len(self._tombstones) > _COMPACT_FRACTION * max(self._faiss.ntotal, 1):
            self._faiss = self._new_faiss()
            self._faiss.add_with_ids(self.vectors, self.ids)
            self._tombstones = set()
        self._touch()
        return len(removed)

    def _text_rows(self) -> dict[str, int]:
        if self._by_text is None:
            self._by_text = {}
            for r, chunk in enumerate(self.chunks):
                self._by_text.setdefault(_text_key(chunk.text), r)
        return self._by_text

    def _touch(self) -> None:
        self.manifest["n_chunks"] = len(self.chunks)
        self.manifest["n_documents"] = len(set(c.doc_id for c in self.chunks))
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # ---- BM25 --------------------------------------------------------------------------------------
    def _bm25_index(self):
        if self._bm25 is None:
            import bm25s

            p = self.manifest["bm25"]
            self._bm25 = bm25s.BM25(k1=p["k1"], b=p["b"])
            fields = p.get("fields", ["text"])
            texts = [self._bm25_text(c, fields) for c in self.chunks]
            tokens = bm25s.tokenize(texts, stopwords=p["stopwords"], show_progress=False)
            self._bm25.index(tokens, show_progress=False)
        return self._bm25

    @staticmethod
    def _bm25_text(chunk: Chunk, fields: list[str]) -> str:
        """What BM25 indexes of a chunk: its text, and the title and section it sits under (words a
        query may share with the heading rather than the passage), never embedded."""
        parts = []
        for name in fields:
            value = chunk.text if name == "text" else chunk.meta.get(name)
            if value and (name == "text" or value not in parts):
                parts.append(str(value))
        return "\n".join(parts)

    # ---- saving ------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write every part, each atomically, the manifest last."""
        import faiss

        self.path.mkdir(parents=True, exist_ok=True)

        def write_chunks(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                for chunk in self.chunks:
                    f.write(json.dumps(chunk.to_dict(), ensure_ascii=False) + "\n")

        def write_npy(array):
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.save(f, array, allow_pickle=False)

            return write

        _atomic_write(self.path / "chunks.jsonl", write_chunks)
        _atomic_write(self.path / "vectors.npy", write_npy(self.vectors))
        _atomic_write(self.path / "dense.faiss", lambda tmp: faiss.write_index(self._faiss, tmp))
        tomb = self.path / "tombstones.npy"
        if self._tombstones:
            _atomic_write(tomb, write_npy(np.array(sorted(self._tombstones), dtype=np.int64)))
        else:
            tomb.unlink(missing_ok=True)
        if self.chunks:
            bm25 = self._bm25_index()
            staging = Path(tempfile.mkdtemp(dir=self.path, prefix=".bm25."))
            bm25.save(str(staging), show_progress=False)
            old = self.path / "bm25"
            if old.exists():
                trash = self.path / f".bm25.old.{os.getpid()}"
                os.replace(old, trash)
                os.replace(staging, old)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staging, old)
        else:
            shutil.rmtree(self.path / "bm25", ignore_errors=True)
        self.save_manifest()

    def save_manifest(self) -> None:
        """Write only the manifest (e.g. after calibrating the abstention threshold)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(
            self.path / "manifest.json",
            lambda tmp: Path(tmp).write_text(json.dumps(self.manifest, indent=2) + "\n"),
        )

    # ---- search ------------------------------------------------------------------------------------
    def embed_query(self, query: str) -> np.ndarray:
        return self.embedder.encode([query])[0]

    def allowed_rows(self, filters: Filters | None) -> np.ndarray | None:
        """Boolean mask of the chunks whose metadata match every filter (None: no filter).

        A filter maps a field (`doc_id`, `source`, `title`, `section` or any document meta) to a value,
        a list of values (any of them), or a predicate."""
        if not filters:
            return None
        mask = np.ones(len(self.chunks), dtype=bool)
        for r, chunk in enumerate(self.chunks):
            for key, wanted in filters.items():
                value = chunk.doc_id if key == "doc_id" else chunk.meta.get(key)
                if not _matches(value, wanted):
                    mask[r] = False
                    break
        return mask

    def bm25_search(self, query: str, n: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """(row, BM25 score) of the best `n` chunks with a positive score."""
        import bm25s

        if not self.chunks or n <= 0:
            return []
        bm25 = self._bm25_index()
        tokens = bm25s.tokenize(
            [query], stopwords=self.manifest["bm25"]["stopwords"], return_ids=False, show_progress=False
        )
        if not tokens[0]:
            return []
        mask = allowed.astype(np.float32) if allowed is not None else None
        rows, scores = bm25.retrieve(
            tokens, k=min(n, len(self.chunks)), show_progress=False, n_threads=1, weight_mask=mask
        )
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if s > 0]

    def dense_search(
        self, query_vector: np.ndarray, n: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """(row, cosine) of the best `n` chunks. With a filter the allowed chunks are scored exactly."""
        if not self.chunks or n <= 0:
            return []
        q = np.ascontiguousarray(query_vector, dtype=np.float32).reshape(1, -1)
        if allowed is not None:
            rows = np.flatnonzero(allowed)
            if not len(rows):
                return []
            scores = self.vectors[rows] @ q[0]
            top = np.argsort(-scores, kind="stable")[:n]
            return [(int(rows[i]), float(scores[i])) for i in top]
        params = None
        if self._tombstones:
            import faiss

            skip = faiss.IDSelectorNot(
                faiss.IDSelectorBatch(np.array(sorted(self._tombstones), dtype=np.int64))
            )
            params = faiss.SearchParametersHNSW(sel=skip, efSearch=self.manifest["dense"]["ef_search"])
        scores, ids = self._faiss.search(q, min(n, len(self.chunks)), params=params)
        return [
            (self._row[int(i)], float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) in self._row
        ]

    def search(
        self,
        query: str,
        k: int = 5,
        mode: str = "hybrid",
        filters: Filters | None = None,
        mmr: bool = False,
        mmr_lambda: float = 0.5,
        rrf_k: int | None = None,
        weights: Sequence[float] | None = None,
        fetch_k: int | None = None,
        query_vector: np.ndarray | None = None,
    ) -> list[Hit]:
        """The `k` best chunks for `query`.

        mode: "bm25", "dense" or "hybrid" (weighted RRF of both; `weights` = (bm25, dense), `rrf_k` = k;
            defaults: the manifest's `hybrid` settings, (1, 1) and 60 unless tuned with `rag eval --tune`).
        filters: metadata filters (see `allowed_rows`). mmr: re-rank the `fetch_k` best by maximal
        marginal relevance (Carbonell & Goldstein 1998), lambda * relevance - (1 - lambda) * redundancy.
        query_vector: a precomputed query embedding (skips the model).
        """
        if mode not in MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")
        if k <= 0 or not self.chunks:
            return []
        fetch = max(fetch_k or 0, 4 * k if (mmr or mode == "hybrid") else k, 50 if mode == "hybrid" else k)
        allowed = self.allowed_rows(filters)
        if query_vector is None and mode != "bm25":
            query_vector = self.embed_query(query)
        bm25 = self.bm25_search(query, fetch, allowed) if mode != "dense" else []
        dense = self.dense_search(query_vector, fetch, allowed) if mode != "bm25" else []
        info: dict[int, dict[str, float]] = {}
        for name, results in (("bm25", bm25), ("dense", dense)):
            for rank, (row, score) in enumerate(results, 1):
                info.setdefault(row, {}).update({name: score, f"{name}_rank": rank})
        if mode == "hybrid":
            settings = self.manifest.get("hybrid", {})
            weights = weights if weights is not None else settings.get("weights", (1.0, 1.0))
            rrf_k = rrf_k if rrf_k is not None else settings.get("rrf_k", 60)
            fused = {
                row: sum(
                    w / (rrf_k + s[f"{name}_rank"])
                    for name, w in zip(("bm25", "dense"), weights)
                    if f"{name}_rank" in s
                )
                for row, s in info.items()
            }
            ranked = sorted(fused.items(), key=lambda x: (-x[1], x[0]))
        else:
            ranked = bm25 if mode == "bm25" else dense
        if mmr and ranked:
            ranked = self._mmr(ranked[:fetch], query_vector, k, mmr_lambda)
        hits = []
        for rank, (row, score) in enumerate(ranked[:k], 1):
            scores = dict(info.get(row, {}))
            if query_vector is not None and "dense" not in scores:
                scores["dense"] = float(self.vectors[row] @ query_vector)
            hits.append(Hit(self.chunks[row], float(score), rank, scores))
        return hits

    def _mmr(
        self, ranked: list[tuple[int, float]], query_vector, k: int, lam: float
    ) -> list[tuple[int, float]]:
        """Greedy MMR over the candidates: relevance = the mode's score scaled to [0, 1], redundancy = the
        largest cosine to an already chosen chunk."""
        rows = np.array([r for r, _ in ranked])
        rel = np.array([s for _, s in ranked], dtype=np.float64)
        rel = (rel - rel.min()) / (rel.max() - rel.min()) if rel.max() > rel.min() else np.ones_like(rel)
        vecs = self.vectors[rows]
        sim = vecs @ vecs.T
        chosen: list[int] = []
        left = list(range(len(rows)))
        while left and len(chosen) < k:
            redundancy = sim[np.ix_(left, chosen)].max(1) if chosen else np.zeros(len(left))
            values = lam * rel[left] - (1 - lam) * redundancy
            best = left[int(np.argmax(values))]
            chosen.append(best)
            left.remove(best)
        return [(int(rows[i]), float(ranked[i][1])) for i in chosen]
