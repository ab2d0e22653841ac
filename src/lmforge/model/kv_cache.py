"""A preallocated key/value cache with one row (slot) per sequence, each with its own length.

Layout per layer: keys and values (B, G, S, hd) for B rows, G key/value heads, S slots, head size hd.
Each row also has:
  * `lengths[b]`: the next free slot (tokens written so far, padding included);
  * `valid[b, s]`: whether slot s holds a real token (False for left padding and for reset slots);
  * `seen[b]`: real tokens so far, which is the next position id when positions are not given.
The attention mask of a step is derived from these: a query in slot i sees key slot j iff valid[j] and
j <= i (and i - j < window for sliding-window layers). So left-padded batches, rows that started at
different times (continuous batching) and shared prefixes are all the same mechanism.

With `static=True` every step attends over all S slots and writes through tensor indices, so a decode
step has the same shapes and no host-side values every time: what `torch.compile` needs to trace it
once. The eager default attends only over the slots in use, which is faster without compilation.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        static: bool = False,
    ):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._host_lengths = [0] * batch_size  # a host mirror of `lengths`: no device sync to plan a step
        self.all_valid = True  # host-side: no padding or reset slot below any row's length
        self.batch_size, self.max_len = batch_size, max_len
        self.static = static
        self._pending: tuple[int | None, torch.Tensor | None, int] | None = None
        self._parent: tuple[KVCache, int] | None = None  # set on a view(): (the cache, first row)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, static: bool = False) -> KVCache:
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, batch_size, max_len, c.n_kv_head, c.head_dim, p.dtype, p.device, static)

    @classmethod
    def wrap(cls, keys, values, valid, lengths, seen) -> KVCache:
        """A static cache over existing tensors (used inside a compiled decode step)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.valid, cache.lengths, cache.seen = keys, values, valid, lengths, seen
        cache.batch_size, cache.max_len = valid.shape
        cache.static, cache._pending, cache._host_lengths, cache.all_valid = True, None, [], False
        cache._parent = None
        return cache

    def view(self, start: int, stop: int, all_valid: bool = False) -> KVCache:
        """Rows start..stop-1 as a cache that shares this one's storage: a forward over the view writes
        into these rows. A server steps only the rows in use (continuous batching) this way.
        all_valid: the caller knows these rows have no padding or reset slot below their lengths."""
        cache = KVCache.__new__(KVCache)
        cache.keys = [k[start:stop] for k in self.keys]  # slicing dim 0: views, not copies
        cache.values = [v[start:stop] for v in self.values]
        cache.valid, cache.lengths = self.valid[start:stop], self.lengths[start:stop]
        cache.seen = self.seen[start:stop]
        cache._host_lengths = self._host_lengths[start:stop]
        cache.all_valid, cache.batch_size, cache.max_len = all_valid, stop - start, self.max_len
        cache.static, cache._pending, cache._parent = False, None, (self, start)
        return cache

    def tensors(self) -> tuple:
        return self.keys, self.values, self.valid, self.lengths, self.seen

    # ---------------------------------------------------------------------------------------------
    # The model calls begin() once per forward, update() once per layer, commit() at the end.
    def begin(self, n_new: int, new_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve `n_new` slots in every row; return (query_slots (B, T), key_valid (B, end))."""
        if self.static:
            slots = self.lengths[:, None] + torch.arange(n_new, device=self.lengths.device)  # (B, T)
            self.valid.scatter_(1, slots, True if new_valid is None else new_valid)
            self._pending = (None, slots, n_new)
            return slots, self.valid
        starts = self._host_lengths
        end = max(starts) + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} slots needed, {self.max_len} allocated")
        device = self.lengths.device
        offsets = torch.arange(n_new, device=device)
        slots = self.lengths[:, None] + offsets  # (B, T)
        uniform = all(s == starts[0] for s in starts)
        if not uniform or (new_valid is not None and not bool(new_valid.all())):
            self.all_valid = False
        if uniform:
            s0 = starts[0]
            self.valid[:, s0 : s0 + n_new] = True if new_valid is None else new_valid
            self._pending = (s0, None, n_new)
        else:
            rows = torch.arange(self.batch_size, device=device)[:, None]
            self.valid[rows, slots] = True if new_valid is None else new_valid
            self._pending = (None, slots, n_new)
        return slots, self.valid[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, G, T, hd) into layer `layer`; return all keys/values up to the end."""
        s0, slots, n_new = self._pending
        kc, vc = self.keys[layer], self.values[layer]
        if s0 is not None:
            kc[:, :, s0 : s0 + n_new] = k
            vc[:, :, s0 : s0 + n_new] = v
        else:
            rows = torch.arange(self.batch_size, device=kc.device)[:, None]
            kc[rows, :, slots] = k.transpose(1, 2)  # advanced indices first: (B, T, G, hd)
            vc[rows, :, slots] = v.transpose(1, 2)
        if self.static:
            return kc, vc
        end = max(self._host_lengths) + n_new
        return kc[:, :, :end], vc[:, :, :end]

    def commit(self, n_real: torch.Tensor) -> None:
        """Advance every row by the slots reserved in begin(); `n_real` (B,) real tokens among them."""
        _, _, n_new = self._pending
        self.lengths += n_new
        if not self.static:
            self._host_lengths = [n + n_new for n in self._host_lengths]
        self.seen += n_real
        self._pending = None
        if self._parent is not None:  # a view: the parent's host mirror follows
            parent, start = self._parent
            parent._host_lengths[start : start + self.batch_size] = self._host_lengths

    # ---------------------------------------------------------------------------------------------
    # Slot management (continuous batching, prefix caching).
    def reset(self, row: int) -> None:
        """Empty one row so a new sequence can start in it."""
        self.all_valid = False
        self.valid[row] = False
        self.lengths[row] = 0
        self.seen[row] = 0
        self._host_lengths[row] = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make row `dst` start with the first n slots of row `src` (a shared prompt prefix)."""
        for kc, vc in zip(self.keys, self.values):
            kc[dst, :, :n] = kc[src, :, :n]
            vc[dst, :, :n] = vc[src, :, :n]
        self.all_valid = False
        self.valid[dst] = False
        self.valid[dst, :n] = self.valid[src, :n]
        self.lengths[dst] = n
        self.seen[dst] = self.valid[src, :n].sum()
        self._host_lengths[dst] = n

    def select_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), e.g. to drop finished sequences from a batch."""
        index = torch.tensor(rows, device=self.lengths.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.valid = self.valid.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.seen = self.seen.index_select(0, index)
        self._host_lengths = [self._host_lengths[r] for r in rows]
        self.batch_size = len(rows)
