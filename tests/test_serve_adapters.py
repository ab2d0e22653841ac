"""Multi-adapter serving with real LoRA adapters (lmforge.finetune): loaded once over one base model,
chosen per request by `model`, decoded in one batch with requests for other adapters and the base."""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from lmforge.generate import SamplingParams, generate
from lmforge.pretrained import load_pretrained
from lmforge.serve import RunningServer, ServeSettings, create_app, load_models

finetune = pytest.importorskip("lmforge.finetune")

TEXTS = ["The quick brown fox", "def add(a, b):", "naïve café", "Pack my box with", "emoji 🤖", "12345"]


def _make_adapter(ckpt, folder, name: str, seed: int) -> None:
    pre = load_pretrained(ckpt, device="cpu")
    finetune.add_lora(pre.model, finetune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                      adapter_name=name)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero (no change); a trained adapter has moved it
        for pname, p in pre.model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    finetune.save_adapter(pre.model, folder, name)


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    ckpt = checkpoints["llama"][0]
    root = tmp_path_factory.mktemp("adapters")
    _make_adapter(ckpt, root / "sql", "sql", 1)
    _make_adapter(ckpt, root / "poem", "poem", 2)
    return ckpt, {"sql": root / "sql", "poem": root / "poem"}


def _expected(ckpt, adapter_dir, prompt_text, n_tokens):
    pre = load_pretrained(ckpt, device="cpu")
    if adapter_dir is not None:
        finetune.load_adapter(pre.model, adapter_dir, adapter_name="x")
    ids = pre.tokenizer.encode(prompt_text)
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0)
    return generate(pre.model.eval(), [ids], params, pre.tokenizer)[0].text


def test_adapters_chosen_by_model_field_in_one_batch(adapters):
    ckpt, dirs = adapters
    routes = ["tiny", "sql", "poem", "sql", "tiny", "poem"]
    expected = [_expected(ckpt, dirs.get(route), text, 12) for route, text in zip(routes, TEXTS)]
    assert expected[1] != _expected(ckpt, None, TEXTS[1], 12)  # the adapter changes the output
    app = create_app(lambda: load_models(ckpt, dirs, embedding_model=None, name="tiny"),
                     ServeSettings(max_batch=8, response_cache_entries=0))  # fmt: skip
    with RunningServer(app) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        models = {m.id: m.model_dump().get("parent") for m in client.models.list().data}
        assert models == {"tiny": None, "sql": "tiny", "poem": "tiny"}
        got = [None] * len(routes)

        def ask(i):
            r = client.completions.create(model=routes[i], prompt=TEXTS[i], max_tokens=12, temperature=0)
            got[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(routes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        engine = app.state.server.engine
        assert engine.stats.max_batch_seen > 1
    assert got == expected
