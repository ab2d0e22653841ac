"""Decontamination against evaluation text by word 13-grams."""

import pytest

from lmforge.data import Decontaminator
from lmforge.data.decontam import normalized_words

EVAL = "The quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree."


def test_shared_13gram_is_found_despite_case_and_punctuation():
    decon = Decontaminator(13)
    decon.add_eval_text(EVAL, "eval.jsonl:1")
    # 13 consecutive eval words, different case and punctuation, inside other text
    train = "Intro text. THE quick, brown fox -- jumps over the lazy dog; while the farmer sleeps! The end."
    assert decon.check(train) == "eval.jsonl:1"


def test_twelve_shared_words_are_not_contamination():
    decon = Decontaminator(13)
    decon.add_eval_text(EVAL, "eval")
    twelve = " ".join(EVAL.split()[:12])
    assert decon.check(f"Something else. {twelve} and then different words follow here.") is None


def test_empty_index_and_counts():
    decon = Decontaminator(13)
    assert decon.check(EVAL) is None
    decon.add_eval_text(EVAL, "eval")
    assert decon.eval_documents == 1 and decon.ngram_count == len(EVAL.split()) - 12
    with pytest.raises(ValueError):
        Decontaminator(0)


def test_normalized_words():
    assert normalized_words("Don't STOP, believing!") == ["dont", "stop", "believing"]
