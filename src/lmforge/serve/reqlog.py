"""An opt-in request log in SQLite, for monitoring after the fact: one row per API request with its
timing, token counts, model/adapter and status. Prompts are not stored unless asked for (`log_prompts`);
without that the `prompt` column holds NULL.

    sqlite3 requests.db "select route, status, avg(latency_s) from requests group by 1, 2"
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
create table if not exists requests (
    id text primary key,
    time real not null,          -- unix time of arrival
    route text not null,
    model text,
    adapter text,
    status integer not null,
    stream integer not null default 0,
    n integer,
    prompt_tokens integer,
    completion_tokens integer,
    ttft_s real,                 -- time to the first token
    latency_s real,              -- time to the whole answer
    finish_reasons text,         -- JSON list
    user text,
    error text,
    prompt text                  -- NULL unless the server runs with log_prompts
)
"""


class RequestLog:
    def __init__(self, path: str | Path, log_prompts: bool = False):
        self.path = Path(path)
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute(_SCHEMA)

    def record(self, **row) -> None:
        if not self.log_prompts:
            row["prompt"] = None
        elif row.get("prompt") is not None and not isinstance(row["prompt"], str):
            row["prompt"] = json.dumps(row["prompt"], ensure_ascii=False)
        row.setdefault("time", time.time())
        if isinstance(row.get("finish_reasons"), list):
            row["finish_reasons"] = json.dumps(row["finish_reasons"])
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._db.execute(
                f"insert or replace into requests ({columns}) values ({marks})", list(row.values())
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
