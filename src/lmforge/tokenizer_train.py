"""Training a tokenizer from text, and growing an existing one (and its model) with domain tokens.

Three recipes, each the one its family of models uses, built on the ``tokenizers`` trainers:

* ``bpe``: byte-level BPE as in GPT-2. Text is split with GPT-2's regex and mapped to the 256 byte
  symbols before merging, and all 256 bytes are in the vocabulary, so every string encodes and
  decodes back exactly: there is no unknown token. The tokenizer for decoder LMs.
* ``wordpiece``: BERT's recipe (BertNormalizer, BertPreTokenizer, ``##`` continuation pieces,
  ``[CLS] text [SEP]``). Characters outside the learnt alphabet become ``[UNK]``. For encoders.
* ``unigram``: the SentencePiece unigram LM with the Metaspace pre-tokenizer (``▁`` marks a space),
  as in T5/ALBERT. Characters never seen in training become ``<unk>`` (no byte fallback).

Special tokens of a decoder LM (``bpe``, ``unigram``), a choice written down in docs/tokenizer.md:
``<|endoftext|>`` is BOS, EOS and PAD, and it is the separator that ``lmforge data tokenize`` writes
between documents; ``<|im_start|>`` / ``<|im_end|>`` are the ChatML turn markers, and the ChatML chat
template is stored with the tokenizer. ``eos_token`` stays ``<|endoftext|>`` (a base model ends a
document with it); a chat model also stops at ``<|im_end|>``, which belongs in the model's
``generation_config.json`` (``config.eos_token_id = [endoftext_id, im_end_id]``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

if TYPE_CHECKING:
    from lmforge.model import Transformer

__all__ = [
    "CHATML_MARKERS",
    "KINDS",
    "default_special_tokens",
    "extend_tokenizer",
    "parse_special_tokens",
    "resize_embeddings",
    "train_tokenizer",
]

KINDS = ("bpe", "wordpiece", "unigram")
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
ENDOFTEXT = "<|endoftext|>"

# Named special tokens per kind, in id order (the first gets id 0); unnamed extras follow.
_NAMED_DEFAULTS: dict[str, dict[str, str]] = {
    "bpe": {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT},
    "unigram": {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "unk_token": "<unk>"},
    "wordpiece": {
        "pad_token": "[PAD]",  # id 0, as in BERT
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
}
_EXTRA_DEFAULTS: dict[str, tuple[str, ...]] = {
    "bpe": CHATML_MARKERS,
    "unigram": CHATML_MARKERS,
    "wordpiece": (),
}


def default_special_tokens(kind: str) -> tuple[dict[str, str], list[str]]:
    """``(named, extra)``: the default named special tokens of ``kind`` and the unnamed extras."""
    _check_kind(kind)
    return dict(_NAMED_DEFAULTS[kind]), list(_EXTRA_DEFAULTS[kind])


def parse_special_tokens(entries: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Split command-line entries into named (``bos=<s>``, ``eos_token=</s>``) and extra (``<tool>``) tokens."""
    named: dict[str, str] = {}
    extra: list[str] = []
    for entry in entries:
        match = re.fullmatch(r"([a-z]+?)(?:_token)?=(.+)", entry, flags=re.DOTALL)
        if match:
            named[f"{match[1]}_token"] = match[2]
        elif entry:
            extra.append(entry)
        else:
            raise ValueError("empty special token")
    return named, extra


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 8192,
    special_tokens: Mapping[str, str] | None = None,
    extra_special_tokens: Sequence[str] | None = None,
    min_frequency: int = 2,
    chat_template: str | None = "auto",
    progress: bool = False,
) -> Tokenizer:
    """Train a ``kind`` tokenizer (``"bpe"``, ``"wordpiece"`` or ``"unigram"``) on ``texts``.

    Args:
        texts: the training documents, streamed once (any iterable of strings).
        vocab_size: the size of the whole vocabulary, special tokens (and for BPE the 256 byte
            symbols) included. Training stops earlier when the text has nothing more to merge.
        special_tokens: named special tokens in id order, e.g. ``{"eos_token": "</s>"}``; replaces
            the kind's defaults (see :func:`default_special_tokens`). ``unigram`` and ``wordpiece``
            need an ``unk_token``: their default is added when it is missing.
        extra_special_tokens: unnamed special tokens (never split, dropped by
            ``decode(skip_special_tokens=True)``); replaces the default ChatML markers.
        min_frequency: a merge (BPE) or piece (WordPiece) must occur this often; unigram ignores it.
        chat_template: ``"auto"``: ChatML when ``<|im_start|>`` and ``<|im_end|>`` are special tokens,
            else none; ``"chatml"``; a Jinja template; or None.
        progress: show the ``tokenizers`` progress bars.

    BPE and WordPiece training are deterministic; unigram training may order tied pieces
    differently from run to run (the scores agree to ~1e-14).
    """
    _check_kind(kind)
    named_default, extra_default = default_special_tokens(kind)
    named = dict(named_default if special_tokens is None else special_tokens)
    extra = list(extra_default if extra_special_tokens is None else extra_special_tokens)
    if kind in ("unigram", "wordpiece") and "unk_token" not in named:
        named["unk_token"] = named_default["unk_token"]
    for name, token in named.items():
        if not isinstance(token, str) or not token:
            raise ValueError(f"special token {name} must be a non-empty string, got {token!r}")
    ordered = list(dict.fromkeys([*named.values(), *extra]))  # unique, in id order
    floor = len(ordered) + (256 if kind == "bpe" else 1)
    if vocab_size < floor:
        what = "256 byte symbols + " if kind == "bpe" else ""
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {what}{len(ordered)} special tokens need at least {floor}"
        )
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")

    backend, trainer = _pipeline(kind, vocab_size, ordered, named, min_frequency, progress)
    seen = [0]  # characters streamed to the trainer

    def counted() -> Iterator[str]:
        for text in texts:
            seen[0] += len(text)
            yield text

    backend.train_from_iterator(counted(), trainer)
    if seen[0] == 0:
        raise ValueError("no text to train on: the training documents are empty")
    if kind == "wordpiece" and "cls_token" in named and "sep_token" in named:
        cls_token, sep_token = named["cls_token"], named["sep_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token} $A {sep_token}",
            pair=f"{cls_token} $A {sep_token} $B:1 {sep_token}:1",
            special_tokens=[(t, backend.token_to_id(t)) for t in (cls_token, sep_token)],
        )
    return Tokenizer(
        backend,
        special_tokens=named,
        extra_special_tokens=extra,
        chat_template=_resolve_chat_template(chat_template, ordered),
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")


def _pipeline(
    kind: str,
    vocab_size: int,
    specials: list[str],
    named: Mapping[str, str],
    min_frequency: int,
    progress: bool,
) -> tuple[BackendTokenizer, trainers.Trainer]:
    """An untrained backend with the kind's normalizer / pre-tokenizer / decoder, and its trainer."""
    if kind == "bpe":
        backend = BackendTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, then bytes
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no token
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
            show_progress=progress,
        )
    elif kind == "wordpiece":
        unk = named["unk_token"]
        backend = BackendTokenizer(models.WordPiece(unk_token=unk))
        backend.normalizer = normalizers.BertNormalizer(lowercase=False)  # cased: keeps information
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            limit_alphabet=1000,  # as BERT's: the rarest characters become [UNK] instead of taking slots
            continuing_subword_prefix="##",
            show_progress=progress,
        )
    else:
        backend = BackendTokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            unk_token=named["unk_token"],
            show_progress=progress,
        )
    return backend, trainer


def _resolve_chat_template(chat_template: str | None, specials: Sequence[str]) -> str | None:
    has_markers = all(marker in specials for marker in CHATML_MARKERS)
    if chat_template == "auto":
        return CHATML_TEMPLATE if has_markers else None
    if chat_template == "chatml":
        if not has_markers:
            raise ValueError(f"the ChatML template needs the special tokens {' and '.join(CHATML_MARKERS)}")
        return CHATML_TEMPLATE
    return chat_template


# ---- growing a vocabulary ----


def extend_tokenizer(tokenizer: Tokenizer, new_tokens: Iterable[str]) -> tuple[Tokenizer, list[int]]:
    """A copy of ``tokenizer`` in which each of ``new_tokens`` (e.g. ``"ICD10:E11.9"``) is one token.

    The tokens are added as ordinary (non-special) added tokens: they are matched in the text before
    the pre-tokenizer runs, so the word is never split, and they are kept by
    ``decode(skip_special_tokens=True)``. Returns the new tokenizer and the ids of the tokens that
    were added, in order; a token that already encodes as a single id is skipped. Grow the model to
    the new :attr:`Tokenizer.vocab_size` with :func:`resize_embeddings`.
    """
    tokens = list(dict.fromkeys(new_tokens))
    for token in tokens:
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"new tokens must be non-empty strings, got {token!r}")
    extended = copy.deepcopy(tokenizer)
    old_size = extended.vocab_size
    missing = [t for t in tokens if len(extended.encode(t, add_special_tokens=False)) != 1]
    extended.backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    added = [i for t in missing if (i := extended.token_to_id(t)) is not None and i >= old_size]
    return extended, added


def resize_embeddings(model: Transformer, new_vocab_size: int) -> None:
    """Grow ``model.embed_tokens`` and ``model.lm_head`` to ``new_vocab_size`` rows, in place.

    The new rows are the mean of the existing rows (of each matrix; one shared matrix when
    ``config.tie_embeddings``). Hewitt (2021), "Initializing new word embeddings for pretrained
    language models": with the mean, every new token starts with a logit close to the average one,
    so the model's distribution over the old tokens barely moves, whereas random rows can give a
    new token a large logit everywhere. Old rows, and so the logits of old tokens, are unchanged.
    ``config.vocab_size`` is updated. An optimizer built before the resize must be rebuilt.
    """
    import torch
    from torch import nn

    embed, head = model.embed_tokens, model.lm_head
    old = embed.num_embeddings
    if new_vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {new_vocab_size} rows")
    if new_vocab_size == old:
        return

    def grow(weight: torch.Tensor) -> nn.Parameter:
        mean = weight.detach().float().mean(dim=0, keepdim=True).to(weight.dtype)
        rows = mean.expand(new_vocab_size - weight.shape[0], *weight.shape[1:])
        return nn.Parameter(torch.cat([weight.detach(), rows]), requires_grad=weight.requires_grad)

    embed.weight = grow(embed.weight)
    embed.num_embeddings = new_vocab_size
    if model.config.tie_embeddings:
        head.weight = embed.weight
    else:
        head.weight = grow(head.weight)
    if head.bias is not None:
        head.bias = grow(head.bias)
    head.out_features = new_vocab_size
    model.config.vocab_size = new_vocab_size
