"""lmforge.tokenizer against transformers.AutoTokenizer, on tiny tokenizers trained here (no network).

Two layouts cover what checkpoints ship: GPT-2 style byte-level BPE (no BOS) and Llama style Metaspace BPE
with byte fallback and a post-processor that adds <s>. Each is loaded by transformers both through the
generic class and through the model-specific class that real checkpoints declare.
"""

from __future__ import annotations

import enum
import json
import random
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "Paris", "is"]
WORDS += ["capital", "of", "France", "naïve", "café", "日本語", "🤖", "tokens", "  ", "\t", "\n"]

TEXTS = [
    "Hello world",
    "",
    " leading space",
    "trailing space ",
    "multiple   spaces\tand\ttabs\n\n newlines",
    "naïve café 日本語 🤖",
    "never seen in training: 🦙 ß 漢字 ❤️",
    "special <|endoftext|> and <s> inline </s> tokens",
    "The capital of France is Paris.",
]
# Characters missing from the training text come out as several byte tokens each, which is what
# streaming has to hold back.
STREAM_TEXT = "Streaming 🤖 works: 日本語, naïve café, and 🦙漢字ß too!"


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]


def _byte_level_bpe() -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _metaspace_bpe() -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    # As in Llama, the byte-fallback pieces <0x00>..<0xFF> are ordinary vocabulary entries.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = BackendTokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


BUILDERS = {"byte_level": _byte_level_bpe, "metaspace": _metaspace_bpe}
BASE_CONFIGS = {
    "byte_level": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "metaspace": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False},
}
MODEL_CLASSES = {"byte_level": "GPT2Tokenizer", "metaspace": "LlamaTokenizer"}


def write_checkpoint(folder: Path, style: str, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    BUILDERS[style]().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **BASE_CONFIGS[style], **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def load_hf(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(
    scope="module",
    params=[(style, generic) for style in BUILDERS for generic in (True, False)],
    ids=lambda p: f"{p[0]}-{'generic' if p[1] else MODEL_CLASSES[p[0]]}",
)
def pair(request, tmp_path_factory):
    """(style, ours, transformers') loaded from the same folder."""
    style, generic = request.param
    tokenizer_class = "PreTrainedTokenizerFast" if generic else MODEL_CLASSES[style]
    folder = write_checkpoint(tmp_path_factory.mktemp(style), style, tokenizer_class=tokenizer_class)
    return style, Tokenizer.from_dir(folder), load_hf(folder)


# ---- encode / decode ----


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    _, ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens)
    batch = hf(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]
    assert ours.encode_batch(TEXTS, add_special_tokens) == batch


def test_bos_follows_the_post_processor(pair):
    style, ours, _ = pair
    ids = ours.encode("hello world")
    if style == "metaspace":
        assert ids[0] == ours.bos_id and ours.encode("hello world", add_special_tokens=False) == ids[1:]
    else:
        assert ours.bos_id not in ids


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}])
def test_add_bos_eos_flags_resolve_like_transformers(tmp_path, flags):
    # transformers 5 drops these flags when tokenizer.json exists: its post-processor alone decides.
    folder = write_checkpoint(tmp_path, "metaspace", tokenizer_class="LlamaTokenizer", **flags)
    ours, hf = Tokenizer.from_dir(folder), load_hf(folder)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_transformers(pair, skip_special_tokens):
    _, ours, hf = pair
    sequences = [hf.encode(text) + [hf.eos_token_id] for text in TEXTS]
    rng = random.Random(1)  # arbitrary ids too: lone byte pieces, specials mid-text, odd spacing
    sequences += [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 30))] for _ in range(50)]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens) == hf.decode(
            ids, skip_special_tokens=skip_special_tokens
        )


def test_vocab_and_special_ids_match_transformers(pair):
    _, ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.special_tokens == hf.special_tokens_map
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.eos_ids == {hf.eos_token_id}


@pytest.mark.parametrize("legacy_map", [True, False])
def test_special_tokens_from_config_files(tmp_path, legacy_map):
    added_token = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False}
    config = {
        "bos_token": added_token | {"rstrip": False, "single_word": False, "special": True},
        "pad_token": "<pad>",  # not in the vocabulary: gets a new id
        "image_token": "<image>",  # model-specific named token
        "additional_special_tokens": ["<extra>"],
    }
    if not legacy_map:  # with added_tokens_decoder, special_tokens_map.json is ignored
        config["added_tokens_decoder"] = {
            "1": {"content": "<s>", "special": True, "normalized": False},
            "900": {"content": "<tool>", "special": False, "normalized": False},  # not in tokenizer.json
        }
    folder = write_checkpoint(tmp_path, "metaspace", **config)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|eot|>"}}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ours, hf = Tokenizer.from_dir(folder), load_hf(folder)

    assert ours.special_tokens == hf.special_tokens_map
    assert ours.special_tokens["eos_token"] == ("<|eot|>" if legacy_map else "</s>")
    assert ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.eos_ids == {hf.eos_token_id, 2, 7}
    text = "a<pad>b <image> <extra><|eot|> c<tool>"
    assert ours.encode(text) == hf.encode(text)
    for skip in (False, True):
        assert ours.decode(ours.encode(text), skip) == hf.decode(hf.encode(text), skip_special_tokens=skip)


def test_tokenizer_json_padding_and_truncation(tmp_path):
    backend = _metaspace_bpe()
    backend.enable_padding(pad_id=2, pad_token="</s>", length=64)
    backend.enable_truncation(max_length=4)
    tmp_path.joinpath("tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    ours, hf = Tokenizer.from_dir(tmp_path), load_hf(tmp_path)
    assert ours.pad_id == hf.pad_token_id == 2  # the padding token becomes the default pad_token...
    for text in TEXTS:  # ...but encoding neither pads nor truncates
        assert ours.encode(text) == hf.encode(text)
    assert len(ours.encode(TEXTS[-1])) > 4


@pytest.mark.parametrize("model", ["bpe", "word_level"])
def test_clean_up_tokenization_spaces(tmp_path, model):
    if model == "bpe":
        write_checkpoint(tmp_path, "byte_level", clean_up_tokenization_spaces=True)
    else:
        words = ["[UNK]", "it", "'", "s", "do", "n't", ".", "hello", ",", "world", "?"]
        backend = BackendTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.save(str(tmp_path / "tokenizer.json"))
        config = {"unk_token": "[UNK]", "clean_up_tokenization_spaces": True}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, hf = Tokenizer.from_dir(tmp_path), load_hf(tmp_path)
    for text in ["hello , world .", "it ' s", "do n't ?", "it's"]:
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids)


# ---- streaming ----


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_pieces_concatenate_to_decode(pair, skip_special_tokens):
    _, ours, hf = pair
    ids = ours.encode(STREAM_TEXT) + [ours.eos_id] + ours.encode(" more 🤖🦙", add_special_tokens=False)
    # The text really splits characters over tokens, so decoding ids one by one would print U+FFFD.
    assert any("\ufffd" in ours.decode([i]) for i in ids)

    stream = ours.stream_decoder(skip_special_tokens=skip_special_tokens)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens)
    assert "".join(pieces) == hf.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_with_prompt_context_keeps_the_leading_space(pair):
    style, ours, _ = pair
    ids = ours.encode("The capital of France is Paris 🦙!")
    marker = "▁" if style == "metaspace" else "Ġ"
    start = max(i for i, t in enumerate(ids) if ours.backend.id_to_token(t).startswith(marker))
    prompt, generated = ids[:start], ids[start:]

    stream = ours.stream_decoder(context_ids=prompt)
    text = "".join(stream.feed(i) for i in generated) + stream.flush()
    assert text == ours.decode(ids)[len(ours.decode(prompt)) :]
    assert text.startswith(" ")
    if style == "metaspace":  # decoded alone, the first piece loses its space
        assert not ours.decode(generated).startswith(" ")


def test_stream_flush_returns_an_incomplete_character(pair):
    _, ours, _ = pair
    ids = ours.encode("ab🦙", add_special_tokens=False)[:-1]  # stop one byte short of the emoji
    stream = ours.stream_decoder()
    pieces = [stream.feed(i) for i in ids]
    held = stream.flush()
    assert not any("\ufffd" in piece for piece in pieces)
    assert held.endswith("\ufffd")
    assert "".join(pieces) + held == ours.decode(ids)


# ---- chat templates ----

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Exercises what transformers adds to plain Jinja: whitespace control, namespace, loop controls,
# {% generation %}, dict(), tojson options, strftime_now, reasoning aliases, None-valued keys dropped,
# tools/documents always defined, special tokens and extra variables.
FEATURES_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if ns.count > 4 %}{% break %}{% endif %}
<{{ message.role }}>
    {% if message.reasoning_content is defined %}
[think: {{ message.reasoning_content }} / {{ message.thinking }}]
    {% endif %}
    {% generation %}{{ message.content | trim }}{% endgeneration %}
    {% if 'tool_calls' in message %}
{{ message.tool_calls | tojson }}
    {% endif %}
</{{ message.role }}>
{% endfor %}
{{ dict(a=1, b='ü') | tojson(sort_keys=True) }} {{ dict.fromkeys(['x', 'y'], 0) | tojson }}
{{ tools | tojson(indent=2) }} {{ documents | tojson(separators=(',', ':')) }} {{ strftime_now('%Y') }}
{{ bos_token }}{{ eos_token }} {{ mode }} {{ custom }}
{% if add_generation_prompt %}<assistant>{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "You are terse. Réponds en français si besoin."},
    {"role": "user", "content": "  What is the capital of 日本? 🤖  "},
    {"role": "assistant", "content": "Tokyo.", "tool_calls": None},
    {"role": "user", "content": "And of France?"},
]
FEATURE_MESSAGES = [
    *MESSAGES[:2],
    {"role": "assistant", "content": "Let me check.", "reasoning": "use the tool", "tool_calls": None},
    {"role": "tool", "content": "Paris"},
    {"role": "assistant", "content": "Paris.", "tool_calls": [{"name": "lookup", "arguments": {"q": "Fr"}}]},
    {"role": "user", "content": "thanks"},
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Cherche une capitale ✓"}}]


class Mode(str, enum.Enum):
    FAST = "fast"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_TEMPLATE], ids=["chatml", "llama3"])
def test_chat_template_matches_transformers(pair, template, add_generation_prompt):
    _, ours, hf = pair
    kwargs = {"chat_template": template, "add_generation_prompt": add_generation_prompt}
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
    assert ours.apply_chat_template(MESSAGES, **kwargs) == expected
    assert ours.apply_chat_template(MESSAGES, tokenize=True, **kwargs) == hf.encode(
        expected, add_special_tokens=False
    )
    with_tools = hf.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, **kwargs)
    assert ours.apply_chat_template(MESSAGES, tools=TOOLS, **kwargs) == with_tools


def test_chatml_template_format(pair):
    _, ours, _ = pair
    text = ours.apply_chat_template(MESSAGES[:2], chat_template=CHATML_TEMPLATE)
    assert text == (
        "<|im_start|>system\nYou are terse. Réponds en français si besoin.<|im_end|>\n"
        "<|im_start|>user\n  What is the capital of 日本? 🤖  <|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_features_match_transformers(pair, add_generation_prompt):
    _, ours, hf = pair
    kwargs = {
        "chat_template": FEATURES_TEMPLATE,
        "add_generation_prompt": add_generation_prompt,
        "tools": TOOLS,
        "documents": [{"title": "Doc", "text": "über"}],
        "mode": Mode.FAST,
        "custom": ("a", 1),
    }
    expected = hf.apply_chat_template(FEATURE_MESSAGES, tokenize=False, **kwargs)
    assert ours.apply_chat_template(FEATURE_MESSAGES, **kwargs) == expected
    assert "[think: use the tool / use the tool]" in expected and "fast" in expected


def test_templates_load_from_config_and_files(tmp_path):
    named = [
        {"name": "default", "template": CHATML_TEMPLATE},
        {"name": "tool_use", "template": LLAMA3_TEMPLATE},
    ]
    folder = write_checkpoint(tmp_path, "byte_level", chat_template=named)
    ours, hf = Tokenizer.from_dir(folder), load_hf(folder)
    assert ours.chat_templates == hf.chat_template
    for tools in (None, TOOLS):
        expected = hf.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(MESSAGES, tools=tools) == expected

    (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")  # wins over the config
    ours, hf = Tokenizer.from_dir(folder), load_hf(folder)
    assert ours.chat_template == hf.chat_template == LLAMA3_TEMPLATE
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_template_errors(pair):
    _, ours, hf = pair
    with pytest.raises(ValueError, match="CHATML_TEMPLATE"):
        ours.apply_chat_template(MESSAGES)
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        ours.apply_chat_template(MESSAGES, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(MESSAGES, chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(MESSAGES, chat_template="{% set ns = namespace(_x=1) %}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox is immutable
        ours.apply_chat_template(MESSAGES, chat_template="{{ messages.append(1) }}")


# ---- saving ----


def test_save_round_trips_through_transformers(tmp_path):
    source = write_checkpoint(
        tmp_path / "src", "metaspace", tokenizer_class="LlamaTokenizer", pad_token="<pad>"
    )
    ours = Tokenizer.from_dir(source)
    ours.chat_template = CHATML_TEMPLATE
    target = tmp_path / "saved"
    target.mkdir()
    (target / "chat_template.jinja").write_text("STALE", encoding="utf-8")
    ours.save(target)

    hf, reloaded = load_hf(target), Tokenizer.from_dir(target)
    assert hf.chat_template == reloaded.chat_template == CHATML_TEMPLATE
    assert hf.special_tokens_map == reloaded.special_tokens == ours.special_tokens
    assert len(hf) == reloaded.vocab_size == ours.vocab_size
    for text in [*TEXTS, "<pad> padded"]:
        assert hf.encode(text) == reloaded.encode(text) == ours.encode(text)
        assert hf.decode(hf.encode(text)) == reloaded.decode(ours.encode(text))
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert reloaded.apply_chat_template(MESSAGES) == ours.apply_chat_template(MESSAGES) == expected


def test_save_named_templates(tmp_path):
    ours = Tokenizer.from_dir(write_checkpoint(tmp_path / "src", "byte_level"))
    templates = {"default": CHATML_TEMPLATE, "tool_use": LLAMA3_TEMPLATE}
    ours = Tokenizer(ours.backend, special_tokens=ours.special_tokens, chat_template=templates)
    ours.save(tmp_path / "saved")
    assert load_hf(tmp_path / "saved").chat_template == Tokenizer.from_dir(tmp_path / "saved").chat_templates


# ---- errors ----


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_files_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    write_checkpoint(tmp_path, "byte_level")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
