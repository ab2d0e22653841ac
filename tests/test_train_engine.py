"""The training engine in one process: shards, objectives, schedule, weight decay groups, config, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.model import Transformer, load_model
from lmforge.train import load_config, train, write_token_shards
from lmforge.train.config import ConfigError, config_from_dict
from lmforge.train.cross_entropy import linear_cross_entropy, plain_linear_head
from lmforge.train.dataset import (
    TokenWindows,
    TrainBatches,
    document_mask,
    open_split,
    read_meta,
    val_batches,
)
from lmforge.train.metrics import read_metrics
from lmforge.train.objectives import CausalLM, chunked_cross_entropy
from lmforge.train.optim import flops_per_token, lr_at, matmul_parameters, param_group_names

TINY_MODEL = {
    "preset": "tiny-llama",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 4,
    "n_kv_head": 2,
    "intermediate_size": 64,
}


def tiny_config(out_dir, data: dict, **train) -> dict:
    return {
        "model": dict(TINY_MODEL),
        "data": {"seq_len": 32, **data},
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
                  "eval_every": 0, "eval_sequences": 8, "save_every": 0, "progress": False, **train},
        "out_dir": str(out_dir),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# shards


def test_write_token_shards_appends_eos_and_reads_back(tmp_path):
    docs = [[5, 6, 7], [], [8, 9]]
    n = write_token_shards(docs, tmp_path, "train", vocab_size=100, eos_id=1)
    assert n == 3 + 1 + 0 + 1 + 2 + 1
    meta = read_meta(tmp_path)
    assert meta == {"dtype": "uint16", "vocab_size": 100, "eos_id": 1, "n_tokens": {"train": 8}}
    assert open_split(tmp_path, "train").tolist() == [5, 6, 7, 1, 1, 8, 9, 1]
    assert (tmp_path / "train.bin").read_bytes() == np.array([5, 6, 7, 1, 1, 8, 9, 1], "<u2").tobytes()
    write_token_shards(iter([np.array([2, 3])]), tmp_path, "val")  # vocab and eos from meta.json
    assert read_meta(tmp_path)["n_tokens"] == {"train": 8, "val": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]  # no temporaries

    big = tmp_path / "big"
    write_token_shards([[70000, 3]], big, "train", vocab_size=100_000, eos_id=99_999)
    assert read_meta(big)["dtype"] == "uint32"
    assert open_split(big, "train").tolist() == [70000, 3, 99_999]


def test_write_token_shards_rejects_bad_ids_and_keeps_old_file(tmp_path):
    write_token_shards([[1, 2]], tmp_path, "train", vocab_size=10, eos_id=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_token_shards([[1], [3, 10]], tmp_path, "train", vocab_size=10, eos_id=0)
    assert open_split(tmp_path, "train").tolist() == [1, 2, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin"]
    with pytest.raises(ValueError, match="vocab_size"):
        write_token_shards([[1]], tmp_path, "val", vocab_size=20, eos_id=0)


def test_batches_are_rank_disjoint_resumable_and_match_one_process():
    windows = TokenWindows(np.arange(1000), seq_len=7, seed=3)
    one = TrainBatches(windows, micro_batch_size=4)
    ranks = [TrainBatches(windows, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(60):  # several epochs of 142 windows
        a = one.next()
        b0, b1 = (r.next() for r in ranks)
        assert np.array_equal(a, np.concatenate([b0, b1]))  # the same global batch, split across ranks
        assert not {tuple(w) for w in b0} & {tuple(w) for w in b1}
    assert a.shape == (4, 8) and np.array_equal(a[:, 1:] - a[:, :-1], np.ones((4, 7)))
    state = one.state_dict()
    expected = [one.next() for _ in range(3)]
    again = TrainBatches(TokenWindows(np.arange(1000), seq_len=7, seed=3), micro_batch_size=4)
    again.load_state_dict(state)
    assert all(np.array_equal(e, again.next()) for e in expected)


def test_validation_windows_are_fixed_and_independent_of_world_size():
    windows = TokenWindows(np.arange(500), seq_len=9)
    single = np.concatenate(list(val_batches(windows, 4, 10)))
    split = [np.concatenate(list(val_batches(windows, 4, 10, rank=r, world_size=2))) for r in range(2)]
    assert single[:, 0].tolist() == [9 * i for i in range(10)]
    assert sorted(np.concatenate(split)[:, 0].tolist()) == single[:, 0].tolist()
    assert len(list(val_batches(windows, 4, 10, 0, 2))) == len(list(val_batches(windows, 4, 10, 1, 2)))


def test_document_mask_restarts_positions_after_eos():
    ids = torch.tensor([[4, 5, 0, 6, 7, 0, 8]])
    positions, mask = document_mask(ids, eos_id=0)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    assert mask.shape == (1, 1, 7, 7)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False]
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False, False, False]


# --------------------------------------------------------------------------------------------------
# objective


def test_chunked_cross_entropy_matches_full_logits_and_gradients():
    torch.manual_seed(0)
    model = Transformer(Config.from_name("tiny-llama", n_layer=1, vocab_size=64))
    model.init_weights(seed=0)
    ids = torch.randint(0, 64, (2, 11))
    labels = torch.randint(0, 64, (2, 11))
    labels[0, :3] = -100
    batch = {"input_ids": ids, "labels": labels}

    full_loss = torch.nn.functional.cross_entropy(model.logits(model(ids)).flatten(0, 1), labels.flatten())
    full_loss.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, metrics = CausalLM(chunk_size=4)(model, batch)
    loss.backward()
    assert metrics["n_tokens"].item() == 19
    torch.testing.assert_close(loss, full_loss)
    for p, g in zip(model.parameters(), full_grads):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():
        total, n = chunked_cross_entropy(model.logits, model(ids), labels, chunk_size=3)
    torch.testing.assert_close(total / n, full_loss)


def test_linear_cross_entropy_matches_autograd_for_loss_and_every_gradient():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[1, 2:5] = -100
    upstream = 0.37  # the trainer divides the sum by the token count
    ref = F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, 1), labels.flatten(), reduction="sum")
    (ref * upstream).backward()
    expected = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    loss = linear_cross_entropy(hidden, weight, bias, labels, chunk_size=4)  # 21 rows: 6 chunks, last short
    (loss * upstream).backward()
    torch.testing.assert_close(loss, ref)
    for t, e in zip((hidden, weight, bias), expected):
        torch.testing.assert_close(t.grad, e)
    with pytest.raises(RuntimeError, match="once"):
        _second_backward(hidden, weight, bias, labels)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, None, labels, 5),
                                   F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), labels.flatten(),
                                                   reduction="sum"))  # fmt: skip


def _second_backward(hidden, weight, bias, labels):
    loss = linear_cross_entropy(hidden, weight, bias, labels, chunk_size=8)
    loss.backward(retain_graph=True)
    loss.backward()


def test_linear_cross_entropy_in_bfloat16_stays_close_to_float32():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=g)
    weight = torch.randn(100, 32, generator=g) * 0.2
    labels = torch.randint(0, 100, (64,), generator=g)
    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = linear_cross_entropy(h16, w16, None, labels, chunk_size=16)
    loss.backward()
    h32, w32 = hidden.requires_grad_(), weight.requires_grad_()
    ref = F.cross_entropy(F.linear(h32, w32), labels, reduction="sum")
    ref.backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=5e-2, atol=5e-2)


def test_a_wrapped_head_takes_the_checkpointed_chunks_and_matches_the_full_loss():
    torch.manual_seed(0)
    model = Transformer(Config.from_name("tiny-llama", n_layer=1, vocab_size=64))
    model.init_weights(seed=0)
    assert plain_linear_head(model.logits) is model.lm_head

    def head(h):  # not a plain linear head: the fallback path
        return model.logits(h) * 1.5

    assert plain_linear_head(head) is None
    ids, labels = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    hidden = model(ids)
    total, n = chunked_cross_entropy(head, hidden, labels, chunk_size=4)
    full = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(total, full)
    assert n.item() == 18


# --------------------------------------------------------------------------------------------------
# optimiser, schedule, FLOPs


def test_warmup_then_cosine_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0  # decay starts from the peak
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: (1 + cos(pi/2)) / 2
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == 0.1
    lrs = [lr_at(s, **kw) for s in range(4, 15)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10) == 1.0


def test_no_weight_decay_on_norms_biases_embeddings():
    gpt2 = Transformer(Config.from_name("tiny-gpt2", n_layer=1))
    decay, no_decay = param_group_names(gpt2, 0.1)
    assert "embed_tokens.weight" in no_decay and "embed_positions.weight" in no_decay
    assert "layers.0.input_layernorm.weight" in no_decay and "layers.0.input_layernorm.bias" in no_decay
    assert "layers.0.self_attn.q_proj.bias" in no_decay and "norm.bias" in no_decay
    assert set(decay) == {f"layers.0.{m}.weight" for m in
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.up_proj", "mlp.down_proj")}  # fmt: skip

    llama = Transformer(Config.from_name("tiny-llama", n_layer=1))
    llama.layers[0].mlp.up_proj.weight.requires_grad_(False)  # frozen: the optimiser never sees it
    decay, no_decay = param_group_names(llama, 0.1)
    assert "lm_head.weight" in decay  # an untied head is a matrix like any other
    assert "layers.0.mlp.up_proj.weight" not in decay + no_decay
    assert set(no_decay) == {"embed_tokens.weight", "layers.0.input_layernorm.weight",
                             "layers.0.post_attention_layernorm.weight", "norm.weight"}  # fmt: skip


def test_flops_per_token_follows_palm():
    c = Config.from_name("tiny-llama", n_layer=2)
    model = Transformer(c)
    n = matmul_parameters(model)
    assert n == model.num_parameters() - c.vocab_size * c.n_embd  # the untied embedding is a lookup
    assert flops_per_token(n, c.n_layer, c.n_head, c.head_dim, 128) == 6 * n + 12 * 2 * 4 * 16 * 128
    tied = Transformer(Config.from_name("tiny-qwen2"))
    assert matmul_parameters(tied) == tied.num_parameters()  # the tied table is the head's matmul


# --------------------------------------------------------------------------------------------------
# config


def test_yaml_config_with_dotted_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {preset: tiny-llama, n_layer: 3}\ndata: {synthetic: true}\ntrain: {lr: 1.0e-3}\n")
    cfg = load_config(path, ["--train.max_steps=40", "--train.lr=3e-4", "--model.n_embd", "48",
                             "--train.grad_clip=null", "--data.path=/x", "--objective.chunk_size=16"])  # fmt: skip
    assert cfg.train.max_steps == 40 and cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip is None and cfg.data.path == "/x"
    assert cfg.model.config == {"n_layer": 3, "n_embd": 48}
    assert cfg.objective.options == {"chunk_size": 16}
    assert config_from_dict(cfg.to_dict()) == cfg  # the YAML layout round-trips
    with pytest.raises(ConfigError, match="train.max_step"):
        load_config(path, ["--train.max_step=4"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["--train.max_steps=many"])
    with pytest.raises(ConfigError, match="model.n_layers"):
        load_config(path, {"model.n_layers": 2})
    with pytest.raises(ConfigError, match="data.path"):
        config_from_dict({"data": {"synthetic": False}})


def test_tiny_recipe_loads():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    cfg = load_config(recipe, ["--data.path=out/shards"])
    assert cfg.model.preset == "tiny-llama" and cfg.data.path == "out/shards"
    assert cfg.objective.name == "causal_lm" and cfg.objective.options["chunk_size"] == 128


# --------------------------------------------------------------------------------------------------
# the loop


def test_engine_learns_repetitive_corpus_and_writes_run_folder(tmp_path):
    rng = np.random.default_rng(0)
    phrases = [rng.integers(2, 64, size=8) for _ in range(4)]
    docs = [np.concatenate([phrases[k] for k in rng.integers(0, 4, size=12)]) for _ in range(60)]
    shards = tmp_path / "tokens"
    write_token_shards(docs[:50], shards, "train", vocab_size=64, eos_id=1)
    write_token_shards(docs[50:], shards, "val", vocab_size=64, eos_id=1)
    cfg = tiny_config(tmp_path / "run", {"path": str(shards)}, max_steps=40, eval_every=20, save_every=20)

    result = train(cfg)

    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(64), rel=0.05)  # a fresh model is near uniform
    assert losses[-1] < 0.5 * losses[0]
    assert result.val_loss < 0.5 * losses[0]

    run = tmp_path / "run"
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu"):
        assert key in steps[-1]
    assert steps[-1]["tokens_seen"] == 40 * 4 * 32 and steps[-1]["mfu"] is None  # no known peak on CPU
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000020", "step-00000040"]
    final = run / "step-00000040"
    assert {"COMPLETE", "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
            "rng-rank00000.safetensors"} <= {p.name for p in final.iterdir()}  # fmt: skip
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["data"]["position"] == 40 * 4
    model = load_model(final, device="cpu")  # a Hugging Face checkpoint folder
    assert model.config.vocab_size == 64 and model.config.n_layer == 2

    again = train(cfg)  # rerunning a finished run resumes at the end and does nothing
    assert again.step == 40 and again.resumed_from == final


def test_frozen_parameters_stay_put_and_optimizer_skips_them(tmp_path):
    cfg = config_from_dict(
        tiny_config(tmp_path / "run", {"synthetic": True, "synthetic_tokens": 5000}, max_steps=3)
    )
    model = Transformer(Config.from_name("tiny-llama", n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                         intermediate_size=64))  # fmt: skip
    model.init_weights(seed=0)
    model.embed_tokens.weight.requires_grad_(False)
    before = model.embed_tokens.weight.detach().clone()
    train(cfg, model=model)
    saved = load_model(tmp_path / "run" / "step-00000003", device="cpu")
    assert torch.equal(saved.embed_tokens.weight, before)
    assert not torch.equal(
        saved.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight * 0 + 0
    )


@pytest.mark.slow  # torch.compile takes ~30 s on CPU
def test_compiled_training_follows_eager_and_saves_the_same_names(tmp_path):
    data = {"synthetic": True, "synthetic_tokens": 5000}
    eager = train(tiny_config(tmp_path / "eager", data, max_steps=6, eval_every=6, save_every=6))
    compiled = train(tiny_config(tmp_path / "compiled", data, max_steps=6, eval_every=6, save_every=6,
                                 compile=True))  # fmt: skip
    losses = [[r["loss"] for r in res.metrics if "loss" in r] for res in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-4)
    a = load_model(tmp_path / "eager" / "step-00000006", device="cpu").state_dict()
    b = load_model(tmp_path / "compiled" / "step-00000006", device="cpu").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)


def test_swiglu_keeps_two_tensors_for_backward_and_has_exact_gradients():
    from lmforge.model.mlp import _SiluGate

    g = torch.Generator().manual_seed(0)
    gate = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_SiluGate.apply, (gate, up))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _SiluGate.apply(gate, up)
    assert len(saved) == 2  # autograd's silu(gate) * up keeps three
    out.sum().backward()
    expected = torch.autograd.grad((F.silu(gate) * up).sum(), (gate, up))
    torch.testing.assert_close((gate.grad, up.grad), expected)


def test_fused_adamw_follows_weights_re_laid_out_mid_training(tmp_path):
    """A compiled generation inside eval_fn stores wide weights column-major (model/compile.py) after
    AdamW created its state row-major; torch's fused AdamW needs both laid out alike, so the trainer
    re-aligns the state. Training must follow a run without the re-layout (up to matmul rounding)."""
    from lmforge.model.compile import wide_weights_column_major

    data = {"synthetic": True, "synthetic_tokens": 4_000}
    kwargs = dict(max_steps=6, eval_every=2)
    plain = train(tiny_config(tmp_path / "plain", data, **kwargs), eval_fn=lambda m: {})
    relaid = train(tiny_config(tmp_path / "relaid", data, **kwargs),
                   eval_fn=lambda m: {"moved": float(wide_weights_column_major(m))})  # fmt: skip
    assert [r["moved"] for r in relaid.metrics if "moved" in r][0] > 0  # the first evaluation moved weights
    a = load_model(plain.checkpoint, device="cpu").state_dict()
    b = load_model(relaid.checkpoint, device="cpu").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=0, msg=name)


def test_resume_into_column_major_weights_follows_the_uninterrupted_run(tmp_path):
    """Resuming with a model whose wide weights are column-major (it ran a compiled generation) loads
    the contiguous AdamW state of the checkpoint; the trainer lays it out like the parameters."""
    from lmforge.model.compile import wide_weights_column_major

    data = {"synthetic": True, "synthetic_tokens": 4_000}
    kwargs = dict(lr_decay_steps=6, save_every=3)
    whole = train(tiny_config(tmp_path / "whole", data, max_steps=6, **kwargs))
    first = train(tiny_config(tmp_path / "parts", data, max_steps=3, **kwargs))
    model = load_model(first.checkpoint, device="cpu")
    assert wide_weights_column_major(model) > 0
    rest = train(tiny_config(tmp_path / "parts", data, max_steps=6, **kwargs), model=model)
    assert rest.resumed_from is not None and rest.step == 6
    a = load_model(whole.checkpoint, device="cpu").state_dict()
    b = load_model(rest.checkpoint, device="cpu").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=0, msg=name)
