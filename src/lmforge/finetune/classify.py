"""Sequence classification on a decoder: last-token pooling and a linear head (`score`, as transformers'
*ForSequenceClassification), trained with the shared loop; accuracy and macro F1.

    logits = score(hidden[last real token])          score: D -> C, no bias

Data: records {"text": ..., "label": ...} (JSONL/JSON/Parquet), labels as names or integer ids. The head
is reused by reward models (one output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.finetune.sft import DataError, SFTData, read_records


@dataclass
class LabeledExample:
    input_ids: list[int]
    label: int
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def add_classification_head(model, num_labels: int, seed: int = 0) -> nn.Linear:
    """Attach `model.score` (D -> num_labels, N(0, initializer_range)) and return it."""
    w = model.embed_tokens.weight
    head = nn.Linear(model.config.n_embd, num_labels, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * model.config.initializer_range)
    model.score = head
    return head


def load_labeled(
    path: str | Path, tokenizer, max_len: int, labels: list[str] | None = None, text_field: str = "text",
    label_field: str = "label",
) -> tuple[list[LabeledExample], list[str]]:  # fmt: skip
    """Tokenised (text, label) examples and the label names (given, or the sorted distinct labels)."""
    records, errors = [], []
    for where, record in read_records(path):
        if isinstance(record, Exception):
            errors.append(str(record))
        elif not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            errors.append(f"{where}: expected an object with a string {text_field!r}")
        elif (
            label_field not in record
            or isinstance(record[label_field], (dict, list))
            or record[label_field] is None
        ):
            errors.append(f"{where}: missing or non-scalar {label_field!r}")
        else:
            records.append((where, record[text_field], record[label_field]))
    if errors:
        shown = "\n  ".join(errors[:10])
        raise DataError(f"{len(errors)} malformed record(s):\n  {shown}")
    if labels is None:
        values = {r[2] for r in records}
        numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        labels = [str(v) for v in sorted(values)] if numeric else sorted(str(v) for v in values)
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for where, text, label in records:
        key = str(label)
        if key not in index:
            if isinstance(label, int) and 0 <= label < len(labels):
                key = labels[label]
            else:
                raise DataError(f"{where}: label {label!r} is not one of {labels}")
        ids = tokenizer.encode(text)[:max_len]
        if not ids:
            raise DataError(f"{where}: the text encodes to no tokens")
        out.append(LabeledExample(ids, index[key], where))
    return out, labels


class ClassificationData(SFTData):
    """Padded batches {"input_ids", "attention_mask", "labels" (B,)} for the trainer."""

    label = "classify"

    def __init__(self, train, val, pad_id: int, max_len: int, seed: int = 0):
        super().__init__(train, val, pad_id, max_len, packing=False, seed=seed)

    @staticmethod
    def _batch(examples: Sequence[LabeledExample], pad_id: int) -> dict[str, torch.Tensor]:
        T = max(len(e) for e in examples)
        ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for b, e in enumerate(examples):
            ids[b, : len(e)] = torch.tensor(e.input_ids)
            mask[b, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in examples])}

    def collate_samples(self, picks):
        return self._batch([self.train[i] for i in picks], self.pad_id)

    def val_batches(self, micro_batch_size: int, n_sequences: int, rank: int = 0, world_size: int = 1):
        per_rank = min(n_sequences, len(self.val)) // world_size
        mine = [self.val[rank + world_size * k] for k in range(per_rank)]
        for start in range(0, per_rank, micro_batch_size):
            yield self._batch(mine[start : start + micro_batch_size], self.pad_id)

    def stats(self) -> dict:
        lengths = [len(e) for e in self.train]
        return {"train_examples": len(self.train), "val_examples": len(self.val), "train_tokens": sum(lengths),
                "max_len": max(lengths), "mean_len": sum(lengths) / len(lengths)}  # fmt: skip


def f1_scores(
    predictions: Sequence[int], targets: Sequence[int], num_labels: int
) -> tuple[float, list[float]]:
    """Macro F1 and the F1 of each class (0 for a class never predicted nor present)."""
    per = []
    for c in range(num_labels):
        tp = sum(p == c and t == c for p, t in zip(predictions, targets))
        fp = sum(p == c and t != c for p, t in zip(predictions, targets))
        fn = sum(p != c and t == c for p, t in zip(predictions, targets))
        per.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    present = [f for c, f in enumerate(per) if c in set(targets) or c in set(predictions)]
    return (sum(present) / len(present) if present else 0.0), per


@torch.no_grad()
def classify(model, batches) -> tuple[list[int], list[int]]:
    """(predictions, targets) over batches of ClassificationData."""
    from lmforge.train.objectives import last_token_hidden

    device = next(model.parameters()).device
    preds, targets = [], []
    was = model.training
    model.eval()
    try:
        for batch in batches:
            hidden = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            logits = model.score(last_token_hidden(hidden, batch["attention_mask"].to(device)))
            preds += logits.argmax(-1).tolist()
            targets += batch["labels"].tolist()
    finally:
        model.train(was)
    return preds, targets


def classification_metrics(model, data: ClassificationData, n: int = 100_000, batch_size: int = 32) -> dict:
    preds, targets = classify(model, data.val_batches(batch_size, n))
    if not targets:
        return {}
    num_labels = model.score.weight.shape[0]
    macro, _ = f1_scores(preds, targets, num_labels)
    accuracy = sum(p == t for p, t in zip(preds, targets)) / len(targets)
    return {"val_accuracy": accuracy, "val_f1": macro}
