"""The server's OpenAPI schema, fuzzed by schemathesis (bounded): no request makes it answer 5xx."""

from __future__ import annotations

from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from lmforge.pretrained import load_pretrained  # noqa: E402
from lmforge.serve import Models, RunningServer, ServeSettings, create_app  # noqa: E402

KEY = "fuzz-key-0123456789"


@pytest.fixture(scope="module")
def fuzz_server(checkpoints):
    from lmforge.embed import SentenceEncoder

    pre = load_pretrained(checkpoints["llama"][0], device="cpu")
    try:
        embedder = SentenceEncoder.load()  # all-MiniLM-L6-v2, when its package is installed
    except FileNotFoundError:
        embedder = None
    name = embedder.name if embedder is not None else "no-embedder"
    models = Models(
        pre.model,
        pre.tokenizer,
        "tiny",
        embedder=embedder,
        embedder_name=name if embedder is not None else None,
    )
    limits = ServeSettings(api_keys=[KEY], max_batch=4, max_tokens_limit=32, request_timeout_s=30)
    with RunningServer(create_app(models, limits)) as server:
        server.embedder_name = name
        server.has_embedder = embedder is not None
        yield server


def test_no_request_gets_a_server_error(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.base + "/openapi.json")
    failures, statuses = [], Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6  # models, completions, chat, embeddings, health, metrics
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY}"}
            if isinstance(case.body, dict) and len(case.body) > 2:  # most reach the model, not only the 404
                embeddings = case.operation.path == "/v1/embeddings"
                case.body["model"] = fuzz_server.embedder_name if embeddings else "tiny"
            response = case.call(timeout=60)
            statuses[case.operation.path, response.status_code] += 1
            if response.status_code >= 500:
                failures.append((case.operation.path, case.body, response.status_code, response.text[:300]))

        fuzz()
    assert not failures, failures[:5]
    routes = ["/v1/completions", "/v1/chat/completions"] + (
        ["/v1/embeddings"] if fuzz_server.has_embedder else []
    )
    for route in routes:
        assert statuses[route, 200] > 0 and statuses[route, 400] > 0, statuses  # both sides were reached
