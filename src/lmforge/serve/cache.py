"""An exact-match response cache for deterministic requests (temperature 0, or a fixed seed), bounded
by entries and by bytes. The KV prefix pool (engine.py) covers prompts that share only a beginning."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict


class ResponseCache:
    def __init__(self, max_entries: int = 256, max_bytes: int = 16 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[dict, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return json.loads(json.dumps(hit[0]))  # a copy: the caller changes id and created

    def put(self, key: str, value: dict) -> None:
        if self.max_entries <= 0:
            return
        size = len(json.dumps(value))
        if size > self.max_bytes // 4:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old

    def __len__(self) -> int:
        return len(self._items)
