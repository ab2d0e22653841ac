"""Server metrics in Prometheus' text format (version 0.0.4), without a client library.

Counters, gauges and histograms with fixed buckets, named as vLLM names the same quantities where it has
them (`time_to_first_token_seconds`, `inter_token_latency_seconds`, `e2e_request_latency_seconds`).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)  # fmt: skip
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LABELLED = {"requests_total", "errors_total"}  # series appear with their first label values

# name -> (type, help, buckets)
METRICS: dict[str, tuple[str, str, tuple | None]] = {
    "requests_total": ("counter", "HTTP requests answered, by route and status code.", None),
    "errors_total": ("counter", "HTTP requests answered with an error (status >= 400), by route and status.", None),
    "prompt_tokens_total": ("counter", "Prompt tokens processed.", None),
    "completion_tokens_total": ("counter", "Completion tokens generated.", None),
    "prefix_cache_hit_tokens_total": ("counter", "Prompt tokens whose keys/values were copied from the prefix pool.", None),
    "response_cache_hits_total": ("counter", "Requests answered from the exact-match response cache.", None),
    "time_to_first_token_seconds": ("histogram", "Time from arrival to the first generated token.", _LATENCY_BUCKETS),
    "inter_token_latency_seconds": ("histogram", "Time between two tokens of one sequence.", _LATENCY_BUCKETS),
    "e2e_request_latency_seconds": ("histogram", "Time from arrival to the last byte of the answer.", _LATENCY_BUCKETS),
    "prefill_seconds": ("histogram", "Duration of one prefill forward.", _LATENCY_BUCKETS),
    "batch_size": ("histogram", "Sequences in each decode step.", _SIZE_BUCKETS),
    "queue_depth": ("gauge", "Sequences waiting for a row.", None),
    "running_sequences": ("gauge", "Sequences being decoded.", None),
}  # fmt: skip


class Metrics:
    """Thread-safe registry; `render()` gives the /metrics page."""

    def __init__(self, prefix: str = "lmforge_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = defaultdict(float)
        self._hist: dict[str, list] = {}  # name -> [bucket counts..., sum, count]

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[(name, ())] = value

    def observe(self, name: str, value: float) -> None:
        """A histogram observation, the value of a gauge, or an increment of a counter."""
        kind, _, buckets = METRICS[name]
        if kind == "gauge":
            self.set(name, value)
            return
        if kind == "counter":
            self.inc(name, value)
            return
        with self._lock:
            h = self._hist.setdefault(name, [0] * len(buckets) + [0.0, 0])
            for i, bound in enumerate(buckets):
                if value <= bound:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help, buckets) in METRICS.items():
                full = self.prefix + name
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "histogram":
                    h = self._hist.get(name, [0] * len(buckets) + [0.0, 0])
                    for bound, count in zip(buckets, h):
                        lines.append(f'{full}_bucket{{le="{_num(bound)}"}} {count}')
                    lines += [f'{full}_bucket{{le="+Inf"}} {h[-1]}', f"{full}_sum {_num(h[-2])}",
                              f"{full}_count {h[-1]}"]  # fmt: skip
                    continue
                series = [(labels, v) for (n, labels), v in self._values.items() if n == name]
                if not series and name not in _LABELLED:
                    series = [((), 0.0)]
                for labels, value in sorted(series):
                    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(
                        f"{full}{{{label_text}}} {_num(value)}" if labels else f"{full} {_num(value)}"
                    )
        return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if x != int(x) else str(int(x))


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
