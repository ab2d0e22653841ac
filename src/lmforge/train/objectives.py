"""Training objectives: `objective(model, batch) -> (loss, metrics)`. The trainer knows nothing else about them.

An objective gets the (possibly wrapped) model, which answers `model(input_ids, positions, attention_mask)`
with hidden states (B, T, D) and `model.logits(hidden)` with (…, V), and a batch dict of tensors on the
model's device. It returns a scalar loss (the mean over what it counts) and a dict of scalar metrics;
a metric `n_tokens` weights the batch when the trainer averages evaluation losses.
New objectives (masked LM, reward, DPO, distillation) register in OBJECTIVES.
torch is imported inside the functions, so the CLI lists the objectives' options without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


class Objective(Protocol):
    def __call__(
        self, model, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def chunked_cross_entropy(
    head, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """See lmforge.train.cross_entropy: the summed loss and the count of counted labels."""
    from lmforge.train import cross_entropy

    return cross_entropy.chunked_cross_entropy(head, hidden, labels, chunk_size, ignore_index)


@dataclass
class CausalLM:
    """Next-token prediction: loss = mean over labels != -100 of -log p(label | tokens before it).

    The batch holds `input_ids` (B, T) and `labels` (B, T), labels already shifted (labels[t] = token t+1),
    optionally `positions` and `attention_mask` (packed documents).
    """

    chunk_size: int = 1024  # positions (of B x T) per logits chunk

    def __call__(self, model, batch):
        hidden = model(
            batch["input_ids"], positions=batch.get("positions"), attention_mask=batch.get("attention_mask")
        )
        loss_sum, n = chunked_cross_entropy(model.logits, hidden, batch["labels"], self.chunk_size)
        return loss_sum / n.clamp(min=1), {"n_tokens": n}


@dataclass
class SFT(CausalLM):
    """Supervised fine-tuning: the causal LM loss on the labels the data keeps (completion / assistant tokens;
    prompts and padding are -100), with padded rows (`attention_mask` (B, T)) or packed ones (`positions` and
    a block-diagonal mask). See lmforge.finetune.sft."""


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) -> (B, D): each row's last real token (right padding; a left-padded row ends at T - 1)."""
    import torch

    if attention_mask is None or attention_mask.dim() != 2:
        return hidden[:, -1]
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=hidden.device)
    last = torch.where(attention_mask.bool(), idx, -1).amax(-1).clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass
class SequenceClassification:
    """Cross-entropy of `labels` (B,) from the last real token's hidden state through the model's `score`
    head (D -> num_labels, no bias, as transformers' *ForSequenceClassification). Metric: accuracy."""

    def __call__(self, model, batch):
        import torch.nn.functional as F

        hidden = model(
            batch["input_ids"], positions=batch.get("positions"), attention_mask=batch.get("attention_mask")
        )
        inner = getattr(model, "module", model)  # DDP
        logits = inner.score(last_token_hidden(hidden, batch.get("attention_mask"))).float()  # (B, C)
        loss = F.cross_entropy(logits, batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {
            "accuracy": accuracy.detach(),
            "n_tokens": batch["labels"].new_tensor(batch["labels"].shape[0]),
        }


OBJECTIVES: dict[str, type] = {
    "causal_lm": CausalLM,
    "sft": SFT,
    "sequence_classification": SequenceClassification,
}


def build_objective(name: str, options: dict) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**options)
    except TypeError as e:
        raise ValueError(f"objective {name}: {e}") from None
