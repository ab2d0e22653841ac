"""32 clients at once: every request is answered correctly or refused with 429, none is lost, no 5xx;
and temperature-0 output is the same batched as alone."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from lmforge.generate import SamplingParams, generate
from lmforge.pretrained import load_pretrained
from lmforge.serve import Models, RunningServer, ServeSettings, create_app

WORDS = ["The quick brown fox", "def add(a, b):", "naïve café", "Pack my box", "emoji 🤖", "12345",
         "déjà vu", "return a + b"]  # fmt: skip
CLIENTS = 32


@pytest.fixture(scope="module")
def pre(checkpoints):
    return load_pretrained(checkpoints["llama"][0], device="cpu")


def _request(url: str, i: int, out: list) -> None:
    prompt = f"{WORDS[i % len(WORDS)]} {i}"
    stream = i % 3 == 0
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12 + i % 5, "temperature": 0, "stream": stream}
    try:
        with httpx.Client(timeout=120) as client:
            if not stream:
                r = client.post(url + "/completions", json=body)
                text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
                out[i] = (r.status_code, text, r.headers.get("retry-after"))
                return
            with client.stream("POST", url + "/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    out[i] = (r.status_code, None, r.headers.get("retry-after"))
                    return
                lines = [x for x in r.iter_lines() if x]
            assert lines[-1] == "data: [DONE]"
            text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])
            out[i] = (200, text, None)
    except Exception as e:  # recorded, so the test reports it instead of a lost request
        out[i] = ("exception", repr(e), None)


def test_32_concurrent_clients_answered_or_429(pre):
    tok = pre.tokenizer
    expected = {}
    for i in range(CLIENTS):
        prompt = tok.encode(f"{WORDS[i % len(WORDS)]} {i}")
        params = SamplingParams(max_new_tokens=12 + i % 5, temperature=0)
        expected[i] = generate(pre.model, [prompt], params, tok)[0].text  # each prompt alone
    settings = ServeSettings(max_batch=8, max_queue=12, response_cache_entries=0)
    app = create_app(Models(pre.model, tok, "tiny"), settings)
    results: list = [None] * CLIENTS
    with RunningServer(app) as server:
        threads = [threading.Thread(target=_request, args=(server.url, i, results)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        metrics = httpx.get(server.base + "/metrics").text
        engine = app.state.server.engine
        assert engine.stats.max_batch_seen > 1  # requests were decoded together
    assert all(r is not None for r in results), "a request was lost"
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429}, statuses
    answered = [i for i, r in enumerate(results) if r[0] == 200]
    refused = [i for i, r in enumerate(results) if r[0] == 429]
    assert len(answered) >= 8
    print(f"answered {len(answered)}, refused {len(refused)}")
    for i in answered:
        assert results[i][1] == expected[i], f"request {i}: batched output differs from alone"
    assert all(results[i][2] is not None for i in refused)  # Retry-After
    # no request was answered with a server error; /health is excluded: it answers 503 until the load
    # thread has finished, and RunningServer may poll it that early (CI saw one such 503 once)
    errors = [line for line in metrics.splitlines() if 'status="5' in line and 'route="/health"' not in line]
    assert not errors, errors
