"""Text generation: KV-cache decoding, sampling, batching, streaming and log-probabilities.

One decode loop serves everything: `generate` (a batch of prompts of different lengths, left padded),
`stream` (text pieces of one prompt as they are produced) and `score` (log-probabilities of given text).

Per step, the logits of each row's last position go through, in the order transformers applies them:
repetition penalty -> presence/frequency penalties -> temperature -> top-k -> top-p -> min-p -> sample.
Sampling draws per-row noise from a per-row generator seeded by `seed + row`, so a row's tokens do not
depend on which other prompts share its batch (the same holds for greedy decoding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.model.compile import compile_options, fuse_qkv, wide_weights_column_major
from lmforge.model.decoder import Transformer
from lmforge.model.kv_cache import KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019), over prompt and output, as transformers
    presence_penalty: float = 0.0  # OpenAI's, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before them
    ignore_eos: bool = False
    logprobs: bool = False  # log-probability of each generated token under the model
    top_logprobs: int = 0  # also the k most likely alternatives at each step
    prompt_logprobs: bool = False  # log-probabilities of the prompt tokens (first is None)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0


# --------------------------------------------------------------------------------------------------
# Logits processing


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    out_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) logits to sample from (filtered entries are -inf).

    seen: (B, V) bool, tokens in prompt or output (repetition penalty);
    out_counts: (B, V) counts of output tokens (presence and frequency penalties).
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(
            logits < 0, logits * params.repetition_penalty, logits / params.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if out_counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = logits - params.presence_penalty * (out_counts > 0) - params.frequency_penalty * out_counts
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already reach top_p (the best token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), -math.inf)
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids."""
    if params.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (the Gumbel-max trick).
    noise = torch.empty_like(probs)
    for b in range(probs.shape[0]):
        noise[b].exponential_(generator=generators[b] if generators else None)
    return (probs / noise).argmax(-1)


def top_alternatives(logprobs: torch.Tensor, k: int) -> list[dict[int, float]]:
    values, ids = logprobs.topk(k, dim=-1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]


# --------------------------------------------------------------------------------------------------
# The decode loop


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p) :] = 1
    return ids.to(device), mask.to(device)


class Decoder:
    """Generates for a batch of prompts, one step at a time, so callers can stream or stop rows."""

    def __init__(
        self,
        model: Transformer,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        compile: bool = False,
    ):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.model, self.params = model, params
        ctx = model.config.context_limit
        longest = max(len(p) for p in prompts)
        if ctx is not None and longest > ctx:
            raise ValueError(f"prompt has {longest} tokens; the model's context is {ctx}")
        # new tokens that fit in the context
        self.budget = params.max_new_tokens if ctx is None else min(params.max_new_tokens, ctx - longest)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.device = next(model.parameters()).device
        self.results = [Generation(prompt_tokens=list(p)) for p in prompts]
        if params.logprobs:
            for r in self.results:
                r.logprobs, r.top_logprobs = [], ([] if params.top_logprobs else None)
        self.rows = list(range(len(prompts)))  # result indices still generating
        self.live = set(self.rows)
        B, V = len(prompts), model.config.vocab_size
        self.generators = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generators = [torch.Generator(device=self.device).manual_seed(seed + b) for b in range(B)]
        self.seen = self.out_counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=self.device)
            for b, p in enumerate(prompts):
                self.seen[b, torch.tensor(p, device=self.device)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.out_counts = torch.zeros(B, V, dtype=torch.float32, device=self.device)
        # compile: a static cache and a fixed batch (finished rows keep decoding, their tokens ignored),
        # so the decode step is traced once; see KVCache
        self.compiled = compile
        cache_len = longest + self.budget
        self._qkv = fuse_qkv(model)  # q, k and v in one product; the views hold for this generation
        if compile:  # round up so runs of similar lengths share one compiled graph
            cache_len = -(-cache_len // 256) * 256
            wide_weights_column_major(model)  # faster matrix-vector products on CPU; no-op elsewhere
        self.cache = KVCache.for_model(model, B, cache_len, static=compile)
        self.batch_rows = list(range(B))  # result index of each batch row
        self._prompts = prompts
        self._pad_id = pad_id
        self._next: torch.Tensor | None = None  # (B,) tokens to feed at the next step
        self.steps = 0

    @torch.inference_mode()
    def prefill(self) -> None:
        t0 = time.perf_counter()
        ids, mask = _left_pad(self._prompts, self._pad_id, self.device)
        hidden = self.model(ids, attention_mask=mask, kv_cache=self.cache, qkv=self._qkv)  # (B, T, D)
        if self.params.prompt_logprobs:
            self._score_prompts(hidden, ids, mask)
        logits = self.model.logits(hidden[:, -1])  # (B, V): left padding puts every prompt's end last
        if self.budget > 0:
            self._emit(logits)
        elapsed = time.perf_counter() - t0
        for r in self.results:
            r.prefill_s = elapsed

    def _score_prompts(self, hidden, ids, mask) -> None:
        logprobs = F.log_softmax(self.model.logits(hidden[:, :-1]).float(), dim=-1)  # (B, T-1, V)
        target = logprobs.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        k = self.params.top_logprobs
        for b, r in enumerate(self.results):
            n = int(mask[b].sum())
            start = ids.shape[1] - n  # first real token
            r.prompt_logprobs = [None] + target[b, start:].tolist()
            if k:
                r.prompt_top_logprobs = [None] + top_alternatives(logprobs[b, start:], k)

    def _emit(self, logits: torch.Tensor) -> None:
        """Choose the next token of every live row from its last logits (B, V)."""
        p = self.params
        processed = process_logits(logits, p, self.seen, self.out_counts)
        tokens = sample(processed, p, self.generators)
        if p.logprobs:
            logprobs = F.log_softmax(logits.float(), dim=-1)
            chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
            alternatives = top_alternatives(logprobs, p.top_logprobs) if p.top_logprobs else None
            for b, row in enumerate(self.batch_rows):
                if row in self.live:
                    self.results[row].logprobs.append(chosen[b])
                    if alternatives is not None:
                        self.results[row].top_logprobs.append(alternatives[b])
        batch = torch.arange(len(self.batch_rows), device=self.device)
        if self.seen is not None:
            self.seen[batch, tokens] = True
        if self.out_counts is not None:
            self.out_counts[batch, tokens] += 1
        for b, token in enumerate(tokens.tolist()):
            if self.batch_rows[b] in self.live:
                self.results[self.batch_rows[b]].tokens.append(token)
        self._next = tokens
        self.steps += 1

    def finished_rows(self) -> list[int]:
        """Result indices of live rows that just ended on a stop token or the length budget."""
        done = []
        for row in self.rows:
            r = self.results[row]
            if r.tokens and r.tokens[-1] in self.stop_ids:
                r.finish_reason = "stop"
                done.append(row)
            elif len(r.tokens) >= self.budget:
                r.finish_reason = "length"
                done.append(row)
        return done

    def drop(self, rows: list[int]) -> None:
        """Stop generating for these result indices (finished, or stopped by the caller)."""
        if not rows:
            return
        self.rows = [row for row in self.rows if row not in rows]
        self.live = set(self.rows)
        if not self.rows or self.compiled:
            return
        keep = [b for b, row in enumerate(self.batch_rows) if row not in rows]
        self.batch_rows = [self.batch_rows[b] for b in keep]
        self.cache.select_rows(keep)
        index = torch.tensor(keep, device=self.device)
        self._next = self._next.index_select(0, index)
        if self.generators:
            self.generators = [self.generators[b] for b in keep]
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.out_counts is not None:
            self.out_counts = self.out_counts.index_select(0, index)

    def _forward_step(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.model(tokens[:, None], kv_cache=self.cache, qkv=self._qkv)  # (B, 1, D)
        return self.model.logits(hidden[:, -1])  # (B, V)

    @torch.inference_mode()
    def step(self) -> None:
        """Feed the last sampled token of every live row and choose the next."""
        if self.compiled:
            self._emit(_compiled(self.model, self.cache, self._qkv)(self._next))
        else:
            self._emit(self._forward_step(self._next))


def _decode_step(model: Transformer, tokens: torch.Tensor, qkv, *cache_tensors) -> torch.Tensor:
    """One decode step on a static cache given as tensors: (B,) tokens -> (B, V) logits. qkv: fuse_qkv's
    stacked q/k/v weights per layer."""
    hidden = model(tokens[:, None], kv_cache=KVCache.wrap(*cache_tensors), qkv=qkv)  # (B, 1, D)
    return model.logits(hidden[:, -1])


_compiled_decode_step = None


def _compiled(model: Transformer, cache: KVCache, qkv):
    """The decode step through torch.compile. Only tensors and the model go in, so every Decoder with
    the same batch size and cache length reuses the compiled code."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        options = compile_options(cache.valid.device)
        _compiled_decode_step = torch.compile(_decode_step, dynamic=False, options=options)
    return lambda tokens: _compiled_decode_step(model, tokens, qkv, *cache.tensors())


# --------------------------------------------------------------------------------------------------
# Public entry points


def stop_ids_of(model: Transformer, tokenizer) -> list[int]:
    ids = set(model.config.eos_ids)
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "eos_ids", ()) or ())
    return sorted(ids)


def pad_id_of(model: Transformer, tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_id", None), model.config.pad_token_id, *model.config.eos_ids):
        if candidate is not None:
            return candidate
    return 0


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def _safe_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the prefix of text that cannot be the start of any stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return len(text) - hold


class RowText:
    """The text of one row as it grows: incremental detokenisation (with the prompt as context, so a
    SentencePiece word keeps its leading space), stop strings, and text held back that may begin one."""

    def __init__(self, tokenizer, prompt: Sequence[int], stops: Sequence[str]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True, context_ids=prompt)
        self.stops = stops
        self.text = ""  # emitted so far
        self.pending = ""  # decoded, not yet emitted

    def push(self, token: int | None, final: bool) -> tuple[str, bool]:
        """Add a token (None: none) and return (piece to emit, whether a stop string was hit)."""
        if token is not None:
            self.pending += self.decoder.feed(token)
        if final:
            self.pending += self.decoder.flush()
        cut = _find_stop(self.pending, self.stops)
        if cut >= 0:
            self.pending = self.pending[:cut]
        n = len(self.pending) if final or cut >= 0 else _safe_prefix_len(self.pending, self.stops)
        piece, self.pending = self.pending[:n], self.pending[n:]
        self.text += piece
        return piece, cut >= 0


def generate_stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    tokenizer=None,
    compile: bool = False,
) -> Iterator[tuple[int, str, Generation | None]]:
    """The decode loop, as events: (prompt index, text piece, None) while text is produced and
    (prompt index, "", Generation) when that prompt is done. Without a tokenizer pieces are empty."""
    params = params or SamplingParams()
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    dec = Decoder(model, prompts, params, stop_ids_of(model, tokenizer), pad_id_of(model, tokenizer), compile)
    texts = [RowText(tokenizer, p, params.stop) for p in prompts] if tokenizer is not None else None
    t0 = time.perf_counter()
    dec.prefill()
    t1 = time.perf_counter()
    while True:
        ended = set(dec.finished_rows())
        if texts is not None:
            for row in dec.rows:
                r = dec.results[row]
                last = r.tokens[-1] if r.tokens else None
                is_stop_token = row in ended and r.finish_reason == "stop"
                piece, hit = texts[row].push(None if is_stop_token else last, final=row in ended)
                if hit and row not in ended:
                    r.finish_reason = "stop"
                    ended.add(row)
                    piece += texts[row].push(None, final=True)[0]
                if piece:
                    yield row, piece, None
        for row in sorted(ended):
            r = dec.results[row]
            r.prefill_s, r.decode_s = t1 - t0, time.perf_counter() - t1
            if texts is not None:
                r.text = texts[row].text
            yield row, "", r
        dec.drop(sorted(ended))
        if not dec.rows:
            return
        dec.step()


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    tokenizer=None,
    compile: bool = False,
) -> list[Generation]:
    """Generate continuations for a batch of token-id prompts (any lengths); one Generation each.

    compile=True runs the decode step through torch.compile (a static cache; the first call compiles,
    which takes seconds to a minute; later calls with the same batch size and cache length reuse it).
    """
    results: list[Generation | None] = [None] * len(prompts)
    for row, _, done in generate_stream(model, prompts, params, tokenizer, compile):
        if done is not None:
            results[row] = done
    return results  # type: ignore[return-value]


def stream(
    model: Transformer,
    tokenizer,
    prompt: Sequence[int],
    params: SamplingParams | None = None,
    compile: bool = False,
):
    """Yield the text pieces of one prompt's continuation as they are decoded; return its Generation.

    A piece never ends inside a multi-byte character, and text that could begin a stop string is held
    back until it is known not to; the pieces concatenate to `generate(...)`'s text.
    """
    for _, piece, done in generate_stream(model, [prompt], params, tokenizer, compile):
        if done is not None:
            return done
        yield piece


@torch.inference_mode()
def score(model: Transformer, ids: Sequence[int]) -> tuple[list[float | None], float]:
    """Log-probability of each token given the ones before it (the first is None), and the perplexity."""
    ctx = model.config.context_limit
    if ctx is not None and len(ids) > ctx:
        raise ValueError(f"text has {len(ids)} tokens; the model's context is {ctx}")
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logprobs = F.log_softmax(model.logits(model(x))[0, :-1].float(), dim=-1)  # (T-1, V)
    target = logprobs.gather(-1, x[0, 1:, None])[:, 0].tolist()
    ppl = math.exp(-sum(target) / len(target)) if target else float("nan")
    return [None, *target], ppl
