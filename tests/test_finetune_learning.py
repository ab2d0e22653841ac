"""Must show: instruction tuning teaches a tiny model a task it cannot do before, on held-out prompts.

The base is pretrained here with the shared trainer on documents like "zoo: cat dog owl | owl dog cat" (each
list reversed after "|"), so it has the skill but not the instruction format: asked "reverse: cat dog owl ->",
it answers nothing useful (0% exact match). LoRA (13% of this tiny model's weights train) and full fine-tuning on 3,000
instruction examples both reach >= 90% exact match on 100 lists that never occur in the training data.
The LoRA run goes through the command line (`lmforge finetune`, `lmforge merge`) and its adapter is then
loaded the way `--adapter` does it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from lmforge.finetune.cli import register
from lmforge.generate import SamplingParams, generate

WORDS = "cat dog fox owl bee ant cow pig hen elk yak emu".split()
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")


def _lists(rng, n):
    return [tuple(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def _record(words):
    return {"prompt": "reverse: " + " ".join(words) + " ->", "completion": " " + " ".join(reversed(words))}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from lmforge.model import load_model
    from lmforge.pretrained import save_pretrained
    from lmforge.tokenizer_train import train_tokenizer
    from lmforge.train import train, write_token_shards

    root = tmp_path_factory.mktemp("reverse")
    rng = random.Random(0)
    tags = ["zoo", "farm", "list", "pets", "wild", "park"]
    docs = [f"{rng.choice(tags)}: {' '.join(w)} | {' '.join(reversed(w))}" for w in _lists(rng, 3000)]
    tokenizer = train_tokenizer(docs + ["reverse: " + d + " ->" for d in docs[:50]], kind="bpe", vocab_size=300,
                                chat_template=None)  # fmt: skip
    ids = [tokenizer.encode(d, add_special_tokens=False) for d in docs]
    write_token_shards(
        ids, root / "shards", "train", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id
    )
    pretrain = train({
        "model": {"preset": "tiny-llama", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2,
                  "intermediate_size": 128, "max_seq_len": 64, "vocab_size": tokenizer.vocab_size,
                  "eos_token_id": tokenizer.eos_id},
        "data": {"path": str(root / "shards"), "seq_len": 32, "mask_documents": True},
        "train": {"max_steps": 600, "micro_batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
                  "weight_decay": 0.0, "eval_every": 0, "save_every": 0, "progress": False},
    }, out_dir=root / "pretrain")  # fmt: skip
    save_pretrained(load_model(pretrain.checkpoint, device="cpu"), root / "base", tokenizer)

    held_out = sorted(set(_lists(random.Random(1), 100)))
    train_lists = [w for w in _lists(random.Random(2), 3300) if w not in set(held_out)][:3000]
    (root / "train.jsonl").write_text("".join(json.dumps(_record(w)) + "\n" for w in train_lists))
    (root / "val.jsonl").write_text("".join(json.dumps(_record(w)) + "\n" for w in held_out))
    return root, held_out


def _exact_match(model, tokenizer, lists) -> float:
    prompts = [tokenizer.encode(_record(w)["prompt"]) for w in lists]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0), tokenizer)
    return sum(o.text.strip() == " ".join(reversed(w)) for o, w in zip(outs, lists)) / len(lists)


def _cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


COMMON = ["--train.micro_batch_size=32", "--train.eval_every=0", "--train.save_every=0", "--train.progress=false",
          "--train.warmup_steps=10", "--train.grad_accum_steps=1", "--data.max_len=32", "--eval.max_examples=100"]  # fmt: skip


def test_lora_learns_the_held_out_task_through_the_cli(task, tmp_path):
    from lmforge.finetune.peft_io import apply_adapters
    from lmforge.pretrained import load_pretrained

    root, held_out = task
    out = tmp_path / "lora"
    assert _cli("finetune", "--config", str(RECIPES / "lora.yaml"), "--model", str(root / "base"),
                "--data", str(root / "train.jsonl"), "--method", "lora", "--out", str(out),
                f"--data.val_path={root / 'val.jsonl'}", "--lora.r=8", "--lora.lora_alpha=16", "--lora.lora_dropout=0",
                "--lora.target_modules=all-linear", "--train.max_steps=300", "--train.lr=5e-3", "--train.min_lr=5e-4",
                *COMMON) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["val_exact_match"] <= 0.05  # the base cannot follow the instruction
    assert report["after"]["val_exact_match"] >= 0.9
    assert report["trainable_fraction"] < 0.15
    assert "trainable parameters" in (out / "report.md").read_text() and (out / "loss.png").is_file()

    pre = load_pretrained(root / "base", device="cpu")  # what `--adapter DIR` does for generate / chat
    assert _exact_match(pre.model, pre.tokenizer, held_out) <= 0.05
    assert apply_adapters(pre.model, [f"reverse={out / 'final'}"]) == ["reverse"]
    assert _exact_match(pre.model, pre.tokenizer, held_out) >= 0.9

    assert (
        _cli(
            "merge",
            "--model",
            str(root / "base"),
            "--adapter",
            str(out / "final"),
            "--out",
            str(tmp_path / "merged"),
        )
        == 0
    )
    merged = load_pretrained(tmp_path / "merged", device="cpu")
    assert _exact_match(merged.model, merged.tokenizer, held_out) >= 0.9


def test_full_finetuning_learns_the_held_out_task(task, tmp_path):
    from lmforge.finetune.run import finetune, load_finetune_config
    from lmforge.pretrained import load_pretrained

    root, held_out = task
    cfg = load_finetune_config(RECIPES / "sft.yaml", [f"--model={root / 'base'}", f"--data.path={root / 'train.jsonl'}",
                                                      f"--data.val_path={root / 'val.jsonl'}", "--train.max_steps=300",
                                                      "--train.lr=3e-3", "--train.min_lr=3e-4", *COMMON])  # fmt: skip
    result = finetune(cfg, tmp_path / "full")
    assert result.metrics["before"]["val_exact_match"] <= 0.05
    assert result.metrics["after"]["val_exact_match"] >= 0.9
    assert result.metrics["trainable_fraction"] == 1.0
    tuned = load_pretrained(result.final_dir, device="cpu")  # a plain Hugging Face checkpoint
    assert _exact_match(tuned.model, tuned.tokenizer, held_out) >= 0.9
