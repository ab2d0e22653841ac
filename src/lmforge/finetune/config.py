"""The settings of each fine-tuning method: plain dataclasses, no torch (so `lmforge --help` stays fast).

Field names are PEFT's where PEFT has the method, so an `adapter_config.json` reads back into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoraConfig:
    r: int = 8  # rank of the update B A
    lora_alpha: float = 16.0  # scaling numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input
    # A list of module names (a name matches itself and any path ending in ".name"), a regex matched against
    # the whole module path, or "all-linear" (every linear layer except the output head).
    target_modules: list[str] | str = field(default_factory=lambda: list(_ATTN))  # names, regex or all-linear
    use_rslora: bool = False  # s = alpha / sqrt(r): rank-stable scaling
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module rank, by name pattern (PEFT's)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha, by name pattern
    modules_to_save: list[str] | None = None  # modules trained whole, saved with the adapter (e.g. score)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # new-token rows that train

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)


@dataclass
class BottleneckConfig:
    bottleneck_size: int = 32  # m, the adapter's hidden width
    target_modules: list[str] | str = field(default_factory=lambda: ["o_proj", "down_proj"])  # after these
    non_linearity: str = "gelu"  # silu | gelu | gelu_new
    adapter_dropout: float = 0.0  # dropout inside the adapter
    init_std: float = 1e-3  # down-projection init; up starts at zero
    train_norms: bool = True  # Houlsby also trains the layer norms
    modules_to_save: list[str] | None = None  # modules trained whole, saved with the adapter (e.g. score)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # new-token rows that train


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 16  # P: virtual tokens whose keys and values every layer sees
    prefix_projection: bool = False  # train through an MLP reparametrisation (Li & Liang); saved projected
    encoder_hidden_size: int = 256  # the MLP's hidden width with prefix_projection
    init: str = "vocab"  # vocab: keys/values of random vocabulary tokens; normal: N(0, 1) as PEFT


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 16  # P: trained input embeddings before every input
    init: str = "vocab"  # vocab: embeddings of random vocabulary tokens; normal: N(0, 1); text: init_text
    init_text: str | None = None  # with init="text": the embeddings of this text's tokens (repeated to P)
