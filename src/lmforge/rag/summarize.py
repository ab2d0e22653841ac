"""Summarising text longer than the generator's context.

    map-reduce (hierarchical):  windows -> summary of each -> summaries grouped into windows -> ...
                                until one window holds them all -> final summary
    sliding window (refine):    summary = f(window 1); summary = f(summary, window i) for i = 2..n

Windows are cut with the chunker (paragraph and sentence boundaries) by the generator's own tokens, so
every prompt fits: window + instructions + answer <= context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.rag.chunking import chunk_text

SUMMARIZE = "Summarise the following text in a few sentences, keeping names, numbers and conclusions.\n\nText:\n{text}\n\nSummary:"
COMBINE = "These are summaries of consecutive parts of one document. Combine them into one summary of the whole document.\n\nSummaries:\n{text}\n\nSummary:"
REFINE = ("Here is a summary of the first part of a document, and the next part. Write an updated summary "
          "of everything so far.\n\nSummary so far:\n{summary}\n\nNext part:\n{text}\n\nUpdated summary:")  # fmt: skip
MAX_DEPTH = 8


@dataclass
class Summary:
    text: str
    mode: str
    calls: int = 0  # generator calls
    windows: int = 0  # windows of the input
    levels: int = 0  # map-reduce levels
    prompt_tokens: list[int] = field(default_factory=list)  # each prompt's size, for checking the fit


def _windows(generator, text: str, budget: int) -> list[str]:
    if budget < 16:
        raise ValueError(f"the generator's context leaves {budget} tokens for text; too small to summarise")
    ids = generator.tokenizer.backend.encode(text, add_special_tokens=False)
    starts = [s for s, _ in ids.offsets]
    return [text[s:e] for s, e, _ in chunk_text(text, starts, budget, 0)]


def _budget(generator, template: str, max_new_tokens: int, **fixed: str) -> int:
    """Tokens left for {text} in `template` once the instructions and the answer are counted (with slack
    for tokens that merge differently at the seams)."""
    empty = template.format(text="", **fixed)
    return generator.context - generator.count(empty) - max_new_tokens - 8


def summarize(text: str, generator, mode: str = "map_reduce", max_new_tokens: int = 200) -> Summary:
    """Summarise `text` of any length with `generator` (a `lmforge.rag.answer.Generator`)."""
    if mode not in ("map_reduce", "sliding"):
        raise ValueError(f"unknown summarisation mode {mode!r} (map_reduce, sliding)")
    result = Summary("", mode)

    def call(prompt: str) -> str:
        result.calls += 1
        result.prompt_tokens.append(generator.count(prompt))
        return generator.complete(prompt, max_new_tokens)

    windows = _windows(generator, text, _budget(generator, SUMMARIZE, max_new_tokens))
    result.windows = len(windows)
    if len(windows) <= 1:
        result.text = call(SUMMARIZE.format(text=text)) if text.strip() else ""
        result.levels = 1
        return result
    if mode == "map_reduce" and _budget(generator, COMBINE, max_new_tokens) < 2 * (max_new_tokens + 8):
        raise ValueError(
            f"map-reduce needs room for two summaries of {max_new_tokens} tokens in the generator's "
            f"{generator.context}-token context; lower max_new_tokens or use the sliding mode"
        )
    if mode == "sliding":
        summary = call(SUMMARIZE.format(text=windows[0]))
        for window in windows[1:]:
            budget = _budget(generator, REFINE, max_new_tokens, summary=summary)
            for piece in _windows(generator, window, budget):  # a long summary leaves less room
                summary = call(REFINE.format(summary=summary, text=piece))
        result.text = summary
        return result
    parts = [call(SUMMARIZE.format(text=w)) for w in windows]
    result.levels = 1
    while True:
        joined = "\n\n".join(parts)
        budget = _budget(generator, COMBINE, max_new_tokens)
        groups = _windows(generator, joined, budget)
        result.levels += 1
        if len(groups) <= 1 or result.levels >= MAX_DEPTH:
            result.text = call(COMBINE.format(text=groups[0] if groups else joined))
            return result
        parts = [call(COMBINE.format(text=g)) for g in groups]
