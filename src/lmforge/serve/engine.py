"""Continuous batching: a scheduler over the rows of one KV cache, run by a background thread.

Each turn of the loop
  1. ends sequences whose client went away or whose deadline passed,
  2. admits waiting sequences into free rows: one prefill per group of new prompts (right padded), with a
     prompt prefix already in the prefix pool copied instead of recomputed, and the n choices of one
     prompt prefilled once,
  3. runs one decode step over all rows in use (one forward per adapter), and
  4. hands every request its new tokens and text through a callback (the server's event loop queue).

Rows in use are packed at the front of the cache and grouped by adapter, so a step is a forward over a
view of contiguous rows (`KVCache.view`): no copy of the cache per step, and a finished row's place is
refilled at the next turn. Moving a row is a copy of its own slots only.

    rows  [ base: 0 .. 4 ) [ adapter "sql": 4 .. 6 ) [ free ... ) [ prefix pool ... )

Every sequence has its own sampling parameters and random generator (seeded `seed + choice index`), and
positions count real tokens, so a sequence's tokens do not depend on what shares its batch: greedy output
alone equals greedy output batched (up to float rounding of different batch shapes).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.generate import (
    Generation,
    RowText,
    SamplingParams,
    pad_id_of,
    process_logits,
    sample,
    stop_ids_of,
    top_alternatives,
)
from lmforge.model.kv_cache import KVCache


class QueueFull(Exception):
    """The waiting queue is full: the server answers 429 with Retry-After."""


# --------------------------------------------------------------------------------------------------
# Events handed to a request's callback (from the engine thread)


@dataclass
class Delta:
    """One new token of choice `index`, and the text it released (may be empty: held back or partial)."""

    index: int
    text: str
    token: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    prompt_logprobs: list[float | None] | None = None  # on a choice's first token, with echo
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class Done:
    """Choice `index` is complete; `result.finish_reason` says why."""

    index: int
    result: Generation


@dataclass
class Failed:
    """The whole request failed (timeout, internal error, shutdown)."""

    status: int
    message: str
    type: str = "server_error"


Event = Delta | Done | Failed


class Request:
    """One API request: `prompts` x `n` choices (choice index = prompt index * n + j)."""

    _ids = itertools.count()

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        n: int = 1,
        adapter: str | None = None,
        on_event: Callable[[Event], None] | None = None,
        timeout_s: float | None = None,
    ):
        self.id = next(Request._ids)
        self.prompts = [list(p) for p in prompts]
        self.params, self.n, self.adapter = params, n, adapter
        self.on_event = on_event or (lambda event: None)
        self.arrival = time.perf_counter()
        self.deadline = self.arrival + timeout_s if timeout_s else None
        self.cancelled = False
        self.failed = False
        self.first_token_at: float | None = None
        self.remaining = len(self.prompts) * n

    @property
    def n_choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass(eq=False)
class _Seq:
    """One choice being generated: its row, sampling state and text."""

    request: Request
    index: int  # choice index in the response
    prompt_index: int
    prompt: list[int]
    budget: int  # new tokens allowed (max_tokens, context and cache slots)
    stop_ids: set[int]
    result: Generation
    text: RowText | None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V) tokens in prompt or output (repetition penalty)
    out_counts: torch.Tensor | None = None  # (1, V) output token counts (presence/frequency penalty)
    row: int = -1
    holes: bool = False  # padding slots below its length (right-padded prefill)
    next_token: int | None = None
    done: bool = False
    last_token_at: float = 0.0
    prefix_len: int = 0  # prompt tokens copied from the prefix pool

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def adapter(self) -> str | None:
        return self.request.adapter


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    max_batch_seen: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens_computed: int = 0


@dataclass
class _Pooled:
    adapter: str | None
    tokens: tuple[int, ...]


@dataclass
class _Round:
    """Sequences admitted in one turn, with what their prefill needs."""

    leaders: list[_Seq] = field(default_factory=list)
    followers: list[tuple[_Seq, _Seq]] = field(default_factory=list)  # (follower, its leader)


class Engine:
    """Serves generation requests for one model (and its adapters) with continuous batching.

    max_batch: rows decoded together; max_len: slots per row (prompt + output, padding included);
    max_queue: sequences waiting for a row before `submit` raises QueueFull; prefix_pool_rows: extra
    rows holding recent prompts' keys/values for reuse (0 turns prefix caching off);
    activate(name): switches the model to adapter `name` (None: the base model) before a forward.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        max_queue: int = 64,
        prefix_pool_rows: int = 4,
        max_prefill_tokens: int = 4096,
        activate: Callable[[str | None], None] | None = None,
        observe: Callable[[str, float], None] | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        ctx = model.config.context_limit
        self.max_len = max_len or min(ctx or 4096, 4096)
        if ctx is not None:
            self.max_len = min(self.max_len, ctx)
        self.context_limit = ctx
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.pool_rows = prefix_pool_rows
        self.activate = activate
        self.observe = observe or (lambda name, value: None)
        self.eos_ids = set(stop_ids_of(model, tokenizer))
        self.pad_id = pad_id_of(model, tokenizer)
        self.sliding = any(model.config.window_for_layer(i) for i in range(model.config.n_layer))
        self.device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, max_batch + prefix_pool_rows, self.max_len)
        self.rows: list[_Seq | None] = [None] * max_batch
        self.groups: OrderedDict[str | None, int] = OrderedDict()  # adapter -> rows, in row order
        self.pool: OrderedDict[int, _Pooled] = OrderedDict()  # pool row -> its prompt (LRU order)
        self.waiting: deque[_Seq] = deque()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active_adapter: str | None = None
        self._running = 0

    # ---------------------------------------------------------------------------------------------
    # The API side (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        """Rows in use (sequences being decoded)."""
        return self._running

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def budget(self, prompt_len: int, max_tokens: int) -> int:
        """New tokens a prompt of this length may get: max_tokens, cut by the context and the row size."""
        limit = self.max_len if self.context_limit is None else min(self.max_len, self.context_limit)
        return max(0, min(max_tokens, limit - prompt_len))

    def check_prompt(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ValueError("the prompt has no tokens")
        if prompt_len > self.max_len:
            raise ValueError(f"the prompt has {prompt_len} tokens; this server's limit is {self.max_len}")

    def submit(self, request: Request) -> None:
        """Queue a request's sequences; raises QueueFull (nothing queued) or ValueError (bad prompt)."""
        p = request.params
        if p.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        for prompt in request.prompts:
            self.check_prompt(len(prompt))
        if request.n_choices > self.max_queue:
            raise ValueError(f"{request.n_choices} choices; this server queues at most {self.max_queue}")
        seqs = []
        base_seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
        vocab = self.model.config.vocab_size
        for i, prompt in enumerate(request.prompts):
            for j in range(request.n):
                index = i * request.n + j
                result = Generation(prompt_tokens=list(prompt))
                if p.logprobs:
                    result.logprobs, result.top_logprobs = [], ([] if p.top_logprobs else None)
                s = _Seq(request, index, i, list(prompt), self.budget(len(prompt), p.max_new_tokens),
                         set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids), result,
                         RowText(self.tokenizer, prompt, p.stop) if self.tokenizer is not None else None)  # fmt: skip
                if not p.greedy:
                    s.generator = torch.Generator(device=self.device).manual_seed((base_seed + index) % 2**64)
                if p.repetition_penalty != 1.0:
                    s.seen = torch.zeros(1, vocab, dtype=torch.bool, device=self.device)
                    s.seen[0, torch.tensor(prompt, device=self.device)] = True
                if p.presence_penalty or p.frequency_penalty:
                    s.out_counts = torch.zeros(1, vocab, dtype=torch.float32, device=self.device)
                seqs.append(s)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (limit {self.max_queue})")
            self.waiting.extend(seqs)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: its rows are freed at the engine's next turn."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    # ---------------------------------------------------------------------------------------------
    # The engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self.waiting and not self.running:
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = self._take_waiting()
                try:
                    self._expire()
                    if admitted:
                        self._prefill(admitted)
                    if self.running:
                        self._decode()
                except Exception as e:  # a bug or out of memory: fail what is in flight, keep serving
                    self._fail_all(f"internal error: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", status=503)

    def _take_waiting(self) -> list[_Seq]:
        """Sequences for the free rows (called with the lock held), up to a prefill token budget."""
        free = self.max_batch - self.running
        taken, tokens = [], 0
        while self.waiting and len(taken) < free:
            s = self.waiting[0]
            if s.request.cancelled or s.request.failed:
                self.waiting.popleft()
                self._finish_dropped(s)
                continue
            if taken and tokens + len(s.prompt) > self.max_prefill_tokens:
                break
            taken.append(self.waiting.popleft())
            tokens += len(s.prompt)
        self.observe("queue_depth", len(self.waiting))
        return taken

    def _finish_dropped(self, s: _Seq) -> None:
        s.done = True
        s.request.remaining -= 1

    def _expire(self) -> None:
        now = time.perf_counter()
        for s in list(self._active()):
            r = s.request
            if not r.cancelled and not r.failed and r.deadline is not None and now > r.deadline:
                self._fail(r, 504, "the request timed out", "timeout")
            if r.cancelled or r.failed:
                self._release(s)
        with self._wake:  # queued sequences of timed-out requests
            for s in self.waiting:
                r = s.request
                if not r.failed and r.deadline is not None and now > r.deadline:
                    self._fail(r, 504, "the request timed out while queued", "timeout")

    def _fail(self, request: Request, status: int, message: str, type: str = "server_error") -> None:
        if not request.failed:
            request.failed = True
            request.on_event(Failed(status, message, type))

    def _fail_all(self, message: str, status: int = 500) -> None:
        for s in list(self._active()):
            self._fail(s.request, status, message)
            self._release(s)
        with self._wake:
            for s in self.waiting:
                self._fail(s.request, status, message)
            self.waiting.clear()

    def _active(self) -> list[_Seq]:
        return [s for s in self.rows[: self.running] if s is not None]

    # ---------------------------------------------------------------------------------------------
    # Rows: packed at the front, grouped by adapter

    def _group_start(self, adapter: str | None) -> int:
        start = 0
        for name, count in self.groups.items():
            if name == adapter:
                return start
            start += count
        return start

    def _move(self, src: int, dst: int) -> None:
        s = self.rows[src]
        self.cache.copy_prefix(src, dst, self.cache._host_lengths[src])
        self.rows[dst], self.rows[src] = s, None
        s.row = dst

    def _reserve(self, adapter: str | None, k: int) -> int:
        """k free rows at the end of `adapter`'s group; later groups shift right. Returns the first."""
        if adapter not in self.groups:
            self.groups[adapter] = 0
        names = list(self.groups)
        at = names.index(adapter)
        for name in reversed(names[at + 1 :]):  # shift later groups right by k, last group first
            s0 = self._group_start(name)
            count = self.groups[name]
            for src in range(s0, s0 + min(k, count)):
                self._move(src, src + max(k, count))
        start = self._group_start(adapter) + self.groups[adapter]
        self.groups[adapter] += k
        self._running += k
        return start

    def _release(self, s: _Seq) -> None:
        """Free a sequence's row; the last row of its group and of each later group fill the gaps."""
        if s.row < 0:
            return
        if not s.done:
            s.done = True
            s.request.remaining -= 1
        row, adapter = s.row, s.adapter
        end = self._group_start(adapter) + self.groups[adapter]
        self.rows[row], s.row = None, -1
        if row != end - 1:
            self._move(end - 1, row)
        hole = end - 1
        self.groups[adapter] -= 1
        self._running -= 1
        names = list(self.groups)
        for name in names[names.index(adapter) + 1 :]:
            count = self.groups[name]
            if count:
                self._move(hole + count, hole)  # the group's last row into the free row before it
            hole += count
        if self.groups[adapter] == 0:
            del self.groups[adapter]

    # ---------------------------------------------------------------------------------------------
    # Prefix pool: recent prompts' keys/values in extra rows, reused by prompts that start the same way

    def _pool_lookup(self, s: _Seq) -> tuple[int, int]:
        """(pool row, tokens to copy) of the longest shared prefix; (-1, 0) if none."""
        best_row, best = -1, 0
        for row, entry in self.pool.items():
            if entry.adapter != s.adapter:
                continue
            m = len(os.path.commonprefix([entry.tokens, tuple(s.prompt)]))
            if m > best:
                best_row, best = row, m
        best = min(best, len(s.prompt) - 1)  # the last prompt token is fed to get the first logits
        if best_row >= 0 and best > 0:
            self.pool.move_to_end(best_row)
            return best_row, best
        return -1, 0

    def _pool_store(self, s: _Seq) -> None:
        entry = _Pooled(s.adapter, tuple(s.prompt))
        for row, other in self.pool.items():
            if other == entry:
                self.pool.move_to_end(row)
                return
            if other.adapter == entry.adapter and other.tokens[: len(entry.tokens)] == entry.tokens:
                return  # a longer prompt with this one as its prefix is already there
        if len(self.pool) < self.pool_rows:
            row = self.max_batch + len(self.pool)
        else:
            row, _ = self.pool.popitem(last=False)
        self.cache.copy_prefix(s.row, row, len(s.prompt))
        self.pool[row] = entry

    # ---------------------------------------------------------------------------------------------
    # Prefill

    def _forward(self, adapter: str | None, ids, mask, view: KVCache) -> torch.Tensor:
        if self.activate is not None and adapter != self._active_adapter:
            self.activate(adapter)
            self._active_adapter = adapter
        return self.model(ids, attention_mask=mask, kv_cache=view)

    def _prefill(self, admitted: list[_Seq]) -> None:
        by_adapter: OrderedDict[str | None, _Round] = OrderedDict()
        leaders: dict[tuple[int, int], _Seq] = {}
        for s in admitted:
            rnd = by_adapter.setdefault(s.adapter, _Round())
            key = (s.request.id, s.prompt_index)
            if key in leaders:
                rnd.followers.append((s, leaders[key]))
            else:
                leaders[key] = s
                rnd.leaders.append(s)
        to_pool: list[_Seq] = []
        for adapter, rnd in by_adapter.items():
            start = self._reserve(adapter, len(rnd.leaders) + len(rnd.followers))
            for i, s in enumerate([*rnd.leaders, *(f for f, _ in rnd.followers)]):
                s.row = start + i
                self.rows[s.row] = s
            try:
                firsts = self._prefill_group(adapter, rnd, to_pool)
            except Exception as e:
                for s in [*rnd.leaders, *(f for f, _ in rnd.followers)]:
                    self._fail(s.request, 500, f"internal error: {type(e).__name__}: {e}")
                    self._release(s)
                continue
            self._emit_many(firsts)
        if self.pool_rows:
            for s in to_pool:
                if s.row >= 0:
                    self._pool_store(s)
        self._drop_done()

    def _prefill_group(self, adapter, rnd: _Round, to_pool: list[_Seq]):
        """Prefill the leaders (batched), copy prompts to followers; return [(seq, logits (V,))]."""
        plans = []
        for s in rnd.leaders:
            src, m = (-1, 0) if (s.params.prompt_logprobs or not self.pool_rows) else self._pool_lookup(s)
            plans.append((s, src, m))
        # batches of rows with contiguous row numbers, sorted by suffix length (little padding); a row
        # must keep room for its budget after the batch's padding, and a sliding window needs no holes
        plans.sort(key=lambda plan: len(plan[0].prompt) - plan[2])
        rows = sorted(s.row for s in rnd.leaders)
        batches: list[list] = []
        for plan in plans:
            s, _, m = plan
            T = len(s.prompt) - m
            if batches:
                batch = batches[-1]
                fits = all(pm + T + ps.budget <= self.max_len for ps, _, pm in batch)
                same = not self.sliding or len(batch[0][0].prompt) - batch[0][2] == T
                if fits and same:
                    batch.append(plan)
                    continue
            batches.append([plan])
        firsts: list[tuple[_Seq, torch.Tensor | None]] = []
        it = iter(rows)
        for batch in batches:
            for plan in batch:  # reassign rows in batch order so each batch is contiguous
                s = plan[0]
                s.row = next(it)
                self.rows[s.row] = s
            firsts += self._prefill_batch(adapter, batch)
            to_pool += [plan[0] for plan in batch]
        by_leader = {id(s): logits for s, logits in firsts}
        for f, leader in rnd.followers:
            self.cache.reset(f.row)
            self.cache.copy_prefix(leader.row, f.row, len(f.prompt))
            f.result.prompt_logprobs = leader.result.prompt_logprobs
            f.result.prompt_top_logprobs = leader.result.prompt_top_logprobs
            f.prefix_len = leader.prefix_len
            firsts.append((f, by_leader[id(leader)]))
        return firsts

    def _prefill_batch(self, adapter, batch) -> list[tuple[_Seq, torch.Tensor]]:
        t0 = time.perf_counter()
        for s, src, m in batch:
            self.cache.reset(s.row)
            if m:
                self.cache.copy_prefix(src, s.row, m)
            s.prefix_len = m
        suffixes = [s.prompt[m:] for s, _, m in batch]
        T = max(len(x) for x in suffixes)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, x in enumerate(suffixes):
            ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, : len(x)] = 1
            batch[b][0].holes = len(x) < T
        ids, mask = ids.to(self.device), mask.to(self.device)
        r0 = batch[0][0].row
        view = self.cache.view(r0, r0 + len(batch))
        hidden = self._forward(adapter, ids, mask, view)  # (B, T, D)
        lens = torch.tensor([len(x) for x in suffixes], device=self.device)
        last = self.model.logits(hidden[torch.arange(len(batch), device=self.device), lens - 1])  # (B, V)
        for b, (s, _, _) in enumerate(batch):
            if s.params.prompt_logprobs:
                self._score_prompt(s, hidden[b, : len(suffixes[b])])
        self.stats.prefills += 1
        hits = sum(m for _, _, m in batch)
        self.stats.prefix_hit_tokens += hits
        if hits:
            self.observe("prefix_cache_hit_tokens_total", hits)
        self.stats.prompt_tokens_computed += sum(len(x) for x in suffixes)
        self.observe("prefill_seconds", time.perf_counter() - t0)
        return [(s, last[b]) for b, (s, _, _) in enumerate(batch)]

    def _score_prompt(self, s: _Seq, hidden: torch.Tensor) -> None:
        """Log-probability of each prompt token given the ones before it (echo; the first is None)."""
        logprobs = F.log_softmax(self.model.logits(hidden[:-1]).float(), dim=-1)  # (T-1, V)
        ids = torch.tensor(s.prompt[1:], device=logprobs.device)
        s.result.prompt_logprobs = [None, *logprobs.gather(-1, ids[:, None])[:, 0].tolist()]
        k = s.params.top_logprobs
        if k:
            s.result.prompt_top_logprobs = [None, *top_alternatives(logprobs, k)]

    # ---------------------------------------------------------------------------------------------
    # Decode

    def _decode(self) -> None:
        self.stats.steps += 1
        n = self.running
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, n)
        self.observe("batch_size", n)
        start = 0
        chosen: list[tuple[_Seq, torch.Tensor]] = []
        for adapter, count in list(self.groups.items()):
            seqs = self.rows[start : start + count]
            view = self.cache.view(start, start + count, all_valid=not any(s.holes for s in seqs))
            tokens = torch.tensor([s.next_token for s in seqs], dtype=torch.long, device=self.device)
            hidden = self._forward(adapter, tokens[:, None], None, view)  # (B, 1, D)
            logits = self.model.logits(hidden[:, -1])  # (B, V)
            chosen += [(s, logits[b]) for b, s in enumerate(seqs)]
            start += count
        self._emit_many(chosen)
        self._drop_done()

    def _emit_many(self, pairs: list[tuple[_Seq, torch.Tensor]]) -> None:
        """Choose each sequence's next token from its logits, update its text, tell its request."""
        pairs = [(s, logits) for s, logits in pairs if not s.done]
        if not pairs:
            return
        finished_now = [s for s, _ in pairs if s.budget == 0]
        for s in finished_now:  # max_tokens 0 (or no room): the prompt alone (echo / scoring)
            self._complete(s, "length")
        pairs = [(s, logits) for s, logits in pairs if not s.done]
        if not pairs:
            return
        logits = torch.stack([x for _, x in pairs]).float()  # (B, V)
        greedy = logits.argmax(-1).tolist()
        need_lp = any(s.params.logprobs for s, _ in pairs)
        logprobs = F.log_softmax(logits, dim=-1) if need_lp else None
        now = time.perf_counter()
        for b, (s, _) in enumerate(pairs):
            p = s.params
            if p.greedy and s.seen is None and s.out_counts is None:
                token = greedy[b]
            else:
                processed = process_logits(logits[b : b + 1], p, s.seen, s.out_counts)
                token = int(sample(processed, p, [s.generator] if s.generator is not None else None)[0])
            if s.seen is not None:
                s.seen[0, token] = True
            if s.out_counts is not None:
                s.out_counts[0, token] += 1
            lp = top = None
            if p.logprobs:
                lp = float(logprobs[b, token])
                s.result.logprobs.append(lp)
                if p.top_logprobs:
                    top = top_alternatives(logprobs[b : b + 1], p.top_logprobs)[0]
                    s.result.top_logprobs.append(top)
            s.result.tokens.append(token)
            self._after_token(s, token, lp, top, now)

    def _after_token(self, s: _Seq, token: int, lp, top, now: float) -> None:
        r, req = s.result, s.request
        if req.first_token_at is None:
            req.first_token_at = now
            self.observe("time_to_first_token_seconds", now - req.arrival)
        elif s.last_token_at:
            self.observe("inter_token_latency_seconds", now - s.last_token_at)
        s.last_token_at = now
        ended = None
        piece = ""
        if token in s.stop_ids:
            ended = "stop"
            if s.text is not None:
                piece = s.text.push(None, final=True)[0]
        elif len(r.tokens) >= s.budget:
            ended = "length"
            if s.text is not None:
                piece = s.text.push(token, final=True)[0]
        elif s.text is not None:
            piece, hit = s.text.push(token, final=False)
            if hit:
                ended = "stop"
                piece += s.text.push(None, final=True)[0]
        s.next_token = token
        if not req.failed and not req.cancelled:
            delta = Delta(s.index, piece, token, lp, top)
            if len(r.tokens) == 1:
                delta.prompt_logprobs, delta.prompt_top_logprobs = r.prompt_logprobs, r.prompt_top_logprobs
            req.on_event(delta)
        if ended:
            self._complete(s, ended)

    def _complete(self, s: _Seq, reason: str) -> None:
        r = s.result
        r.finish_reason = reason
        if s.text is not None:
            r.text = s.text.text
        s.done = True
        s.request.remaining -= 1
        if not s.request.failed and not s.request.cancelled:
            s.request.on_event(Done(s.index, r))

    def _drop_done(self) -> None:
        for s in [s for s in self._active() if s.done]:
            self._release(s)
