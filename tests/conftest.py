"""Shared fixtures: tiny random Hugging Face checkpoints made on the spot (no network), with a tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning: on a 2-core machine shared with other processes,
# spinning workers made tiny-model steps tens of times slower. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 384


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: two threads gain little on tiny matmuls and lose
    a lot when other processes share the 2 cores. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "naïve café déjà vu, 日本語のテキスト, emoji 🤖🎉 and numbers 12345 67890. "
    "def add(a, b):\n    return a + b\n\n"
)


def write_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer trained on a few lines, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
            }
        )
    )


def hf_config(family: str):
    """Small transformers configs covering every supported family and attention/rope variant."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)  # fmt: skip
    if family == "llama":  # GQA
        return LlamaConfig(**common, num_key_value_heads=2)
    if family == "llama-mqa-tied-llama3":  # MQA, tied head, Llama 3.1 rope scaling
        return LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})  # fmt: skip
    if family == "llama-linear-bias":  # Llama 2 style linear rope scaling, attention and MLP biases
        return LlamaConfig(**common, rope_scaling={"rope_type": "linear", "factor": 2.0},
                           attention_bias=True, mlp_bias=True)  # fmt: skip
    if family == "llama-dynamic":  # dynamic NTK scaling, exercised past max_position_embeddings
        return LlamaConfig(
            **dict(common, max_position_embeddings=16), rope_scaling={"rope_type": "dynamic", "factor": 2.0}
        )
    if family == "smollm":  # SmolLM2's shape ratios (9 heads, 3 kv heads, tied), tiny
        return LlamaConfig(**dict(common, hidden_size=72, num_attention_heads=9), num_key_value_heads=3,
                           tie_word_embeddings=True, rope_theta=100000.0)  # fmt: skip
    if family == "mistral":  # sliding window shorter than the test sequences
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=8)
    if family == "qwen2":  # q/k/v biases; sliding window on layers >= max_window_layers
        return Qwen2Config(**dict(common, num_hidden_layers=3), num_key_value_heads=2, tie_word_embeddings=True,
                           use_sliding_window=True, sliding_window=8, max_window_layers=1)  # fmt: skip
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=None, eos_token_id=None)  # fmt: skip
    raise ValueError(family)


FAMILIES = [
    "llama",
    "llama-mqa-tied-llama3",
    "llama-linear-bias",
    "llama-dynamic",
    "smollm",
    "mistral",
    "qwen2",
    "gpt2",
]


def randomize_vectors(model) -> None:
    """Random biases and norm weights, so a key-mapping mistake cannot hide behind zeros and ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)


def make_hf_checkpoint(folder: Path, family: str, seed: int = 0, with_tokenizer: bool = True):
    """Build a random transformers model, save it with save_pretrained, return the (eval) HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family)).eval()
    randomize_vectors(model)
    model.save_pretrained(folder)
    if with_tokenizer:
        write_tokenizer(folder)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{family: (folder, hf_model)} built once per test session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {f: (root / f, make_hf_checkpoint(root / f, f)) for f in FAMILIES}
