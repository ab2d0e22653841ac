"""The other parameter-efficient methods (bottleneck adapters, prefix and prompt tuning), sequence classification
and domain adaptation with new tokens: each trains, saves and loads; prefix and prompt tuning match PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import VOCAB, make_hf_checkpoint
from lmforge.finetune import (
    PrefixConfig,
    PromptConfig,
    add_prefix_tuning,
    add_prompt_tuning,
    load_adapter,
    save_adapter,
    use_adapter,
)
from lmforge.finetune.run import finetune, load_finetune_config
from lmforge.generate import SamplingParams, generate
from lmforge.model import load_model
from lmforge.train.metrics import read_metrics

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for family in ("llama", "qwen2", "gpt2"):
        make_hf_checkpoint(root / family, family)
    return root


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    pairs = [
        ("Pack my box with", " five dozen"),
        ("The quick brown", " fox jumps"),
        ("def add(a, b):", " return"),
    ]
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs * 8))
    return path


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model.logits(model(ids))


def _run(base, data, out, method, *extra):
    cfg = load_finetune_config(None, [f"--model={base}", f"--data.path={data}", f"--method={method}", f"--out_dir={out}",
                                      "--train.max_steps=8", "--train.micro_batch_size=8", "--train.eval_every=0",
                                      "--train.save_every=0", "--train.progress=false", "--data.max_len=32", "--train.warmup_steps=1",
                                      "--data.val_fraction=0.15", "--eval.max_examples=3", "--eval.samples=1", *extra])  # fmt: skip
    return finetune(cfg)


@pytest.mark.parametrize("method, extra", [
    ("adapter", ["--adapter.bottleneck_size=8", "--train.lr=1e-2"]),
    ("prefix", ["--prefix.num_virtual_tokens=4", "--train.lr=5e-2"]),
    ("prefix", ["--prefix.num_virtual_tokens=4", "--prefix.prefix_projection=true", "--prefix.encoder_hidden_size=32",
                "--train.lr=1e-2"]),
    ("prompt", ["--prompt.num_virtual_tokens=4", "--train.lr=5e-2"]),
    ("dora", ["--lora.r=4", "--train.lr=1e-2", "--quantize.bits=8"]),
])  # fmt: skip
def test_each_method_trains_saves_and_loads(bases, qa_data, tmp_path, method, extra):
    result = _run(bases / "llama", qa_data, tmp_path / method, method, *extra)
    losses = [r["loss"] for r in read_metrics(tmp_path / method) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses
    assert 0 < result.metrics["trainable_fraction"] < 0.25
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == {"adapter": "BOTTLENECK", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
                                   "dora": "LORA"}[method]  # fmt: skip
    assert "trainable parameters" in result.report.read_text()

    # a fresh base plus the saved adapter: different from the base, the base again with the adapter off
    reloaded = load_model(bases / "llama", device="cpu")
    if method == "dora":
        from lmforge.finetune.quant import quantize_base

        quantize_base(reloaded, 8)
    base_logits = _logits(reloaded)
    load_adapter(reloaded, result.final_dir)
    assert not torch.allclose(_logits(reloaded), base_logits, atol=1e-4)
    with use_adapter(reloaded, None):
        torch.testing.assert_close(_logits(reloaded), base_logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_match_peft_both_ways(bases, tmp_path, family, kind):
    from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    def hf():
        return AutoModelForCausalLM.from_pretrained(bases / family).eval()

    ids = torch.randint(
        0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)
    )  # > qwen2's window of 8
    mask = torch.ones_like(ids)
    model = load_model(bases / family, device="cpu")
    (add_prompt_tuning if kind == "prompt" else add_prefix_tuning)(
        model, (PromptConfig if kind == "prompt" else PrefixConfig)(num_virtual_tokens=5)
    )
    save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(hf(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits[:, -12:], _logits(model, ids),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.manual_seed(0)
    config = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type=TaskType.CAUSAL_LM,
                                                                              num_virtual_tokens=3)  # fmt: skip
    get_peft_model(hf(), config).save_pretrained(tmp_path / "peft")
    theirs = PeftModel.from_pretrained(hf(), tmp_path / "peft").eval()
    ours = load_model(bases / family, device="cpu")
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, ids), theirs(input_ids=ids, attention_mask=mask).logits[:, -12:],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_work_with_the_kv_cache_and_left_padding(bases, kind):
    model = load_model(bases / "qwen2", device="cpu")  # sliding window 8 on later layers
    (add_prompt_tuning if kind == "prompt" else add_prefix_tuning)(
        model, (PromptConfig if kind == "prompt" else PrefixConfig)(num_virtual_tokens=3)
    )
    with torch.no_grad():
        for p in model.prefix.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    prompts = [[5, 9, 13, 2, 7], [11, 3]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    for prompt, result in zip(prompts, out):  # each row alone, without a cache, step by step
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(_logits(model, torch.tensor([ids]))[0, -1].argmax()))
        assert result.tokens == ids[len(prompt) :]


def test_sequence_classification_accuracy_f1_and_reload(bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmforge.finetune.classify import add_classification_head, f1_scores

    good, bad = ["quick", "café", "numbers", "fox"], ["lazy", "dozen", "liquor", "dog"]
    records = [{"text": f"The {a} {b} {c}", "label": name} for words, name in ((good, "positive"), (bad, "negative"))
               for a in words for b in words for c in words[:2]]  # fmt: skip
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _run(bases / "llama", tmp_path / "cls.jsonl", tmp_path / "cls", "lora", "--task=classification",
                  "--train.max_steps=40", "--train.lr=2e-2", "--lora.r=4", "--data.val_fraction=0.25")  # fmt: skip
    after, before = result.metrics["after"], result.metrics["before"]
    assert after["val_accuracy"] >= 0.9 and after["val_f1"] >= 0.9 and before["val_accuracy"] < 0.9
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    model = load_model(bases / "llama", device="cpu")
    add_classification_head(model, 2)
    load_adapter(model, result.final_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(bases / "llama", num_labels=2).eval()
    hf.config.pad_token_id = 0
    theirs = PeftModel.from_pretrained(hf, result.final_dir).eval()
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.score(model(ids)[:, -1])
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
    assert f1_scores([0, 1, 1, 0], [0, 1, 0, 0], 2)[0] == pytest.approx((0.8 + 2 / 3) / 2)


def test_domain_tokens_train_with_the_adapter_and_reload(bases, tmp_path):
    from lmforge.pretrained import load_pretrained

    records = [{"text": f"Patient has ICD10:E11.9 and ICD10:I10 code {i}"} for i in range(24)]
    (tmp_path / "domain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _run(bases / "llama", tmp_path / "domain.jsonl", tmp_path / "dom", "lora", "--tokens.add=[ICD10:E11.9, ICD10:I10]",
                  "--train.lr=1e-2", "--lora.r=4")  # fmt: skip
    assert result.metrics["new_tokens"] == 2
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    new_ids = config["trainable_token_indices"]["embed_tokens"]
    assert new_ids == [VOCAB, VOCAB + 1] and config["trainable_token_indices"]["lm_head"] == new_ids
    pre = load_pretrained(bases / "llama", device="cpu")
    load_adapter(pre.model, result.final_dir)  # grows the vocabulary from the adapter's tokenizer
    assert pre.model.config.vocab_size == VOCAB + 2
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(result.final_dir)  # the adapter folder carries the extended tokenizer
    assert tok.encode("ICD10:E11.9", add_special_tokens=False) == [VOCAB]
    rows = pre.model.embed_tokens.merged_weight()
    base_rows = load_model(bases / "llama", device="cpu").embed_tokens.weight
    assert torch.equal(rows[:VOCAB], base_rows)  # old tokens untouched
    ids = torch.tensor([tok.encode("Patient has ICD10:E11.9 and", add_special_tokens=False)])
    second = load_pretrained(bases / "llama", device="cpu").model
    load_adapter(second, result.final_dir)
    torch.testing.assert_close(_logits(pre.model, ids), _logits(second, ids))
    losses = [r["loss"] for r in read_metrics(tmp_path / "dom") if "loss" in r]
    assert losses[-1] < losses[0]
