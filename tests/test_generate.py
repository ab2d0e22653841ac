"""Generation behaviour: logits processors against transformers', streaming, stops, chat."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.generate import SamplingParams, generate, process_logits, score, stream
from lmforge.pretrained import load_pretrained


@pytest.fixture(scope="module")
def pre(checkpoints):
    return load_pretrained(checkpoints["llama"][0], device="cpu")


def _hf_warped(logits, prev_ids, **kw):
    """The same processing done by transformers' own processors, in generate()'s order."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = logits.clone()
    if kw.get("repetition_penalty", 1.0) != 1.0:
        out = RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"])(prev_ids, out)
    out = TemperatureLogitsWarper(kw.get("temperature", 1.0))(prev_ids, out)
    if kw.get("top_k"):
        out = TopKLogitsWarper(kw["top_k"])(prev_ids, out)
    if kw.get("top_p", 1.0) < 1.0:
        out = TopPLogitsWarper(kw["top_p"])(prev_ids, out)
    if kw.get("min_p"):
        out = MinPLogitsWarper(kw["min_p"])(prev_ids, out)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=10),
        dict(temperature=0.8, top_p=0.9),
        dict(temperature=1.3, min_p=0.05),
        dict(temperature=0.9, top_k=50, top_p=0.8, min_p=0.02, repetition_penalty=1.3),
    ],
)
def test_logits_processing_matches_transformers(kw):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=gen) * 3
    prev = torch.randint(0, 500, (4, 30), generator=gen)
    seen = torch.zeros(4, 500, dtype=torch.bool).scatter_(1, prev, True)
    ours = process_logits(logits, SamplingParams(**kw), seen=seen)
    theirs = _hf_warped(logits, prev, **kw)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # the same tokens are kept
    kept = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept])


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    from lmforge.generate import sample

    params = SamplingParams(temperature=1.0)
    gens = [torch.Generator().manual_seed(0)]
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[sample(logits, params, gens)[0]] += 1
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


def test_streaming_concatenates_to_generated_text(pre):
    prompt = pre.tokenizer.encode("naïve café 日本語 🤖 def add(a, b):")
    for params in (
        SamplingParams(max_new_tokens=40, temperature=0),
        SamplingParams(max_new_tokens=40, seed=3),
    ):
        pieces = list(stream(pre.model, pre.tokenizer, prompt, params))
        full = generate(pre.model, [prompt], params, pre.tokenizer)[0]
        assert "".join(pieces) == full.text
        ids_text = pre.tokenizer.decode(prompt + full.tokens, skip_special_tokens=True)
        assert ids_text.endswith(full.text)


def test_streaming_never_splits_a_character(pre, monkeypatch):
    """Force the decode loop to emit the byte-level tokens of multi-byte text, one token per step."""
    import lmforge.generate as g

    text = "Zürich ñandú 中文字符 🚀🌍 Ωμέγα"  # unseen in tokenizer training: byte tokens
    target = pre.tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in pre.tokenizer.decode([t]) for t in target)  # some tokens hold part of a character
    position = iter(range(len(target)))
    monkeypatch.setattr(g, "sample", lambda logits, params, gens: torch.tensor([target[next(position)]]))
    prompt = pre.tokenizer.encode("Pack my box")
    pieces = list(stream(pre.model, pre.tokenizer, prompt, SamplingParams(max_new_tokens=len(target))))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5


def test_stop_strings_end_text_before_them(pre):
    prompt = pre.tokenizer.encode("The quick brown fox")
    free = generate(pre.model, [prompt], SamplingParams(max_new_tokens=30, temperature=0), pre.tokenizer)[0]
    assert len(free.text) > 6
    stop = free.text[3:6]  # a string the free run produces
    params = SamplingParams(max_new_tokens=30, temperature=0, stop=[stop])
    stopped = generate(pre.model, [prompt], params, pre.tokenizer)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert "".join(stream(pre.model, pre.tokenizer, prompt, params)) == stopped.text


def test_stop_token_ids_and_eos(pre):
    prompt = pre.tokenizer.encode("Pack my box")
    free = generate(pre.model, [prompt], SamplingParams(max_new_tokens=20, temperature=0), pre.tokenizer)[0]
    target = free.tokens[4]
    out = generate(
        pre.model, [prompt], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[target])
    )[0]
    assert out.tokens == free.tokens[: free.tokens.index(target) + 1]
    assert out.finish_reason == "stop"
    # the tokenizer's EOS ends generation unless ignore_eos
    eos = pre.tokenizer.eos_id
    pre.model.config.eos_token_id = target
    try:
        out = generate(pre.model, [prompt], SamplingParams(max_new_tokens=20, temperature=0))[0]
        assert out.tokens[-1] == target and out.finish_reason == "stop"
        out = generate(
            pre.model, [prompt], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
        )[0]
        assert len(out.tokens) == 20 and out.finish_reason == "length"
    finally:
        pre.model.config.eos_token_id = None
    assert eos is not None


def test_score_matches_generation_logprobs(pre):
    ids = pre.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    logprobs, ppl = score(pre.model, ids)
    assert logprobs[0] is None and len(logprobs) == len(ids)
    assert math.isclose(ppl, math.exp(-sum(logprobs[1:]) / (len(ids) - 1)))
    out = generate(pre.model, [ids[:3]], SamplingParams(max_new_tokens=0, prompt_logprobs=True))[0]
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), torch.tensor(logprobs[1:3]))


def test_context_limit_is_enforced(pre):
    too_long = [1] * (pre.model.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="context"):
        generate(pre.model, [too_long], SamplingParams(max_new_tokens=4))
    near_end = [1] * (pre.model.config.max_seq_len - 3)
    out = generate(pre.model, [near_end], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert len(out.tokens) == 3 and out.finish_reason == "length"


def test_chat_template_matches_transformers(checkpoints, pre):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    theirs = AutoTokenizer.from_pretrained(checkpoints["llama"][0]).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert pre.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == theirs
