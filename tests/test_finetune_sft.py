"""SFT data (TRL formats, masks, errors, packing) and the SFT objective in the shared trainer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_hf_checkpoint
from lmforge.finetune.sft import (
    DataError,
    SFTData,
    load_examples,
    pack_examples,
    packed_batch,
    pad_batch,
    read_records,
    split_validation,
)
from lmforge.pretrained import load_pretrained
from lmforge.train.objectives import IGNORE_INDEX, SFT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft") / "llama"
    make_hf_checkpoint(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def tok(base):
    return load_pretrained(base, device="cpu").tokenizer


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _trained_text(tok, example):
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_prompt_completion_trains_on_the_completion_and_eos(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "The quick brown", "completion": " fox jumps"}])
    (ex,), report = load_examples(path, tok, max_len=64)
    assert _trained_text(tok, ex) == " fox jumps<|im_end|>"
    assert ex.prompt_ids == tok.encode("The quick brown") and ex.reference == " fox jumps"
    assert ex.input_ids + [ex.labels[-1]] == tok.encode("The quick brown fox jumps") + [tok.eos_id]
    assert report.formats == {"prompt_completion": 1}
    (everything,), _ = load_examples(path, tok, max_len=64, completion_only=False)
    assert (
        _trained_text(tok, everything)
        == tok.decode(tok.encode("The quick brown fox jumps")[1:]) + "<|im_end|>"
    )


def test_chat_trains_on_assistant_turns_only(tok, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pack my box"},
                {"role": "assistant", "content": "with five dozen"}, {"role": "user", "content": "liquor?"},
                {"role": "assistant", "content": "jugs."}]  # fmt: skip
    path = _write(tmp_path / "chat.jsonl", [{"messages": messages},
                                            {"prompt": messages[:2], "completion": messages[2:3]}])  # fmt: skip
    (multi, conv), report = load_examples(path, tok, max_len=128)
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(multi.input_ids + [multi.labels[-1]]) == full
    assert _trained_text(tok, multi) == "with five dozen<|im_end|>\njugs.<|im_end|>\n"
    assert _trained_text(tok, conv) == "with five dozen<|im_end|>\n"
    assert multi.reference == "jugs." and tok.decode(multi.prompt_ids).endswith("<|im_start|>assistant\n")
    assert report.formats == {"chat": 1, "chat_prompt_completion": 1}


def test_text_records_train_everywhere_and_truncate(tok, tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}])
    (ex,), report = load_examples(path, tok, max_len=4)
    assert len(ex.input_ids) == 4 and all(t != IGNORE_INDEX for t in ex.labels) and report.truncated == 1


def test_malformed_records_are_reported_with_file_and_line(tok, tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"text": "fine"}, "", "{not json", {"prompt": "only a prompt"},
                                           {"messages": [{"role": "user"}]}, [1, 2], {"other": 1}])  # fmt: skip
    with pytest.raises(DataError) as info:
        load_examples(path, tok, max_len=32)
    message = str(info.value)
    assert "5 malformed record(s)" in message
    for line, what in [(3, "malformed JSON"), (4, "needs a 'completion'"), (5, "string 'content'"),
                       (6, "expected a JSON object"), (7, "'text', 'messages' or 'prompt'")]:  # fmt: skip
        assert f"{path}:{line}: " in message and what in message
    examples, report = load_examples(path, tok, max_len=32, on_error="skip")
    assert len(examples) == 1 and len(report.errors) == 5


def test_parquet_and_json_inputs(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet:row 2: "):
        load_examples(tmp_path / "d.parquet", tok, max_len=16)
    (tmp_path / "d.json").write_text(json.dumps(rows[:1]))
    assert [w for w, _ in read_records(tmp_path / "d.json")] == [f"{tmp_path / 'd.json'}:[0]"]
    assert len(load_examples(tmp_path / "d.json", tok, max_len=16)[0]) == 1


def test_packing_gives_the_same_loss_as_padding(base, tok, tmp_path):
    records = [
        {"prompt": f"Pack {i} my box", "completion": " with five dozen" + " jugs" * (i % 4)}
        for i in range(10)
    ]
    examples, _ = load_examples(_write(tmp_path / "p.jsonl", records), tok, max_len=40)
    rows = pack_examples(examples, 40)
    assert sorted(i for row in rows for i in row) == list(range(10)) and len(rows) < 10
    assert all(sum(len(examples[i]) for i in row) <= 40 for row in rows)
    model = load_pretrained(base, device="cpu").model
    packed = packed_batch([[examples[i] for i in row] for row in rows], 40, tok.pad_id)
    padded = pad_batch(examples, tok.pad_id)
    assert packed["attention_mask"].shape == (len(rows), 1, 40, 40) or packed["input_ids"].shape[1] <= 40
    with torch.no_grad():
        loss_packed, m1 = SFT()(model, packed)
        loss_padded, m2 = SFT()(model, padded)
    assert int(m1["n_tokens"]) == int(m2["n_tokens"])
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)


def test_loader_is_seeded_resumable_and_validation_is_held_out(tok, tmp_path):
    records = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(20)]
    examples, _ = load_examples(_write(tmp_path / "r.jsonl", records), tok, max_len=16)
    train, val = split_validation(examples, 0.2, seed=0)
    assert len(val) == 4 and not {id(e) for e in train} & {id(e) for e in val}
    data = SFTData(train, val, tok.pad_id, 16)
    a = data.loader(4, 0, 1, seed=3)
    first = [a.next()["input_ids"] for _ in range(6)]  # crosses an epoch (16 examples)
    b = data.loader(4, 0, 1, seed=3)
    b.next()
    b.next()
    c = data.loader(4, 0, 1, seed=3)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c.next()["input_ids"], first[2])
    assert sum(len(batch["input_ids"]) for batch in data.val_batches(3, 100)) == 4


# --------------------------------------------------------------------------------------------------
# through the trainer


def _cfg(base, data, out, method, *extra):
    from lmforge.finetune.run import load_finetune_config

    return load_finetune_config(None, [f"--model={base}", f"--data.path={data}", f"--method={method}", f"--out_dir={out}",
                                       "--train.max_steps=6", "--train.micro_batch_size=4", "--train.eval_every=3",
                                       "--train.save_every=3", "--train.progress=false", "--data.max_len=48",
                                       "--data.val_fraction=0.2", "--eval.max_examples=4", "--eval.samples=2", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatdata") / "chat.jsonl"
    words = ["fox", "dog", "box", "jugs", "café"]
    records = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
               for _ in range(6) for w in words]  # fmt: skip
    return _write(path, records)


def test_full_finetune_with_partial_freezing_learns_and_writes_a_checkpoint(base, chat_data, tmp_path):
    from lmforge.finetune.run import finetune
    from lmforge.model import load_model

    cfg = _cfg(base, chat_data, tmp_path / "run", "full", "--full.trainable=[layers.1, norm]", "--train.lr=3e-3",
               "--full.freeze=[layers.1.mlp.gate_proj]")  # fmt: skip
    result = finetune(cfg)
    losses = [r["loss"] for r in _records(tmp_path / "run") if "loss" in r]
    assert losses[-1] < losses[0]
    final = load_model(result.final_dir, device="cpu")
    start = load_model(base, device="cpu")
    changed = {k for k, v in final.state_dict().items() if not torch.equal(v, start.state_dict()[k])}
    assert changed and all(k.startswith("layers.1.") or k == "norm.weight" for k in changed)
    assert not any(k.startswith("layers.1.mlp.gate_proj") for k in changed)
    assert result.metrics["trainable_fraction"] < 0.5
    assert (result.final_dir / "tokenizer.json").is_file() and (tmp_path / "run" / "loss.png").is_file()
    evals = [r for r in _records(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and "val_exact_match" in evals[-1]
    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        "trainable parameters" in report
        and "val_exact_match" in report
        and "![loss curve](loss.png)" in report
    )


def _records(run):
    from lmforge.train.metrics import read_metrics

    return read_metrics(run)


def test_lora_run_checkpoints_only_trained_tensors_and_resumes(base, chat_data, tmp_path):
    from safetensors.torch import load_file

    from lmforge.finetune.run import finetune

    out = tmp_path / "run"
    first = finetune(
        _cfg(base, chat_data, out, "lora", "--lora.r=4", "--train.max_steps=3", "--train.lr=1e-2")
    )
    step = out / "step-00000003"
    assert (step / "trainable.safetensors").is_file() and not (step / "model.safetensors").is_file()
    saved = load_file(step / "trainable.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    second = finetune(
        _cfg(base, chat_data, out, "lora", "--lora.r=4", "--train.max_steps=6", "--train.lr=1e-2")
    )
    records = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert second.metrics["steps"] == 6 and first.metrics["steps"] == 3
    assert (second.final_dir / "adapter_config.json").is_file()
    assert (second.final_dir / "adapter_model.safetensors").is_file()


def test_cli_reports_malformed_data_and_missing_arguments(base, tmp_path):
    import argparse

    from lmforge.cli import CLIError
    from lmforge.finetune.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b"}, "{oops"])
    args = parser.parse_args(
        ["finetune", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(CLIError, match=rf"{bad}:2: malformed JSON"):
        args.func(args)
    args = parser.parse_args(["finetune", "--data", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(CLIError, match="--model"):
        args.func(args)
    args = parser.parse_args(["finetune", "--model", str(base), "--data", str(bad), "--lora.r=zero"])
    with pytest.raises(CLIError, match="lora.r: expected an integer"):
        args.func(args)
