"""Grounded answers: numbered passages in the prompt, [n] citations mapped back to sources, abstention when
retrieval finds nothing close enough, and a per-sentence groundedness check of the answer.

    retrieve k passages -> best cosine < threshold ?  -> "The sources do not contain ..." (abstain)
                        -> no generator ?             -> the passages' best-matching sentences (extractive)
                        -> prompt with [1]..[k] -> generate -> citations + groundedness of each sentence

Groundedness (the project's first hallucination detector): each answer sentence is compared with the
passages it cites (all passages when it cites none) by embedding similarity (the best cosine with a
passage sentence) and lexical overlap (the share of its content words found in them);
support = (similarity + overlap) / 2, and a sentence below `support_threshold` is flagged unsupported.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.rag.index import Hit, Index

ABSTAIN_TEXT = "The sources do not contain an answer to this question."
# all-MiniLM-L6-v2's calibration on the stdlib question set against off-topic questions (docs/rag.md);
# `lmforge rag eval --calibrate` stores an index's own threshold in its manifest
DEFAULT_ABSTAIN_THRESHOLD = 0.30
SUPPORT_THRESHOLD = 0.5

INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. After each sentence, cite the sources "
    "it uses by number in square brackets, like [1] or [2][3]. If the sources do not contain the answer, "
    f'reply exactly: "{ABSTAIN_TEXT}"'
)

_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
# a sentence ends after . ! ? and the citations right after it, before whitespace and a new word
_SENTENCE = re.compile(r"(?<=[.!?])((?:\s*\[\d+(?:\s*,\s*\d+)*\])*)\s+(?=[^\s\[])")
_WORD = re.compile(r"[a-z0-9_]+")
_STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for with from as is are was were be been
being it its this that these those there here which who whom whose what when where why how not no nor so than too
very can could may might must shall should will would do does did done has have had having i you he she we they
me him her us them my your his our their into over under about above below between through during before after
also only just any all each every some such more most other own same both few many much one ones""".split()
)


@dataclass
class Citation:
    n: int  # the number in the prompt, [n]
    chunk_id: int
    doc_id: str
    source: str
    title: str | None
    section: str | None
    start: int
    end: int

    @classmethod
    def of(cls, n: int, hit: Hit) -> Citation:
        c = hit.chunk
        return cls(n, c.id, c.doc_id, str(c.meta.get("source", c.doc_id)), c.meta.get("title"), c.meta.get("section"),
                   c.start, c.end)  # fmt: skip


@dataclass
class SentenceCheck:
    text: str
    citations: list[int]
    similarity: float  # best cosine with a sentence of the evidence passages
    overlap: float  # share of the sentence's content words present in the evidence
    support: float
    supported: bool


@dataclass
class Answer:
    question: str
    text: str
    passages: list[Hit]  # passage n of the prompt is passages[n - 1]
    citations: list[Citation] = field(default_factory=list)
    abstained: bool = False
    confidence: float | None = None  # best cosine between the question and a retrieved passage
    threshold: float | None = None
    sentences: list[SentenceCheck] = field(default_factory=list)
    mode: str = "extractive"  # or "generative"
    prompt: str | None = None

    @property
    def unsupported(self) -> list[SentenceCheck]:
        return [s for s in self.sentences if not s.supported]

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.text,
            "mode": self.mode,
            "abstained": self.abstained,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "citations": [vars(c) for c in self.citations],
            "sentences": [vars(s) for s in self.sentences],
            "unsupported": [s.text for s in self.unsupported],
            "passages": [{"n": i, **h.to_dict()} for i, h in enumerate(self.passages, 1)],
        }


# --------------------------------------------------------------------------------------------------
# The generator: any lmforge checkpoint folder


class Generator:
    """Prompt text -> completion text with an lmforge checkpoint (chat template when it has one)."""

    def __init__(self, pretrained, max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = 0):
        self.model = pretrained.model
        self.tokenizer = pretrained.tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed

    @classmethod
    def load(
        cls, path: str | Path, device: str | None = None, dtype: str | None = None, **options
    ) -> Generator:
        from lmforge.pretrained import load_pretrained

        return cls(load_pretrained(path, dtype=dtype, device=device), **options)

    @property
    def context(self) -> int:
        return self.model.config.context_limit or 4096

    def render(self, prompt: str) -> list[int]:
        if self.tokenizer.chat_template is not None:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def count(self, prompt: str) -> int:
        """Tokens the prompt occupies, template included."""
        return len(self.render(prompt))

    def complete(self, prompt: str, max_new_tokens: int | None = None) -> str:
        from lmforge.generate import SamplingParams, generate

        ids = self.render(prompt)
        budget = max_new_tokens if max_new_tokens is not None else self.max_new_tokens
        budget = max(0, min(budget, self.context - len(ids)))
        params = SamplingParams(max_new_tokens=budget, temperature=self.temperature, seed=self.seed)
        return generate(self.model, [ids], params, tokenizer=self.tokenizer)[0].text.strip()


# --------------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Sentences of an answer or passage; a citation right after the full stop stays with its sentence."""
    out = []
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*[-*\d]+[.)]?\s)", text):
        pos = 0
        for m in _SENTENCE.finditer(paragraph):
            out.append(paragraph[pos : m.end(1)].strip())
            pos = m.end()
        out.append(paragraph[pos:].strip())
    return [s for s in out if s]


def cited_numbers(text: str) -> list[int]:
    return [int(n) for group in _CITATION.findall(text) for n in group.split(",")]


def content_words(text: str) -> set[str]:
    words = set()
    for w in _WORD.findall(_CITATION.sub(" ", text.lower())):
        if w in _STOPWORDS:
            continue
        words.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return words


def format_passage(n: int, hit: Hit) -> str:
    c = hit.chunk
    where = " - ".join(str(x) for x in (c.meta.get("title"), c.meta.get("section")) if x)
    header = (
        f"[{n}] ({where}; {c.meta.get('source', c.doc_id)})"
        if where
        else f"[{n}] ({c.meta.get('source', c.doc_id)})"
    )
    return f"{header}\n{c.text}"


def build_prompt(question: str, passages: list[Hit]) -> str:
    sources = "\n\n".join(format_passage(i, h) for i, h in enumerate(passages, 1))
    return f"{INSTRUCTIONS}\n\nSources:\n\n{sources}\n\nQuestion: {question}\nAnswer:"


def fit_prompt(question: str, passages: list[Hit], generator: Generator) -> tuple[str, list[Hit]]:
    """The prompt with as many top passages as the generator's context holds next to the answer."""
    budget = generator.context - generator.max_new_tokens
    kept = list(passages)
    while kept:
        prompt = build_prompt(question, kept)
        if generator.count(prompt) <= budget:
            return prompt, kept
        if len(kept) == 1:  # one passage too long: cut its text
            hit = kept[0]
            text = hit.chunk.text
            while text and generator.count(build_prompt(question, [hit])) > budget:
                text = text[: int(len(text) * 0.8)]
                hit = dataclasses.replace(hit, chunk=dataclasses.replace(hit.chunk, text=text))
            return build_prompt(question, [hit]), [hit]
        kept.pop()
    raise ValueError(f"the generator's context ({generator.context} tokens) cannot hold the question")


def check_groundedness(
    answer: str, passages: list[Hit], embedder, support_threshold: float = SUPPORT_THRESHOLD
) -> list[SentenceCheck]:
    """Score each sentence of `answer` against the passages it cites (all passages when it cites none)."""
    sentences = split_sentences(answer)
    if not sentences or not passages:
        return []
    passage_sentences = [split_sentences(h.chunk.text) or [h.chunk.text] for h in passages]
    flat = [s for group in passage_sentences for s in group]
    owner = np.array([i for i, group in enumerate(passage_sentences) for _ in group])
    vectors = embedder.encode([_CITATION.sub("", s).strip() or s for s in sentences] + flat)
    answer_vecs, evidence_vecs = vectors[: len(sentences)], vectors[len(sentences) :]
    sims = answer_vecs @ evidence_vecs.T  # (sentences, evidence sentences)
    passage_words = [content_words(h.chunk.text) for h in passages]
    out = []
    for i, sentence in enumerate(sentences):
        cited = [n for n in cited_numbers(sentence) if 1 <= n <= len(passages)]
        use = [n - 1 for n in cited] if cited else list(range(len(passages)))
        similarity = float(sims[i][np.isin(owner, use)].max())
        words = content_words(sentence)
        evidence = set().union(*(passage_words[j] for j in use))
        overlap = len(words & evidence) / len(words) if words else 1.0
        support = (max(similarity, 0.0) + overlap) / 2
        out.append(SentenceCheck(sentence, cited, round(similarity, 4), round(overlap, 4), round(support, 4),
                                 support >= support_threshold))  # fmt: skip
    return out


def extractive_answer(
    question_vector: np.ndarray, passages: list[Hit], embedder, n_sentences: int = 2
) -> str:
    """The passages' sentences closest to the question, each cited, in retrieval order."""
    candidates = [(n, s) for n, h in enumerate(passages[:3], 1) for s in split_sentences(h.chunk.text)]
    # prose only: not headings, not code (doctest prompts)
    sentences = [(n, " ".join(s.split())) for n, s in candidates if len(s.split()) >= 4 and ">>>" not in s]
    sentences = sentences or [(n, " ".join(s.split())) for n, s in candidates]
    if not sentences:
        return ""
    sims = embedder.encode([s for _, s in sentences]) @ question_vector
    order = np.argsort(-sims)[:n_sentences]
    best = sorted(i for i in order if sims[i] >= 0.75 * sims[order[0]])  # close seconds only
    return " ".join(f"{sentences[i][1]} [{sentences[i][0]}]" for i in best)


def ask(
    index: Index,
    question: str,
    generator: Generator | None = None,
    k: int = 5,
    mode: str = "hybrid",
    filters: dict | None = None,
    threshold: float | None = None,
    mmr: bool = False,
    check: bool = True,
) -> Answer:
    """Answer `question` from the index: grounded generation with a generator, extractive without one.

    threshold: abstain when the best retrieved cosine is below it (default: the index's calibrated
    threshold, else DEFAULT_ABSTAIN_THRESHOLD; pass a negative value to never abstain).
    """
    if threshold is None:
        threshold = index.manifest.get("abstain_threshold")
        threshold = DEFAULT_ABSTAIN_THRESHOLD if threshold is None else threshold
    query_vector = index.embed_query(question)
    hits = index.search(question, k=k, mode=mode, filters=filters, mmr=mmr, query_vector=query_vector)
    confidence = max((h.scores.get("dense", -1.0) for h in hits), default=None)
    answer = Answer(question, "", hits, confidence=confidence, threshold=threshold,
                    mode="generative" if generator is not None else "extractive")  # fmt: skip
    if confidence is None or confidence < threshold:
        answer.text, answer.abstained = ABSTAIN_TEXT, True
        return answer
    if generator is None:
        answer.text = extractive_answer(query_vector, hits, index.embedder)
    else:
        answer.prompt, answer.passages = fit_prompt(question, hits, generator)
        answer.text = generator.complete(answer.prompt)
        if ABSTAIN_TEXT.lower().rstrip(".") in answer.text.lower():
            answer.abstained = True
    used = sorted({n for n in cited_numbers(answer.text) if 1 <= n <= len(answer.passages)})
    answer.citations = [Citation.of(n, answer.passages[n - 1]) for n in used]
    if check and not answer.abstained:
        answer.sentences = check_groundedness(answer.text, answer.passages, index.embedder)
    return answer


def format_answer(answer: Answer) -> str:
    """Human-readable: the answer, flagged sentences, then the numbered sources."""
    lines = [answer.text, ""]
    if answer.unsupported:
        lines.append("Not supported by the cited sources (check before trusting):")
        lines += [
            f"  ! {s.text}  (similarity {s.similarity:.2f}, overlap {s.overlap:.2f})"
            for s in answer.unsupported
        ]
        lines.append("")
    if answer.abstained:
        lines.append(f"(best retrieval score {answer.confidence if answer.confidence is not None else float('nan'):.3f} "
                     f"< threshold {answer.threshold:.3f}; closest passages below)")  # fmt: skip
    cited = {c.n for c in answer.citations}
    lines.append("Sources:")
    for n, hit in enumerate(answer.passages, 1):
        mark = "*" if n in cited else " "
        c = hit.chunk
        title = f" {c.meta['title']}" if c.meta.get("title") else ""
        section = c.meta.get("section")
        section = f" › {section}" if section and section != c.meta.get("title") else ""
        lines.append(
            f"{mark}[{n}]{title}{section}  ({c.meta.get('source', c.doc_id)}, chars {c.start}-{c.end}, score {hit.score:.4f})"
        )
        snippet = " ".join(c.text.split())
        lines.append(f"      {snippet[:200]}{'...' if len(snippet) > 200 else ''}")
    return "\n".join(lines)
