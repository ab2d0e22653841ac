"""An OpenAI-compatible server: continuous batching over per-row KV cache slots, streaming, multi-adapter
routing, embeddings, API keys, limits and metrics. See docs/serve.md.

    from lmforge.serve import ServeSettings, create_app, load_models, RunningServer
    app = create_app(lambda: load_models("ckpt/"), ServeSettings(max_batch=8))
    with RunningServer(app) as server:   # uvicorn on 127.0.0.1, a free port, in a thread
        print(server.url)                # http://127.0.0.1:PORT/v1

Names are imported on first use, so `lmforge --help` (which imports lmforge.serve.cli) stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Models": "lmforge.serve.app",
    "RunningServer": "lmforge.serve.app",
    "ServeSettings": "lmforge.serve.app",
    "create_app": "lmforge.serve.app",
    "load_models": "lmforge.serve.app",
    "Engine": "lmforge.serve.engine",
    "QueueFull": "lmforge.serve.engine",
    "Request": "lmforge.serve.engine",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
