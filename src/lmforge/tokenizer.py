"""Tokenizer: a thin wrapper over the Hugging Face ``tokenizers`` library.

A checkpoint folder's ``tokenizer.json`` holds the whole text <-> ids pipeline; the other files only name
special tokens, stop ids and chat templates. This module reads all of them and reproduces what
``transformers.AutoTokenizer`` (v5, generic ``TokenizersBackend``) does with the same folder, so that a model
trained or served with lmforge sees exactly the ids it would see under transformers, without importing it.
(Some transformers model classes rebuild the pipeline instead of reading it; see docs/tokenizer.md.)

Points where transformers' behaviour is easy to get wrong, and which are mirrored here on purpose:

* BOS/EOS come from ``tokenizer.json``'s post-processor alone. transformers 5 drops ``add_bos_token`` /
  ``add_eos_token`` from ``tokenizer_config.json`` whenever ``tokenizer.json`` exists, so they are ignored.
* Named special tokens (``bos_token``, ``eos_token``, ... and any other ``*_token`` key) that are not yet
  added tokens are registered with the backend as special added tokens, which can give them a new id.
* Encoding never truncates or pads, even when ``tokenizer.json`` asks for it; its padding token only serves
  as the default ``pad_token``.
* Chat templates render in a sandboxed Jinja environment with the same settings, globals and filters as
  ``transformers.utils.chat_template_utils``, with the special tokens available as variables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

__all__ = ["CHATML_TEMPLATE", "StreamDecoder", "Tokenizer", "render_chat_template"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' standard named special tokens, in the order it registers them (this order decides the ids
# of tokens that are missing from the vocabulary); other ``*_token`` keys follow in file order.
STANDARD_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# A default for checkpoints without a template, e.g. models we train ourselves. It is never applied
# silently: a model only understands the format it was trained on, so set it explicitly
# (``tokenizer.chat_template = CHATML_TEMPLATE``) before training or saving.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# transformers' ``clean_up_tokenization``: meant for WordPiece-era tokenizers, applied on decode only when
# the config asks for it and the model is not BPE (where it would delete real spaces).
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)

_ADDED_TOKEN_OPTIONS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its special tokens and chat templates.

    Build it with :meth:`from_dir`; the constructor is for tokenizers made in code (e.g. freshly trained).
    The constructor takes ownership of ``backend``: it registers the special tokens in it and switches off
    any truncation or padding stored in ``tokenizer.json``.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | AddedToken | None] | None = None,
        extra_special_tokens: Sequence[str | AddedToken] = (),
        chat_template: str | Mapping[str, str] | None = None,
        extra_eos_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        """
        Args:
            backend: the ``tokenizers.Tokenizer`` doing the work.
            special_tokens: named special tokens such as ``{"bos_token": "<s>", "eos_token": "</s>"}``;
                they are also the special-token variables of chat templates.
            extra_special_tokens: further tokens to register as special (never split, dropped by
                ``decode(skip_special_tokens=True)``) without a name.
            chat_template: one Jinja template, or several by name (``"default"`` is used unless told
                otherwise, ``"tool_use"`` when tools are passed).
            extra_eos_ids: stop ids besides ``eos_token``, e.g. from ``generation_config.json``.
            clean_up_tokenization_spaces: transformers' legacy decode clean-up (ignored for BPE models,
                as transformers does).
        """
        self._backend = backend
        backend.no_truncation()
        backend.no_padding()

        named = {name: token for name, token in (special_tokens or {}).items() if token is not None}
        order = [name for name in STANDARD_SPECIAL_TOKENS if name in named]
        order += [name for name in named if name not in STANDARD_SPECIAL_TOKENS]
        named_tokens = {name: _added_token(named[name]) for name in order}
        for token in named_tokens.values():
            token.special = True
        self._register([*named_tokens.values(), *map(_added_token, extra_special_tokens)])
        self._special_tokens = {name: token.content for name, token in named_tokens.items()}

        if isinstance(chat_template, str):
            chat_template = {"default": chat_template}
        self._chat_templates = dict(chat_template or {})
        self._extra_eos_ids = frozenset(int(i) for i in extra_eos_ids)
        self._clean_up_spaces = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

    def _register(self, tokens: Iterable[AddedToken]) -> None:
        """Add the tokens that are not yet added tokens, like transformers does at load time.

        Tokens that already are added tokens are left exactly as ``tokenizer.json`` defines them (even if
        not special); tokens only in the model vocabulary keep their id and become special added tokens.
        """
        present = {token.content for token in self._backend.get_added_tokens_decoder().values()}
        missing = []
        for token in tokens:
            if token.content not in present:
                present.add(token.content)
                missing.append(token)
        if missing:
            self._backend.add_tokens(missing)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer of a checkpoint folder, reading the same files as transformers.

        ``tokenizer.json`` is required. Optional: ``tokenizer_config.json`` (special tokens, chat template,
        decode options), ``special_tokens_map.json`` (legacy: overrides the config's special tokens unless
        the config has ``added_tokens_decoder``), ``generation_config.json`` (extra stop ids),
        ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` (which win over the config's
        template, as in transformers).
        """
        folder = Path(path)
        backend = _load_backend(folder / TOKENIZER_FILE)
        config = _read_json(folder / CONFIG_FILE) or {}

        special: dict[str, Any] = {key: value for key, value in config.items() if _is_token_entry(key, value)}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):  # transformers 5 also saves model-specific named tokens here
            special.update(extra)
            extra = []
        extra = list(extra)

        if "added_tokens_decoder" in config:
            entries = sorted(config["added_tokens_decoder"].items(), key=lambda item: int(item[0]))
            backend.add_tokens([_added_token(entry) for _, entry in entries])
        else:
            legacy = _read_json(folder / SPECIAL_TOKENS_MAP_FILE) or {}
            for key, value in legacy.items():
                if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                    extra += [token for token in value if token not in extra]
                elif _is_token_entry(key, value):
                    special[key] = value

        padding = backend.padding
        if padding is not None and "pad_token" not in config and "pad_token" not in special:
            special["pad_token"] = padding["pad_token"]
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        generation = _read_json(folder / GENERATION_CONFIG_FILE) or {}
        eos_ids = generation.get("eos_token_id")
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]

        return cls(
            backend,
            special_tokens=special,
            extra_special_tokens=extra,
            chat_template=_read_chat_templates(folder, config),
            extra_eos_ids=eos_ids or (),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ---- vocabulary and special tokens ----

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids a model must embed: largest id + 1, added tokens included.

        Unlike transformers' ``vocab_size`` (base vocabulary only) this counts added tokens; it equals
        ``len(hf_tokenizer)`` for the usual gap-free vocabularies.
        """
        return max(self._backend.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens, e.g. ``{"bos_token": "<s>", "eos_token": "</s>"}``."""
        return dict(self._special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (added tokens included), or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_ids(self) -> set[int]:
        """Every id that ends generation: ``eos_token`` and the ``generation_config.json`` stop ids."""
        ids = set(self._extra_eos_ids)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return ids

    # ---- encode / decode ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. Llama's BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts at once, in parallel inside ``tokenizers``."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a list or a 1-D tensor)."""
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            for old, new in _CLEAN_UP_REPLACEMENTS:
                text = text.replace(old, new)
        return text

    def stream_decoder(
        self, skip_special_tokens: bool = False, context_ids: Sequence[int] = ()
    ) -> StreamDecoder:
        """A :class:`StreamDecoder` for this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids)

    # ---- chat templates ----

    @property
    def chat_template(self) -> str | None:
        """The default chat template (None if the checkpoint has none)."""
        return self._chat_templates.get("default")

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is None:
            self._chat_templates.pop("default", None)
        else:
            self._chat_templates["default"] = template

    @property
    def chat_templates(self) -> dict[str, str]:
        """All chat templates by name; a single template is named ``"default"``."""
        return dict(self._chat_templates)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the chat template, as ``transformers``' ``apply_chat_template``.

        Args:
            messages: dicts with at least ``role`` and ``content``.
            add_generation_prompt: end with the header of an assistant turn, to generate a reply
                (on by default here, unlike transformers; pass False to format training data).
            tokenize: return ids (encoded without adding special tokens: the template writes them).
            chat_template: a template name from :attr:`chat_templates`, or a template string.
            tools: JSON schemas of callable tools, for templates that support them.
            documents: retrieval documents (dicts), for templates that support them.
            kwargs: further template variables (e.g. ``enable_thinking``); they override special tokens.
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        template = self._select_template(chat_template, tools)
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **{**self._special_tokens, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_template(self, name_or_template: str | None, tools: object) -> str:
        templates = self._chat_templates
        if name_or_template is not None:
            return templates.get(name_or_template, name_or_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        if templates:
            raise ValueError(f"no default chat template; pass chat_template= one of {sorted(templates)}")
        raise ValueError(
            "this tokenizer has no chat template; set one, e.g. tokenizer.chat_template = CHATML_TEMPLATE"
        )

    # ---- saving ----

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` that transformers loads back identically.

        The chat template goes into ``tokenizer_config.json`` (read by every transformers version). A
        ``chat_template.jinja`` already in the folder would take precedence in transformers, so it is
        rewritten with the default template, or removed when there is none. Stop ids from
        ``generation_config.json`` belong to the model's generation config and are not written here.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / TOKENIZER_FILE))

        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens,
            "clean_up_tokenization_spaces": self._clean_up_spaces,
            "split_special_tokens": self._backend.encode_special_tokens,
        }
        if list(self._chat_templates) == ["default"]:
            config["chat_template"] = self._chat_templates["default"]
        elif self._chat_templates:
            config["chat_template"] = [{"name": n, "template": t} for n, t in self._chat_templates.items()]
        with open(folder / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

        stale_template = folder / CHAT_TEMPLATE_FILE
        if stale_template.exists():
            if self.chat_template is None:
                stale_template.unlink()
            else:
                stale_template.write_text(self.chat_template, encoding="utf-8")


class StreamDecoder:
    """Incremental detokenisation: token ids in, one at a time; printable text pieces out.

    Decoding each id alone is wrong twice over: a character split over several byte tokens comes out as
    U+FFFD, and SentencePiece-style decoders drop the leading space of a lone ``▁word`` token. So every
    step decodes a small window of recent ids twice, without and with the new ones, and emits the
    difference; the window starts at the last emission point, which gives the decoder its context. A
    piece whose text ends in U+FFFD is held back until the character completes; :meth:`flush` returns
    whatever is still held at the end.

    All pieces plus ``flush()`` concatenate to ``tokenizer.decode(ids)``; with ``context_ids`` (e.g. the
    prompt, which is used as context and never emitted) to ``decode(context + ids)[len(decode(context)):]``.
    This holds for byte-level BPE and SentencePiece/Metaspace decoders; decoders that rewrite text already
    produced (WordPiece clean-up) may differ slightly.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False, context_ids: Sequence[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = [int(i) for i in context_ids]
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(self._ids)  # ids before this have been emitted (or are context)

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes (often ``""`` while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back (an incomplete character decodes to U+FFFD, as in decode())."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        done = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(window)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(done) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


# ---- chat template rendering ----


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render a Jinja chat template exactly as transformers' ``render_jinja_template`` does.

    The inputs are first rebuilt from plain JSON-like types so the sandboxed template can only see data,
    keys whose value is None are dropped from messages (templates tend to print "None" otherwise), and
    a message's reasoning is copied to both ``reasoning_content`` and ``thinking``, the names templates read.
    ``tools`` and ``documents`` are always defined, as None when not given.
    """
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise TypeError("tools must be JSON schemas (dicts); convert functions to schemas first")
    if documents is not None and not all(isinstance(doc, Mapping) for doc in documents):
        raise TypeError("documents must be dicts, e.g. with 'title' and 'text' keys")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        chat.append(_with_reasoning_aliases(_plain_data({k: v for k, v in message.items() if v is not None})))
    return _compile_template(template).render(
        messages=chat,
        tools=_plain_data(tools),
        documents=_plain_data(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain_data(variables),
    )


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _with_reasoning_aliases(message: dict[str, Any]) -> dict[str, Any]:
    """Expose a message's reasoning under ``reasoning_content`` (always) and ``thinking`` (if unset)."""
    reasoning = next((message[key] for key in _REASONING_KEYS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain_data(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON-like types for the template sandbox.

    Objects can carry methods the sandbox does not know to be dangerous, so str/int/float subclasses
    (enums, numpy scalars) are reduced to the base type, mappings, lists, tuples, dataclasses and pydantic
    models are rebuilt recursively, and anything else becomes an inert ``"<TypeName>"`` placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(key): _plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(item) for item in value)
    if isinstance(value, np.generic):
        return _plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in some
    templates; it must parse, and it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """The template's ``dict``: builds dicts, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes, a path to Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Positional ``self`` as in jinja2's Namespace, so that ``namespace(self=...)`` keeps working.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        super().__setitem__(name, value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: unlike Jinja's own it keeps non-ASCII and does not HTML-escape."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=1)
def _sandbox() -> ImmutableSandboxedEnvironment:
    # Chat templates come with downloaded checkpoints, i.e. they are untrusted code; older Jinja releases
    # have known sandbox escapes.
    if tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (sandbox fixes), found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _SafeNamespace
    return env


@lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    return _sandbox().from_string(template)


# ---- loading helpers ----


def _load_backend(file: Path) -> BackendTokenizer:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a tokenizer folder needs {TOKENIZER_FILE}")
    try:
        return BackendTokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for any parse error
        raise ValueError(f"{file} is not a valid tokenizers file: {str(err).splitlines()[0]}") from err


def _read_json(file: Path) -> dict[str, Any] | None:
    """The JSON object in ``file``, or None when the file does not exist."""
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} should hold a JSON object, found {type(data).__name__}")
    return data


def _is_token_entry(key: str, value: Any) -> bool:
    """Whether a config entry names a special token: a ``*_token`` key with a string or AddedToken dict."""
    return key.endswith("_token") and (
        isinstance(value, str) or (isinstance(value, dict) and "content" in value)
    )


def _added_token(value: str | Mapping[str, Any] | AddedToken) -> AddedToken:
    """An AddedToken from a string (a special token) or its serialised dict form (``{"content": ...}``)."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True)
    options = {key: value[key] for key in _ADDED_TOKEN_OPTIONS if key in value}
    return AddedToken(value["content"], **options)


def _read_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Templates by name: from ``*.jinja`` files when there are any, else from the config."""
    templates = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for file in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template}
    return {}
