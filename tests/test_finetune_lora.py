"""LoRA / DoRA: PEFT's initialisation and scaling, named adapters, merging, int8 base, and PEFT interop both ways.

Interop tests build a random transformers model, load it through `lmforge.model.load_model`, and compare
logits of the same adapter in lmforge and in `peft` on transformers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import VOCAB, make_hf_checkpoint
from lmforge.finetune import (
    LoraConfig,
    add_lora,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unmerge,
    use_adapter,
)
from lmforge.finetune.lora import LoraLinear
from lmforge.finetune.peft_io import AdapterError, apply_adapters
from lmforge.finetune.quant import Int8Linear, quantize_base
from lmforge.model import load_model

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for family in ("llama", "gpt2", "llama-mqa-tied-llama3"):
        make_hf_checkpoint(root / family, family)
    return root


def _hf(bases, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bases / family).eval()


def _randomise(model, std=0.1, seed=0):
    """Trained-looking adapters: B = 0 would make every comparison trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p + torch.randn(p.shape, generator=g) * std)


def _logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------
# the layer


def test_untrained_adapter_changes_nothing_and_init_is_peft(bases):
    model = load_model(bases / "llama", device="cpu")
    before = _logits(model, IDS)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(_logits(model, IDS), before)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and isinstance(q.base_layer, torch.nn.Linear)
    assert q.scaling["default"] == 2.0 and torch.count_nonzero(q.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(q.in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert q.lora_A["default"].weight.abs().max() <= bound and q.lora_A["default"].weight.std() > bound / 3
    assert not isinstance(model.layers[0].self_attn.k_proj, LoraLinear)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    trainable, total = trainable_parameters(model)
    assert (
        trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)) and total > 50 * trainable
    )  # q, v (2 kv heads)


def test_scaling_rslora_dropout_and_targets(bases):
    model = load_model(bases / "llama", device="cpu")
    add_lora(model, LoraConfig(r=16, lora_alpha=8, lora_dropout=0.5, use_rslora=True, target_modules="all-linear",
                               rank_pattern={"down_proj": 2}))  # fmt: skip
    q, down = model.layers[1].self_attn.q_proj, model.layers[1].mlp.down_proj
    assert q.scaling["default"] == pytest.approx(8 / 4)  # alpha / sqrt(r)
    assert down.lora_A["default"].weight.shape == (2, 96) and down.scaling["default"] == pytest.approx(
        8 / math.sqrt(2)
    )
    assert not isinstance(model.lm_head, LoraLinear)  # all-linear leaves the output head alone
    _randomise(model)
    model.eval()  # dropout is off in eval: two calls agree
    assert torch.equal(_logits(model, IDS), _logits(model, IDS))
    model.train()
    assert not torch.equal(_logits(model, IDS), _logits(model, IDS))
    other = load_model(bases / "llama", device="cpu")
    add_lora(other, LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    wrapped = [n for n, m in other.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped == ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_lora(load_model(bases / "llama", device="cpu"), LoraConfig(target_modules=["nope"]))


def test_named_adapters_switch_per_call(bases):
    model = load_model(bases / "llama", device="cpu")
    base = _logits(model, IDS)
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "math")
    _randomise(model, seed=1)
    add_lora(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"]), "style")
    _randomise(model, seed=2)
    with use_adapter(model, "math"):
        math_only = _logits(model, IDS)
    with use_adapter(model, "style"):
        style_only = _logits(model, IDS)
    with use_adapter(model, ["math", "style"]):
        both = _logits(model, IDS)
    with disable_adapters(model):
        assert torch.equal(_logits(model, IDS), base)
    assert torch.equal(_logits(model, IDS), style_only)  # the last one added is active after the blocks
    assert not torch.allclose(math_only, style_only) and not torch.allclose(both, math_only)
    set_adapter(model, "math")
    assert torch.equal(_logits(model, IDS), math_only)
    with pytest.raises(ValueError, match="unknown adapter"):
        set_adapter(model, "nope")
    delete_adapter(model, "math")
    set_adapter(model, [])
    assert torch.equal(_logits(model, IDS), base)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_restores_weights_and_merged_logits_match(bases, dora):
    model = load_model(bases / "llama-mqa-tied-llama3", device="cpu")
    add_lora(model, LoraConfig(r=4, target_modules="all-linear", use_dora=dora))
    _randomise(model)
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=dora), "second")
    _randomise(model, seed=3)
    set_adapter(model, ["default", "second"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_on = _logits(model, IDS)
    merge(model)
    merged = _logits(model, IDS)
    torch.testing.assert_close(merged, adapter_on, atol=1e-5, rtol=1e-5)
    assert not torch.equal(
        model.layers[0].self_attn.q_proj.base_layer.weight,
        weights["layers.0.self_attn.q_proj.base_layer.weight"],
    )
    unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # bit for bit
    torch.testing.assert_close(_logits(model, IDS), adapter_on, atol=0, rtol=0)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(
        load_model(bases / "llama-mqa-tied-llama3", device="cpu").state_dict()
    )
    torch.testing.assert_close(_logits(plain, IDS), adapter_on, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_starts_at_row_norms_and_trains(bases):
    model = load_model(bases / "llama", device="cpu")
    before = _logits(model, IDS)
    add_lora(model, LoraConfig(r=4, target_modules=["v_proj"], use_dora=True))
    v = model.layers[0].self_attn.v_proj
    torch.testing.assert_close(v.lora_magnitude_vector["default"].weight, v.base_layer.weight.norm(dim=1))
    torch.testing.assert_close(_logits(model, IDS), before, atol=1e-5, rtol=1e-5)
    model.train()
    model.logits(model(IDS)).logsumexp(-1).mean().backward()
    assert v.lora_magnitude_vector["default"].weight.grad.abs().sum() > 0


def test_int8_base_lora_trains_and_stays_close(bases):
    model = load_model(bases / "llama", device="cpu")
    reference = _logits(model, IDS)
    quantize_base(model, bits=8)
    assert (
        isinstance(model.layers[0].mlp.up_proj, Int8Linear)
        and model.layers[0].mlp.up_proj.qweight.dtype == torch.int8
    )
    quantized = _logits(model, IDS)
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()
    add_lora(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert isinstance(model.layers[0].mlp.up_proj.base_layer, Int8Linear)
    torch.testing.assert_close(_logits(model, IDS), quantized, atol=1e-4, rtol=1e-4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = IDS[:, 1:]
    losses = []
    for _ in range(15):
        logits = model.logits(model(IDS[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(b.grad is None for b in model.buffers())
    plain = merge_and_unload(model)  # dequantized, with the adapter folded in
    assert not any(isinstance(m, (Int8Linear, LoraLinear)) for m in plain.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NF4 needs bitsandbytes and a CUDA GPU")
def test_nf4_base_on_gpu(bases):  # pragma: no cover - GPU only
    pytest.importorskip("bitsandbytes")
    model = load_model(bases / "llama", device="cuda")
    quantize_base(model, bits=4)
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    out = model.logits(model(IDS.cuda()))
    assert torch.isfinite(out).all()


def test_nf4_without_gpu_is_a_clear_error(bases):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA|bitsandbytes"):
        quantize_base(load_model(bases / "llama", device="cpu"), bits=4)


# --------------------------------------------------------------------------------------------------
# PEFT interop


@pytest.mark.parametrize(
    "family, dora, rslora",
    [
        ("llama", False, False),
        ("llama", True, False),
        ("llama-mqa-tied-llama3", False, True),
        ("gpt2", False, False),
        ("gpt2", True, False),
    ],  # fmt: skip
)
def test_lmforge_adapter_gives_same_logits_in_peft(bases, tmp_path, family, dora, rslora):
    from peft import PeftModel

    model = load_model(bases / family, device="cpu")
    targets = "all-linear" if family != "gpt2" else ["q_proj", "v_proj", "o_proj", "down_proj"]
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, use_rslora=rslora))
    _randomise(model)
    ours = _logits(model, IDS)
    save_adapter(model, tmp_path / "adapter", base_model_path=str(bases / family))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] is dora
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    if family == "llama":
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    if family == "gpt2":
        assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight" in keys
    theirs = PeftModel.from_pretrained(_hf(bases, family), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, dora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_peft_adapter_gives_same_logits_in_lmforge(bases, tmp_path, family, dora):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"] if family != "gpt2" else ["c_attn", "c_proj", "c_fc"]
    torch.manual_seed(0)
    config = PeftLoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=dora, init_lora_weights=False,
                            rank_pattern={"down_proj": 2} if family != "gpt2" else {})  # fmt: skip
    theirs = get_peft_model(_hf(bases, family), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    model = load_model(bases / family, device="cpu")
    assert load_adapter(model, tmp_path / "peft", "task") == "task"
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, IDS), theirs(IDS).logits, atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path / "again", "task")  # and back again, through our writer
    back = load_model(bases / family, device="cpu")
    load_adapter(back, tmp_path / "again")
    torch.testing.assert_close(_logits(back, IDS), _logits(model, IDS), atol=1e-6, rtol=1e-6)


def test_modules_to_save_and_trainable_tokens_round_trip_through_peft(bases, tmp_path):
    from peft import PeftModel

    model = load_model(bases / "llama", device="cpu")
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                               trainable_token_indices=[3, 7, 11]))  # fmt: skip
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
        "lm_head.modules_to_save.default.weight", "embed_tokens.trainable_tokens_delta.default"}  # fmt: skip
    _randomise(model)
    ours = _logits(model, IDS)
    with disable_adapters(model):
        assert not torch.allclose(_logits(model, IDS), ours)
    save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(_hf(bases, "llama"), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours, atol=1e-5, rtol=1e-5)
    again = load_model(bases / "llama", device="cpu")
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(_logits(again, IDS), ours, atol=1e-6, rtol=1e-6)


def test_apply_adapters_names_and_refuses_pickles(bases, tmp_path):
    model = load_model(bases / "llama", device="cpu")
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), "one")
    _randomise(model)
    save_adapter(model, tmp_path / "one", "one")
    fresh = load_model(bases / "llama", device="cpu")
    names = apply_adapters(fresh, [str(tmp_path / "one"), f"b={tmp_path / 'one'}"])
    assert names == ["default", "b"]
    with use_adapter(fresh, "default"):
        torch.testing.assert_close(_logits(fresh, IDS), _logits(model, IDS))
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (bad / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(AdapterError, match="refuses to unpickle"):
        load_adapter(load_model(bases / "llama", device="cpu"), bad)
    with pytest.raises(AdapterError, match="not a folder"):
        apply_adapters(load_model(bases / "llama", device="cpu"), [f"x={tmp_path / 'missing'}"])
