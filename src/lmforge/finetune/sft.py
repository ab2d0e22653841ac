"""Supervised fine-tuning data: TRL's record formats -> token ids with masked labels -> padded or packed batches.

    {"text": "..."}                                          language modelling on the whole text
    {"prompt": "...", "completion": "..."}                   loss on the completion (and EOS) only
    {"messages": [{"role": "user", "content": ...}, ...]}    rendered with the chat template; loss on
                                                             the assistant turns only
    {"prompt": [messages], "completion": [messages]}         conversational prompt/completion

Which tokens train is decided on characters, then mapped to tokens through the tokenizer's offsets: the
text is rendered once and tokenised once, so the ids are exactly what the model sees at inference (no
seam between separately tokenised prompt and completion). For chat, the span of an assistant turn is
found by rendering the conversation up to the turn (with the generation prompt) and up to its end: what
lies between is the reply and its end-of-turn tokens, whatever the template.

Labels are shifted (labels[t] = ids[t + 1], -100 where no loss is taken), as the trainer's objectives
expect. Padding puts one example per row (right padded, with an attention mask); packing fills rows of
`max_len` with whole examples, each attending only to itself (a block-diagonal mask, positions restarting
at every example), so packing changes the speed, not the loss.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.train.dataset import SampleLoader
from lmforge.train.objectives import IGNORE_INDEX


class DataError(ValueError):
    """Malformed SFT data; the message names each bad record's file and line (or Parquet row)."""


@dataclass
class Example:
    input_ids: list[int]  # the model's input (all tokens but the last)
    labels: list[int]  # next-token targets, IGNORE_INDEX where no loss is taken
    prompt_ids: list[int] | None = None  # what to generate from, for exact match
    reference: str | None = None  # the expected completion text
    where: str = ""  # file:line

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------------------------------
# Reading records


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(file:line, record) for a JSONL (one object per line, blank lines skipped), a JSON list or a Parquet
    file (file:row N). Malformed JSON is yielded as a DataError in place of the record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
            raise DataError(f"{path}: cannot read as Parquet: {e}") from None
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
        return
    if suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records (or use JSONL)")
        for i, record in enumerate(records):
            yield f"{path}:[{i}]", record
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield where, DataError(f"{where}: malformed JSON ({e})")


def _check_messages(messages: Any, key: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{key!r} must be a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"{key}[{i}] must be an object with a string 'role'"
        if not isinstance(m.get("content"), str):
            return f"{key}[{i}] ({m.get('role')}) must have a string 'content'"
    return None


def record_format(record: Any) -> tuple[str | None, str | None]:
    """(format, problem): format is "text", "prompt_completion", "chat" or "chat_prompt_completion"."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        problem = _check_messages(record["messages"], "messages")
        return ("chat", None) if problem is None else (None, problem)
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if prompt is None or completion is None:
            return None, "a 'prompt' needs a 'completion' (and a 'completion' a 'prompt')"
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt_completion", None
        if isinstance(prompt, list) and isinstance(completion, list):
            problem = _check_messages(prompt, "prompt") or _check_messages(completion, "completion")
            return ("chat_prompt_completion", None) if problem is None else (None, problem)
        return None, "'prompt' and 'completion' must both be strings or both be lists of messages"
    if "text" in record:
        if not isinstance(record["text"], str):
            return None, f"'text' is {type(record['text']).__name__}, expected a string"
        return "text", None
    return None, f"expected a 'text', 'messages' or 'prompt'/'completion' field; got {sorted(record)}"


# --------------------------------------------------------------------------------------------------
# Records -> token ids and trained spans


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def _assistant_spans(tokenizer, messages: list[dict], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant turns at index >= first."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        start_text = _render(tokenizer, messages[:i], True) if i else ""
        end_text = _render(tokenizer, messages[: i + 1], False)
        if full.startswith(start_text) and full.startswith(end_text) and len(end_text) > len(start_text):
            spans.append((len(start_text), len(end_text)))
            continue
        # a template that rewrites earlier turns: find the reply's text after the previous span
        at = full.find(m["content"], spans[-1][1] if spans else 0)
        if at < 0:
            raise ValueError(f"cannot locate assistant turn {i} in the rendered conversation")
        spans.append((at, at + len(m["content"])))
    return full, spans


def tokenize_record(
    record: dict,
    tokenizer,
    fmt: str,
    completion_only: bool = True,
    add_eos: bool = True,
) -> tuple[list[int], list[bool], list[int] | None, str | None]:
    """(ids, trained per token, prompt ids, reference text) of one record."""
    eos = tokenizer.eos_id
    prompt_ids, reference = None, None
    if fmt in ("chat", "chat_prompt_completion"):
        if tokenizer.chat_template is None:
            raise ValueError("chat records need a tokenizer with a chat template")
        if fmt == "chat":
            messages, first = record["messages"], 0
        else:
            messages, first = record["prompt"] + record["completion"], len(record["prompt"])
        text, spans = _assistant_spans(tokenizer, messages, first)
        if not completion_only:
            spans = [(0, len(text))]
        special = False
        last = len(messages) - 1
        if messages[last]["role"] == "assistant" and last >= 1:
            prompt_ids = tokenizer.encode(_render(tokenizer, messages[:last], True), add_special_tokens=False)
            reference = messages[last]["content"]
        add_eos = False  # the template closes every turn itself
    elif fmt == "prompt_completion":
        text = record["prompt"] + record["completion"]
        spans = [(len(record["prompt"]), len(text))] if completion_only else [(0, len(text))]
        special = True
        prompt_ids = tokenizer.encode(record["prompt"], add_special_tokens=True)
        reference = record["completion"]
    else:
        text, spans, special = record["text"], [(0, len(record["text"]))], True
    enc = tokenizer.backend.encode(text, add_special_tokens=special)
    ids = list(enc.ids)
    trained = [any(a <= s < b for a, b in spans) and e > s for s, e in enc.offsets]
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        trained.append(True)
    return ids, trained, prompt_ids, reference


def make_example(ids: list[int], trained: list[bool], max_len: int, **extra) -> tuple[Example | None, bool]:
    """(Example, truncated); None when nothing trainable is left after truncation to max_len inputs."""
    truncated = len(ids) > max_len + 1
    ids, trained = ids[: max_len + 1], trained[: max_len + 1]
    labels = [t if ok else IGNORE_INDEX for t, ok in zip(ids[1:], trained[1:])]
    if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return Example(ids[:-1], labels, **extra), truncated


@dataclass
class LoadReport:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # no trained token left
    errors: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)


def load_examples(
    path: str | Path,
    tokenizer,
    max_len: int,
    completion_only: bool = True,
    add_eos: bool = True,
    on_error: str = "raise",
) -> tuple[list[Example], LoadReport]:
    """Tokenised examples of a JSONL/JSON/Parquet file. Malformed records are collected with their
    file:line; on_error="raise" raises one DataError listing them, "skip" leaves them out (see the report)."""
    report = LoadReport()
    examples = []
    for where, record in read_records(path):
        report.records += 1
        if isinstance(record, DataError):
            report.errors.append(str(record))
            continue
        fmt, problem = record_format(record)
        if problem is not None:
            report.errors.append(f"{where}: {problem}")
            continue
        try:
            ids, trained, prompt_ids, reference = tokenize_record(
                record, tokenizer, fmt, completion_only, add_eos
            )
        except Exception as e:  # a template error names the record rather than stopping without a place
            report.errors.append(f"{where}: {e}")
            continue
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        ex, truncated = make_example(
            ids, trained, max_len, prompt_ids=prompt_ids, reference=reference, where=where
        )
        report.truncated += truncated
        if ex is None:
            report.dropped += 1
            continue
        examples.append(ex)
    report.examples = len(examples)
    if report.errors and on_error == "raise":
        shown = "\n  ".join(report.errors[:10])
        more = f"\n  ... and {len(report.errors) - 10} more" if len(report.errors) > 10 else ""
        raise DataError(f"{len(report.errors)} malformed record(s):\n  {shown}{more}")
    if not examples:
        raise DataError(
            f"{path}: no usable examples ({report.records} records, {report.dropped} with nothing to train)"
        )
    return examples, report


# --------------------------------------------------------------------------------------------------
# Batches


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, labels and attention_mask."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_examples(examples: Sequence[Example], max_len: int) -> list[list[int]]:
    """Rows of example indices, first fit in the given order: each row's examples fit in max_len tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, e in enumerate(examples):
        for r in range(len(rows)):
            if room[r] >= len(e):
                rows[r].append(i)
                room[r] -= len(e)
                break
        else:
            rows.append([i])
            room.append(max_len - len(e))
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], max_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) ids and labels of packed rows, positions restarting per example and a block-diagonal causal
    mask (B, 1, T, T): no token sees another example. Padding at a row's end attends to itself only."""
    T = min(max_len, max(sum(len(e) for e in row) for row in rows))
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e)
            ids[b, at : at + n] = torch.tensor(e.input_ids)
            labels[b, at : at + n] = torch.tensor(e.labels)
            positions[b, at : at + n] = torch.arange(n)
            segment[b, at : at + n] = s
            at += n
        segment[b, at:] = torch.arange(len(row), len(row) + T - at)  # each pad is its own segment
    idx = torch.arange(T)
    mask = (segment[:, :, None] == segment[:, None, :]) & (idx[:, None] >= idx[None, :])
    return {"input_ids": ids, "labels": labels, "positions": positions, "attention_mask": mask[:, None]}


class SFTData:
    """Train and validation examples as the trainer's `data=` source (padded or packed batches)."""

    label = "finetune"

    def __init__(
        self,
        train: list[Example],
        val: list[Example],
        pad_id: int,
        max_len: int,
        packing: bool = False,
        seed: int = 0,
        tokenizer_dir: Path | None = None,
    ):
        self.train, self.val = train, val
        self.pad_id, self.max_len, self.packing = pad_id, max_len, packing
        self.seq_len = max_len
        self.tokenizer_dir = tokenizer_dir
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        self.rows = (
            [[order[i] for i in row] for row in pack_examples([train[i] for i in order], max_len)]
            if packing
            else None
        )

    @property
    def has_validation(self) -> bool:
        return bool(self.val)

    @property
    def n_samples(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.train)

    def collate_samples(self, picks: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.rows is None:
            return pad_batch([self.train[i] for i in picks], self.pad_id)
        return packed_batch([[self.train[i] for i in self.rows[p]] for p in picks], self.max_len, self.pad_id)

    def loader(self, micro_batch_size: int, rank: int, world_size: int, seed: int) -> SampleLoader:
        return SampleLoader(self, micro_batch_size, rank, world_size, seed)

    def val_batches(self, micro_batch_size: int, n_sequences: int, rank: int = 0, world_size: int = 1):
        per_rank = min(n_sequences, len(self.val)) // world_size
        mine = [self.val[rank + world_size * k] for k in range(per_rank)]
        for start in range(0, per_rank, micro_batch_size):
            yield pad_batch(mine[start : start + micro_batch_size], self.pad_id)

    def stats(self) -> dict[str, Any]:
        lengths = [len(e) for e in self.train]
        trained = sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in self.train)
        out = {"train_examples": len(self.train), "val_examples": len(self.val), "train_tokens": sum(lengths),
               "trained_tokens": trained, "max_len": max(lengths), "mean_len": sum(lengths) / len(lengths)}  # fmt: skip
        if self.rows is not None:
            out["packed_rows"] = len(self.rows)
            out["packing_efficiency"] = sum(lengths) / (len(self.rows) * self.max_len)
        return out


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random hold-out of round(fraction * n) examples (at least one when fraction > 0)."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


# --------------------------------------------------------------------------------------------------
# Exact match of greedy generations


@torch.no_grad()
def exact_match(model, tokenizer, examples: Sequence[Example], max_examples: int = 64, batch_size: int = 16,
                max_new_tokens: int | None = None) -> dict[str, float]:  # fmt: skip
    """Greedy generations from each example's prompt compared with its reference (whitespace-stripped).

    Returns {"val_exact_match": fraction, "val_exact_match_n": count}; empty when no example has a reference.
    """
    from lmforge.generate import SamplingParams, generate

    refs = [e for e in examples if e.reference is not None and e.prompt_ids][:max_examples]
    if not refs:
        return {}
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for start in range(0, len(refs), batch_size):
            chunk = refs[start : start + batch_size]
            budget = (
                max_new_tokens
                or max(len(tokenizer.encode(e.reference, add_special_tokens=False)) for e in chunk) + 4
            )
            params = SamplingParams(max_new_tokens=budget, temperature=0.0)
            outs = generate(model, [e.prompt_ids for e in chunk], params, tokenizer)
            hits += sum(o.text.strip() == e.reference.strip() for o, e in zip(outs, chunk))
    finally:
        model.train(was_training)
    return {"val_exact_match": hits / len(refs), "val_exact_match_n": len(refs)}


def generations(model, tokenizer, examples: Sequence[Example], n: int = 8) -> list[dict[str, str]]:
    """A few (prompt, reference, generated) triples for the report."""
    from lmforge.generate import SamplingParams, generate

    refs = [e for e in examples if e.reference is not None and e.prompt_ids][:n]
    if not refs:
        return []
    was_training = model.training
    model.eval()
    try:
        budget = max(len(tokenizer.encode(e.reference, add_special_tokens=False)) for e in refs) + 4
        outs = generate(model, [e.prompt_ids for e in refs], SamplingParams(max_new_tokens=budget, temperature=0.0),
                        tokenizer)  # fmt: skip
    finally:
        model.train(was_training)
    return [{"prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=False), "reference": e.reference,
             "generated": o.text} for e, o in zip(refs, outs)]  # fmt: skip
