"""Tokenised binary shards and the deterministic, resumable, rank-disjoint window sampler.

On disk, a shard folder holds one flat token stream per split and a small manifest:

    train.bin   raw little-endian uint16 (vocab <= 65536) or uint32 ids: doc0 EOS doc1 EOS ...
    val.bin
    meta.json   {"dtype": "uint16", "vocab_size": V, "eos_id": e, "n_tokens": {"train": N, "val": M}}

Training reads (T+1)-token windows `tokens[i*T : i*T + T + 1]` (input = first T, labels = last T).
Epoch e visits all n = (N - 1) // T windows in the order `permutation(n)` drawn from (seed, e), so the
whole data state is one integer: the global sample counter g. Sample g goes to rank (g // B) % W, so the
W ranks read disjoint samples and a run with W ranks sees the same samples per step as one process
with the same global batch. Validation reads windows 0, 1, 2, ... of the val split, always the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lmforge.data.atomic import AtomicFile, write_text_atomic

META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse fsync on folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no meta.json (expected a token shard folder written by write_token_shards)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("dtype", "vocab_size", "n_tokens"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def write_token_shards(
    docs: Iterable[Iterable[int]],
    out_dir: str | Path,
    split: str = "train",
    vocab_size: int | None = None,
    eos_id: int | None = None,
) -> int:
    """Write documents of token ids as `{out_dir}/{split}.bin`, each followed by `eos_id`; returns the token count.

    The file appears only when complete (temporary file, fsync, rename); meta.json is then updated with
    this split's count. Splits written later must agree with the folder's vocab_size and eos_id.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_meta(out) if (out / META).is_file() else None
    if meta is not None:
        vocab_size = meta["vocab_size"] if vocab_size is None else vocab_size
        eos_id = meta.get("eos_id") if eos_id is None else eos_id
        if vocab_size != meta["vocab_size"] or eos_id != meta.get("eos_id"):
            raise ValueError(
                f"{out / META}: has vocab_size={meta['vocab_size']}, eos_id={meta.get('eos_id')}; "
                f"this split was given vocab_size={vocab_size}, eos_id={eos_id}"
            )
    if vocab_size is None or eos_id is None:
        raise ValueError("write_token_shards needs vocab_size and eos_id")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary (size {vocab_size})")
    dtype = token_dtype(vocab_size)
    eos = np.array([eos_id], dtype=dtype).tobytes()
    n = 0
    with AtomicFile(out / f"{split}.bin", binary=True) as f:  # an error leaves the old shard as it was
        for i, doc in enumerate(docs):
            ids = np.asarray(doc if isinstance(doc, np.ndarray) else list(doc), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise ValueError(
                    f"document {i}: token id {bad} is outside the vocabulary (size {vocab_size})"
                )
            f.write(ids.astype(dtype).tobytes())
            f.write(eos)
            n += ids.size + 1
    meta = meta or {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id, "n_tokens": {}}
    meta["n_tokens"][split] = n
    write_text_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    fsync_dir(out)
    return n


def open_split(folder: str | Path, split: str) -> np.ndarray:
    """The token stream of one split as a read-only memory map (nothing is read until indexed)."""
    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such split (meta.json lists {', '.join(meta['n_tokens']) or 'none'})"
        )
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {meta['dtype']} tokens")
    n = size // dtype.itemsize
    expected = meta["n_tokens"].get(split)
    if expected is not None and expected != n:
        raise ValueError(f"{path}: holds {n} tokens but meta.json says {expected}; rewrite the split")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def synthetic_corpus(
    vocab_size: int, n_tokens: int, seed: int, eos_id: int = 0, stream: int = 0
) -> np.ndarray:
    """Documents made of 32 fixed random phrases, so a model can learn them: a smoke-test corpus.

    The phrases depend on `seed` only; `stream` picks another arrangement of them (0 train, 1 validation).
    """
    rng = np.random.default_rng([seed, 1234])
    phrases = [rng.integers(0, vocab_size, size=int(rng.integers(4, 17))) for _ in range(32)]
    phrases = [np.where(p == eos_id, (eos_id + 1) % vocab_size, p) for p in phrases]
    rng = np.random.default_rng([seed, 1234, stream])
    parts, total = [], 0
    while total < n_tokens:
        for k in rng.integers(0, len(phrases), size=int(rng.integers(4, 32))):
            parts.append(phrases[k])
            total += len(phrases[k])
        parts.append(np.array([eos_id]))
        total += 1
    return np.concatenate(parts)[:n_tokens].astype(token_dtype(vocab_size))


class TokenWindows:
    """The (T+1)-token windows of a token stream, visited in a seeded permutation per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        self._epoch, self._order = -1, None

    def window(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        return self._order

    def sample(self, g: int) -> np.ndarray:
        """The window of global sample g (epochs follow each other, each in its own order)."""
        epoch, j = divmod(g, self.n_windows)
        return self.window(int(self._permutation(epoch)[j]))


@dataclass
class TrainBatches:
    """Micro-batches for one rank: (B, T+1) int64 arrays. `position` (global samples consumed) is the state."""

    windows: TokenWindows
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    position: int = 0

    def __post_init__(self) -> None:
        if self.windows.n_windows == 0:
            raise ValueError(
                f"the training split has {len(self.windows.tokens)} tokens, fewer than one window of "
                f"seq_len + 1 = {self.windows.seq_len + 1}"
            )

    def next(self) -> np.ndarray:
        B = self.micro_batch_size
        first = self.position + self.rank * B
        batch = np.stack([self.windows.sample(first + k) for k in range(B)])
        self.position += B * self.world_size
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.windows.seed, "seq_len": self.windows.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.windows.seq_len) != self.windows.seq_len:
            raise ValueError(
                f"the checkpoint was trained with seq_len={state['seq_len']}, not {self.windows.seq_len}"
            )
        self.position = int(state["position"])


class BatchLoader(Protocol):
    def next(self) -> dict: ...  # one micro-batch of this rank: {"input_ids": (B, T), "labels": (B, T), ...}
    def state_dict(self) -> dict: ...  # JSON-serialisable position in the stream (saved in checkpoints)
    def load_state_dict(self, state: dict) -> None: ...


class Samples(Protocol):
    """Training samples the trainer draws by index: `collate_samples(indices)` makes a micro-batch."""

    n_samples: int

    def collate_samples(self, picks: list[int]) -> dict: ...


@dataclass
class SampleLoader:
    """Micro-batches of one rank over `data.n_samples` samples visited in a seeded permutation per epoch;
    the state is one integer (samples consumed), as in the pretraining loader. Used by the `data=`
    sources (SFT examples, embedding pairs)."""

    data: Samples
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int
    position: int = 0
    _epoch: int = -1
    _order: np.ndarray | None = None

    def _sample(self, g: int) -> int:
        epoch, j = divmod(g, self.data.n_samples)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.data.n_samples)
            self._epoch = epoch
        return int(self._order[j])

    def next(self) -> dict:
        first = self.position + self.rank * self.micro_batch_size
        picks = [self._sample(g) for g in range(first, first + self.micro_batch_size)]
        self.position += self.micro_batch_size * self.world_size
        return self.data.collate_samples(picks)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class BatchSource(Protocol):
    """Training data other than token windows (e.g. SFT examples), as the trainer's `data=` argument.

    Batches are dicts of CPU tensors the objective understands; the trainer moves them to the device.
    """

    seq_len: int  # nominal tokens per sequence: tokens_seen and MFU count micro_batch_size * seq_len
    has_validation: bool

    def loader(self, micro_batch_size: int, rank: int, world_size: int, seed: int) -> BatchLoader: ...

    def val_batches(self, micro_batch_size: int, n_sequences: int, rank: int, world_size: int): ...


def val_batches(
    windows: TokenWindows, micro_batch_size: int, n_sequences: int, rank: int = 0, world_size: int = 1
):
    """The fixed validation micro-batches of one rank: the first `n_sequences` windows of the split, dealt
    round-robin to the ranks, so every world size evaluates the same windows (up to world_size - 1 left over).

    Every rank yields the same number of batches (collectives inside FSDP's forward need that).
    """
    per_rank = min(n_sequences, windows.n_windows) // world_size
    mine = [rank + world_size * k for k in range(per_rank)]
    for start in range(0, per_rank, micro_batch_size):
        yield np.stack([windows.window(i) for i in mine[start : start + micro_batch_size]])


def document_mask(input_ids, eos_id: int):
    """Positions that restart after each EOS and a block-diagonal causal mask (B, 1, T, T), True = attend.

    A token attends to earlier tokens of its own document only; the EOS closes the document it ends.
    """
    import torch

    B, T = input_ids.shape
    is_eos = (input_ids == eos_id).long()
    doc = torch.cumsum(is_eos, dim=1) - is_eos  # (B, T) document index; EOS belongs to the document it ends
    idx = torch.arange(T, device=input_ids.device)
    starts = torch.where(doc[:, 1:] != doc[:, :-1], idx[1:].expand(B, -1), torch.zeros_like(doc[:, 1:]))
    first = torch.cummax(torch.cat([torch.zeros_like(doc[:, :1]), starts], dim=1), dim=1).values
    positions = idx - first  # (B, T)
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    causal = idx[None, :, None] >= idx[None, None, :]
    return positions, (same_doc & causal)[:, None]
