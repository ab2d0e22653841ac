"""Parity against transformers, through lmforge's real loader and saver, for every supported family."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import FAMILIES, VOCAB, make_hf_checkpoint
from lmforge.config import Config
from lmforge.generate import SamplingParams, generate
from lmforge.model import CheckpointError, KVCache, load_model, save_model


def _ids(seed: int, shape) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
    folder, hf = checkpoints[family]
    model = load_model(folder, device="cpu")
    ids = _ids(1, (2, 40))  # 40 > sliding windows (8) and > the dynamic-rope context (16)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model.logits(model(ids))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(checkpoints, family):
    folder, hf = checkpoints[family]
    model = load_model(folder, device="cpu")
    for seed, length in ((2, 5), (3, 11)):
        prompt = _ids(seed, (1, length))
        # an explicit attention mask: otherwise transformers masks prompt tokens equal to pad_token_id
        expected = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, length:].tolist()
        got = generate(model, prompt.tolist(), SamplingParams(max_new_tokens=32, temperature=0))[0].tokens
        assert got == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_transformers(checkpoints, family, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, _ = checkpoints[family]
    save_model(load_model(folder, device="cpu"), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # a fresh reference: transformers' dynamic RoPE keeps state from earlier calls on the shared model
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is type(hf)
    ids = _ids(4, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_sharded_save_round_trip(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, hf = checkpoints["llama"]
    save_model(load_model(folder, device="cpu"), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    ids = _ids(5, (1, 16))
    ours = load_model(tmp_path, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=1e-4, rtol=0)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(theirs(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "qwen2"])
def test_kv_cache_decoding_equals_full_recomputation(checkpoints, family):
    folder, _ = checkpoints[family]
    model = load_model(folder, device="cpu")
    ids = _ids(6, (3, 30))
    with torch.no_grad():
        full = model.logits(model(ids))
        cache = KVCache.for_model(model, 3, 40)
        steps = [model.logits(model(ids[:, :12], kv_cache=cache))]
        steps += [model.logits(model(ids[:, t : t + 1], kv_cache=cache)) for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_forward_equals_unpadded(checkpoints):
    folder, _ = checkpoints["qwen2"]
    model = load_model(folder, device="cpu")
    short, long = _ids(7, (1, 9)), _ids(8, (1, 20))
    batch = torch.cat([torch.cat([torch.zeros(1, 11, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :11] = 0
    with torch.no_grad():
        padded = model.logits(model(batch, attention_mask=mask))
        torch.testing.assert_close(padded[0, 11:], model.logits(model(short))[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[1], model.logits(model(long))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_batched_generation_equals_one_by_one(checkpoints, family):
    folder, _ = checkpoints[family]
    model = load_model(folder, device="cpu")
    prompts = [_ids(s, (n,)).tolist() for s, n in ((9, 3), (10, 17), (11, 8), (12, 1))]
    for params in (
        SamplingParams(max_new_tokens=24, temperature=0),
        SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=7),
    ):
        batched = generate(model, prompts, params)
        for i, prompt in enumerate(prompts):
            alone_params = SamplingParams(
                **{**params.__dict__, "seed": None if params.seed is None else params.seed + i}
            )
            alone = generate(model, [prompt], alone_params)[0]
            assert batched[i].tokens == alone.tokens


def test_sampling_is_seeded_and_varies(checkpoints):
    folder, _ = checkpoints["llama"]
    model = load_model(folder, device="cpu")
    prompt = [_ids(13, (4,)).tolist()]
    p = dict(max_new_tokens=20, temperature=1.0)
    a = generate(model, prompt, SamplingParams(**p, seed=1))[0].tokens
    b = generate(model, prompt, SamplingParams(**p, seed=1))[0].tokens
    c = generate(model, prompt, SamplingParams(**p, seed=2))[0].tokens
    assert a == b and a != c


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "ckpt"
    make_hf_checkpoint(folder, "llama", with_tokenizer=False)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(folder, device="cpu")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(folder / "pytorch_model.bin", device="cpu")
    assert not marker.exists()


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 8}))
    with pytest.raises(ValueError, match="unsupported model_type 'falcon'.*gpt2, llama, mistral, qwen2"):
        load_model(tmp_path, device="cpu")


def test_mismatched_weights_name_the_tensor(checkpoints, tmp_path):
    folder, _ = checkpoints["llama"]
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    for f in ("model.safetensors",):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp.*shape"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_stays_close(checkpoints, dtype):
    folder, hf = checkpoints["llama"]
    model = load_model(folder, dtype=dtype, device="cpu")
    assert next(model.parameters()).dtype == dtype
    ids = _ids(14, (1, 16))
    with torch.no_grad():
        got = model.logits(model(ids)).float()
        expected = hf(ids).logits
    assert (got - expected).abs().max() < 0.05
    tokens = generate(model, ids.tolist(), SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
    assert len(tokens) == 8


def test_prompt_and_generated_logprobs_match_transformers(checkpoints):
    folder, hf = checkpoints["llama"]
    model = load_model(folder, device="cpu")
    prompt = _ids(15, (12,)).tolist()
    out = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                                    prompt_logprobs=True))[0]  # fmt: skip
    full = torch.tensor([prompt + out.tokens])
    with torch.no_grad():
        ref = torch.log_softmax(hf(full).logits[0, :-1].float(), -1)
    expected = ref.gather(-1, full[0, 1:, None])[:, 0]
    assert out.prompt_logprobs[0] is None
    torch.testing.assert_close(
        torch.tensor(out.prompt_logprobs[1:]), expected[: len(prompt) - 1], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(torch.tensor(out.logprobs), expected[len(prompt) - 1 :], atol=1e-4, rtol=0)
    for step, alternatives in enumerate(out.top_logprobs):
        assert len(alternatives) == 3
        assert out.tokens[step] == max(alternatives, key=alternatives.get)  # greedy picks the top one


def test_config_presets_and_hf_round_trip():
    for name in ("gpt2", "gpt2-medium", "llama-3.2-1b", "smollm2-135m", "qwen2.5-0.5b", "mistral-7b"):
        c = Config.from_name(name)
        back = Config.from_hf(c.to_hf())
        for field in ("model_type", "n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "intermediate_size",
                      "vocab_size", "rope_theta", "rope_scaling", "sliding_window", "tie_embeddings", "qkv_bias"):  # fmt: skip
            assert getattr(back, field) == getattr(c, field), (name, field)
    assert Config.from_name("llama-3.2-1b", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match="unknown preset"):
        Config.from_name("llama-9")


def test_preset_parameter_counts():
    from lmforge.model import Transformer

    expected = {"gpt2": 124_439_808, "smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768,
                "llama-3.2-1b": 1_235_814_400, "mistral-7b": 7_241_732_096}  # fmt: skip
    for name, count in expected.items():
        with torch.device("meta"):
            assert Transformer(Config.from_name(name)).num_parameters() == count, name


# gpt2: a tied head and Conv1D weights transposed on load
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_column_major_wide_weights_change_only_strides(checkpoints, family, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.model.compile import wide_weights_column_major

    folder, hf = checkpoints[family]
    model = load_model(folder, device="cpu")
    ids = _ids(6, (2, 12))
    with torch.no_grad():
        before = model.logits(model(ids))
    wide = [m for m in model.modules() if type(m) is torch.nn.Linear and m.out_features > m.in_features]
    narrow = [m for m in model.modules() if type(m) is torch.nn.Linear and m.out_features <= m.in_features]
    assert wide and narrow and wide_weights_column_major(model) == len(wide)
    assert all(m.weight.stride() == (1, m.out_features) for m in wide)
    assert all(m.weight.is_contiguous() for m in narrow)
    assert wide_weights_column_major(model) == 0  # already laid out
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids)), before, atol=1e-5, rtol=0)
    save_model(model, tmp_path / "out")  # safetensors gets contiguous tensors; transformers reads them
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits
        torch.testing.assert_close(theirs, hf(ids).logits, atol=1e-5, rtol=0)
    # the model still trains: backward and a fused AdamW step over the re-laid-out parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.logits(model(ids)).logsumexp(-1).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# llama: no projection biases; qwen2: q, k and v biases; gpt2: q, k and v split from one Conv1D on load
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fused_qkv_keeps_dense_parameters_and_the_logits(checkpoints, family, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.model.compile import fuse_qkv

    folder, hf = checkpoints[family]
    model, plain = load_model(folder, device="cpu"), load_model(folder, device="cpu")
    ids = _ids(7, (2, 12))
    with torch.no_grad():
        before = model.logits(model(ids))
    params = list(model.parameters())
    blocks = fuse_qkv(model)
    assert len(blocks) == model.config.n_layer and list(model.parameters()) == params  # same Parameters
    for layer, (weight, bias) in zip(model.layers, blocks):
        assert (bias is not None) == (family != "llama")
        start = 0
        for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert p.weight.is_contiguous() and p.weight.data_ptr() == weight[start].data_ptr()
            start += p.out_features
    again = fuse_qkv(model)  # a layout that holds is not copied again
    assert all(a[0].data_ptr() == b[0].data_ptr() for a, b in zip(again, blocks))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids)), before, atol=0, rtol=0)  # unfused path
        torch.testing.assert_close(model.logits(model(ids, qkv=again)), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="inference"):
        model(ids, qkv=again)  # gradients on: the stacked weights would bypass the projections
    # a weight replaced since (what model.to() does) is laid out again, not read from the old block
    attn = model.layers[0].self_attn
    attn.k_proj.weight.data = attn.k_proj.weight.data.clone() * 2
    relaid = fuse_qkv(model)
    assert (
        relaid[0][0].data_ptr() != blocks[0][0].data_ptr()
        and relaid[1][0].data_ptr() == blocks[1][0].data_ptr()
    )
    assert attn.k_proj.weight.data_ptr() == relaid[0][0][attn.q_proj.out_features].data_ptr()
    attn.k_proj.weight.data /= 2
    save_model(model, tmp_path / "out")  # the row blocks are saved as themselves
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits
        torch.testing.assert_close(theirs, hf(ids).logits, atol=1e-5, rtol=0)
    # training sees ordinary parameters: a fused AdamW step matches the one on an unfused copy exactly
    for m in (model, plain):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        m.logits(m(ids)).logsumexp(-1).mean().backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    # a projection that is no plain nn.Linear (an adapter's wrapper) is never fused
    attn.v_proj = torch.nn.Sequential(attn.v_proj)
    blocks = fuse_qkv(model)
    assert blocks[0] is None and blocks[1] is not None


def test_empty_input_keeps_its_shape(checkpoints):
    model = load_model(checkpoints["llama"][0], device="cpu")
    with torch.no_grad():
        for shape in ((0, 4), (2, 0)):
            assert model(torch.zeros(shape, dtype=torch.long)).shape == (*shape, model.config.n_embd)


@pytest.mark.slow
def test_compiled_decode_equals_eager(checkpoints):
    folder, _ = checkpoints["qwen2"]
    model = load_model(folder, device="cpu")
    prompts = [_ids(16, (n,)).tolist() for n in (4, 9)]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    eager = generate(model, prompts, params)
    compiled = generate(model, prompts, params, compile=True)
    assert [g.tokens for g in compiled] == [g.tokens for g in eager]
    # a second model of the same shapes reuses the compiled graph and decodes with its own weights
    other = load_model(folder, device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    eager = generate(other, prompts, params)
    assert [g.tokens for g in eager] != [g.tokens for g in compiled]  # else the check below proves nothing
    assert [g.tokens for g in generate(other, prompts, params, compile=True)] == [g.tokens for g in eager]
    assert [g.tokens for g in generate(model, prompts, params, compile=True)] == [g.tokens for g in compiled]
