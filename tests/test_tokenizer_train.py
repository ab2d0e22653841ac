"""Tokenizer training (BPE, WordPiece, Unigram), extension with domain tokens and embedding resizing.

Every trained tokenizer is saved with Tokenizer.save and loaded back by transformers.AutoTokenizer, which
must give the same ids: that is the file contract every later stage relies on.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.config import Config
from lmforge.data import iter_stdlib_docstrings
from lmforge.model import Transformer, load_model, save_model
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer
from lmforge.tokenizer_train import (
    default_special_tokens,
    extend_tokenizer,
    parse_special_tokens,
    resize_embeddings,
    train_tokenizer,
)

transformers = pytest.importorskip("transformers")

PROBES = [
    "Hello world",
    "",
    " leading space and trailing ",
    "Return the number of items in the sequence.",
    "def add(a, b):\n    return a + b\n",
    "naïve café 日本語 🤖",
    "text <|endoftext|> with <|im_start|>user\nhi<|im_end|> markers",
    "[CLS] brackets [MASK] and <unk>",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = [doc.text for doc in itertools.islice(iter_stdlib_docstrings(), 250)]
    return docs + ["The quick brown fox jumps over the lazy dog. naïve café"] * 5


@pytest.fixture(scope="module")
def trained(corpus) -> dict[str, Tokenizer]:
    return {
        kind: train_tokenizer(corpus, kind=kind, vocab_size=600) for kind in ("bpe", "wordpiece", "unigram")
    }


def _assert_same_as_transformers(tok: Tokenizer, folder) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    reloaded = Tokenizer.from_dir(folder)
    assert len(hf) == tok.vocab_size == reloaded.vocab_size
    for text in PROBES:
        ids = tok.encode(text)
        assert hf.encode(text) == ids == reloaded.encode(text), text
        assert hf.decode(ids) == tok.decode(ids)
    for name, token in tok.special_tokens.items():
        assert getattr(hf, name) == token
    if tok.chat_template is not None:
        chat = [{"role": "user", "content": "Hi!"}]
        assert hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        ) == tok.apply_chat_template(chat)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_trained_tokenizer_round_trips_through_transformers(trained, kind, tmp_path):
    tok = trained[kind]
    assert tok.vocab_size == 600
    tok.save(tmp_path)
    _assert_same_as_transformers(tok, tmp_path)


def test_bpe_defaults_for_a_decoder_lm(trained):
    tok = trained["bpe"]
    assert tok.special_tokens == {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.encode("hi") == tok.encode(
        "hi", add_special_tokens=False
    )  # no BOS added: EOS separates documents
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert prompt[0] == 1 and 2 in prompt  # the markers are single ids


def test_byte_level_bpe_has_no_unknown_token(trained):
    tok = trained["bpe"]
    for text in ["never seen: 🦙 ß 漢字 ❤️ \x00\t", "naïve café 日本語 🤖", "  spaces  "]:
        assert tok.decode(tok.encode(text)) == text


def test_wordpiece_is_bert_style(trained):
    tok = trained["wordpiece"]
    ids = tok.encode("Return the items")
    assert ids[0] == tok.token_to_id("[CLS]") and ids[-1] == tok.token_to_id("[SEP]")
    assert tok.pad_id == 0 and tok.chat_template is None
    assert tok.decode(ids, skip_special_tokens=True) == "Return the items"


def test_unigram_uses_metaspace(trained):
    tok = trained["unigram"]
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("Return the items")]
    assert pieces[0].startswith("▁") and tok.decode(tok.encode("Return the items")) == "Return the items"
    assert tok.special_tokens["unk_token"] == "<unk>"


def test_bpe_training_is_deterministic(corpus):
    first = train_tokenizer(corpus, vocab_size=500).backend.to_str()
    assert train_tokenizer(iter(corpus), vocab_size=500).backend.to_str() == first


def test_special_tokens_are_configurable(corpus, tmp_path):
    named, extra = parse_special_tokens(["bos=<s>", "eos_token=</s>", "<tool>"])
    assert named == {"bos_token": "<s>", "eos_token": "</s>"} and extra == ["<tool>"]
    tok = train_tokenizer(corpus[:50], vocab_size=400, special_tokens=named, extra_special_tokens=extra)
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<tool>")] == [0, 1, 2]
    assert tok.chat_template is None  # no ChatML markers, so no ChatML template
    assert tok.token_to_id("<tool>") in tok.encode("a <tool> b")
    tok.save(tmp_path)
    _assert_same_as_transformers(tok, tmp_path)


def test_bad_training_settings_raise(corpus):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(corpus, kind="sentencepiece")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus, vocab_size=200)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", ""], vocab_size=400)
    with pytest.raises(ValueError, match="ChatML"):
        train_tokenizer(corpus, kind="wordpiece", vocab_size=400, chat_template="chatml")
    assert default_special_tokens("wordpiece")[1] == []


# ---- extension and resizing ----


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_extend_tokenizer_makes_domain_tokens_single_ids(trained, kind, tmp_path):
    tok = trained[kind]
    text = "Diagnosis ICD10:E11.9 and ICD10:I10 noted."
    before = tok.encode(text)
    extended, added = extend_tokenizer(tok, ["ICD10:E11.9", "ICD10:I10", "ICD10:E11.9"])
    assert added == [600, 601] and extended.vocab_size == 602
    assert tok.vocab_size == 600 and tok.encode(text) == before  # the original is untouched
    for token, token_id in zip(["ICD10:E11.9", "ICD10:I10"], added):
        assert extended.encode(token, add_special_tokens=False) == [token_id]
        assert token_id in extended.encode(text)
    assert "ICD10:E11.9" in extended.decode(extended.encode(text), skip_special_tokens=True)
    assert extend_tokenizer(extended, ["ICD10:I10"])[1] == []  # already one token: skipped
    extended.save(tmp_path)
    _assert_same_as_transformers(extended, tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).encode(text) == extended.encode(text)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_embeddings_initialises_new_rows_to_the_mean(tied, tmp_path):
    config = Config.from_name("tiny-llama", vocab_size=64, tie_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model.init_weights(seed=0)
    ids = torch.tensor([[1, 5, 9, 63, 2]])
    with torch.no_grad():
        old_logits = model.logits(model(ids))
    old_embed = model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()

    resize_embeddings(model, 70)

    assert model.config.vocab_size == 70 and model.embed_tokens.num_embeddings == 70
    assert model.embed_tokens.weight.shape == (70, 64) and model.lm_head.weight.shape == (70, 64)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    torch.testing.assert_close(model.embed_tokens.weight[:64], old_embed, rtol=0, atol=0)
    torch.testing.assert_close(model.embed_tokens.weight[64:], old_embed.mean(0).expand(6, -1))
    torch.testing.assert_close(model.lm_head.weight[64:], old_head.mean(0).expand(6, -1))
    with torch.no_grad():
        new_logits = model.logits(model(ids))
    assert new_logits.shape[-1] == 70
    torch.testing.assert_close(new_logits[..., :64], old_logits, rtol=0, atol=0)
    assert model.embed_tokens.weight.requires_grad

    save_model(model, tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.vocab_size == 70
    torch.testing.assert_close(loaded.embed_tokens.weight, model.embed_tokens.weight)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_resize_embeddings_refuses_to_shrink():
    model = Transformer(Config.from_name("tiny-llama", vocab_size=64))
    resize_embeddings(model, 64)  # same size: nothing to do
    assert model.embed_tokens.num_embeddings == 64
    with pytest.raises(ValueError, match="shrink"):
        resize_embeddings(model, 32)
