"""The continuous-batching engine without HTTP: batched output equals output alone, prefix reuse,
n choices, adapters routed per request, back-pressure and cancellation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmforge.generate import SamplingParams, generate
from lmforge.pretrained import load_pretrained
from lmforge.serve.engine import Delta, Done, Engine, Failed, QueueFull, Request

TEXTS = ["The quick brown fox", "def add(a, b):", "naïve café", "Pack my box with five dozen liquor jugs. The",
         "emoji 🤖", "The quick brown fox jumps over", "12345 67890", "déjà vu"]  # fmt: skip


class Collector:
    """Events of one request, and a wait for its end."""

    def __init__(self):
        self.results, self.deltas, self.failed = {}, [], None
        self.ended = threading.Event()
        self.n = 1

    def __call__(self, event):
        if isinstance(event, Delta):
            self.deltas.append(event)
        elif isinstance(event, Done):
            self.results[event.index] = event.result
            if len(self.results) == self.n:
                self.ended.set()
        elif isinstance(event, Failed):
            self.failed = event
            self.ended.set()


def run(engine, prompts, params, n=1, adapter=None, stagger=0.0, timeout_s=None):
    collectors = []
    for p in prompts:
        c = Collector()
        c.n = n
        engine.submit(Request([p], params, n=n, adapter=adapter, on_event=c, timeout_s=timeout_s))
        collectors.append(c)
        time.sleep(stagger)
    for c in collectors:
        assert c.ended.wait(60), "request not answered"
    return collectors


@pytest.fixture(scope="module")
def llama(checkpoints):
    return load_pretrained(checkpoints["llama"][0], device="cpu")


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "qwen2"])
def test_greedy_batched_equals_alone(checkpoints, family):
    pre = load_pretrained(checkpoints[family][0], device="cpu")
    prompts = [pre.tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(max_new_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
    alone = [generate(pre.model, [p], params, pre.tokenizer)[0] for p in prompts]
    engine = Engine(pre.model, pre.tokenizer, max_batch=3, prefix_pool_rows=2)
    engine.start()
    try:  # more requests than rows, arriving while others decode: rows are refilled mid-flight
        got = [c.results[0] for c in run(engine, prompts, params, stagger=0.004)]
    finally:
        engine.stop()
    assert engine.stats.max_batch_seen == 3
    for a, b in zip(alone, got):
        assert a.tokens == b.tokens and a.text == b.text and a.finish_reason == b.finish_reason
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-4, rtol=0)
        assert [list(x) for x in b.top_logprobs] == [list(x) for x in a.top_logprobs]


def test_prefix_pool_reuses_a_shared_prompt_prefix(llama):
    tok = llama.tokenizer
    base = tok.encode("Pack my box with five dozen liquor jugs. The quick brown fox jumps over the lazy dog.")
    prompts = [base + tok.encode(t) for t in (" naïve", " def add", " 12345")]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    alone = generate(llama.model, prompts, params, tok)
    engine = Engine(llama.model, tok, max_batch=2, prefix_pool_rows=2)
    engine.start()
    try:
        first = run(engine, prompts[:1], params)[0].results[0]
        rest = [c.results[0] for c in run(engine, prompts[1:], params)]
    finally:
        engine.stop()
    assert engine.stats.prefix_hit_tokens >= 2 * len(base)  # the shared part was copied, not recomputed
    assert [r.tokens for r in [first, *rest]] == [a.tokens for a in alone]


def test_n_choices_share_one_prefill_and_match_generate(llama):
    tok = llama.tokenizer
    prompt = tok.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, seed=7, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=0.3)  # fmt: skip
    expected = generate(llama.model, [prompt] * 3, params, tok)  # row b samples with seed + b
    engine = Engine(llama.model, tok, max_batch=4, prefix_pool_rows=0)
    engine.start()
    try:
        c = run(engine, [prompt], params, n=3)[0]
    finally:
        engine.stop()
    assert engine.stats.prefills == 1
    assert [c.results[i].tokens for i in range(3)] == [e.tokens for e in expected]
    assert len({tuple(c.results[i].tokens) for i in range(3)}) > 1


class StubAdapters:
    """A stand-in for LoRA adapters: adapter NAME adds its own vector to the token embeddings.

    Only `activate(name)` matters to the engine, which is what real adapters provide too."""

    def __init__(self, model, names):
        gen = torch.Generator().manual_seed(0)
        d = model.config.n_embd
        self.offsets = {name: 0.05 * torch.randn(d, generator=gen) for name in names}
        self.active = None
        self.switches = 0
        model.embed_tokens.register_forward_hook(
            lambda module, args, out: out if self.active is None else out + self.offsets[self.active]
        )

    def activate(self, name):
        self.switches += 1
        self.active = name


def test_adapters_are_routed_per_request_in_one_batch(checkpoints):
    pre = load_pretrained(checkpoints["llama"][0], device="cpu")
    tok = pre.tokenizer
    adapters = StubAdapters(pre.model, ["sql", "poem"])
    prompts = [tok.encode(t) for t in TEXTS[:6]]
    routes = [None, "sql", "poem", "sql", None, "poem"]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    expected = []
    for p, name in zip(prompts, routes):
        adapters.activate(name)
        expected.append(generate(pre.model, [p], params, tok)[0].tokens)
    adapters.activate(None)
    base = [generate(pre.model, [p], params, tok)[0].tokens for p in prompts]
    assert all((e != b) == (name is not None) for e, b, name in zip(expected, base, routes))
    engine = Engine(pre.model, tok, max_batch=6, prefix_pool_rows=2, activate=adapters.activate)
    engine.start()
    try:
        collectors = []
        for p, name in zip(prompts, routes):
            c = Collector()
            engine.submit(Request([p], params, adapter=name, on_event=c))
            collectors.append(c)
            time.sleep(0.003)
        for c in collectors:
            assert c.ended.wait(60)
    finally:
        engine.stop()
    assert [c.results[0].tokens for c in collectors] == expected


def test_rows_stay_packed_and_grouped_by_adapter(llama):
    engine = Engine(llama.model, llama.tokenizer, max_batch=8, prefix_pool_rows=0)
    prompt = llama.tokenizer.encode("The quick")
    params = SamplingParams(max_new_tokens=64, temperature=0)
    seqs = []
    from lmforge.serve.engine import _Seq

    for name in [None, "a", None, "b", "a", "b", None]:
        r = Request([prompt], params, adapter=name)
        s = _Seq(r, 0, 0, prompt, 8, set(), None, None)
        s.row = engine._reserve(name, 1)
        engine.rows[s.row] = s
        engine.cache.reset(s.row)
        engine.cache._host_lengths[s.row] = 1 + len(seqs)  # a marker that must travel with the row
        seqs.append(s)

    def check():
        start = 0
        for name, count in engine.groups.items():
            assert all(engine.rows[i].adapter == name for i in range(start, start + count))
            start += count
        assert start == engine.running and all(r is None for r in engine.rows[start:])
        for i, s in enumerate(seqs):
            if s.row >= 0:
                assert engine.rows[s.row] is s and engine.cache._host_lengths[s.row] == 1 + i

    check()
    for s in (seqs[1], seqs[0], seqs[6]):
        s.done = True
        engine._release(s)
        check()
    assert list(engine.groups) == [None, "a", "b"] and engine.running == 4


def test_full_queue_refuses_and_cancel_frees_rows(llama):
    tok = llama.tokenizer
    engine = Engine(llama.model, tok, max_batch=2, max_queue=3, prefix_pool_rows=0)
    params = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)
    prompt = tok.encode("The quick brown fox")
    engine.submit(Request([prompt], params, n=3))  # not started: everything waits
    with pytest.raises(QueueFull):
        engine.submit(Request([prompt], params))
    engine.waiting.clear()
    engine.start()
    try:
        c = Collector()
        job = Request([prompt], params, n=2, on_event=c)
        engine.submit(job)
        deadline = time.monotonic() + 30
        while len(c.deltas) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.cancel(job)
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.running == 0 and not c.results
        # the engine still serves after a cancellation
        done = run(engine, [prompt], SamplingParams(max_new_tokens=4, temperature=0))[0]
        assert len(done.results[0].tokens) == 4
    finally:
        engine.stop()


def test_timeout_fails_the_request(llama):
    engine = Engine(llama.model, llama.tokenizer, max_batch=1)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=100000, temperature=0, ignore_eos=True)
        c = run(engine, [llama.tokenizer.encode("The")], params, timeout_s=0.05)[0]
    finally:
        engine.stop()
    assert c.failed is not None and c.failed.status == 504


def test_max_tokens_zero_returns_the_prompt_scores(llama):
    from lmforge.generate import score

    tok = llama.tokenizer
    prompt = tok.encode("The quick brown fox jumps")
    engine = Engine(llama.model, tok, max_batch=2)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=0, temperature=0, prompt_logprobs=True)
        result = run(engine, [prompt], params)[0].results[0]
    finally:
        engine.stop()
    expected, _ = score(llama.model, prompt)
    assert result.tokens == [] and result.prompt_logprobs[0] is None
    torch.testing.assert_close(result.prompt_logprobs[1:], expected[1:], atol=1e-4, rtol=0)
