"""API keys: `Authorization: Bearer <key>` on every /v1 route when keys are configured.

Keys come from a file, one per line (blank lines and `#` comments ignored). Each presented key is
compared with every configured key in constant time (`hmac.compare_digest`), so neither a match's
position nor a common prefix shows in the response time.
"""

from __future__ import annotations

import hmac
from pathlib import Path


class AuthError(Exception):
    pass


def load_api_keys(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise AuthError(f"{path}: no such API key file")
    keys = [line.strip() for line in path.read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise AuthError(f"{path}: no API key in the file")
    if any(len(k) < 8 for k in keys):
        raise AuthError(f"{path}: API keys must have at least 8 characters")
    return keys


def bearer_ok(authorization: str | None, keys: list[str]) -> bool:
    """Whether an Authorization header carries one of `keys` (always True without keys)."""
    if not keys:
        return True
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    presented_bytes = presented.strip().encode()
    ok = False
    for key in keys:  # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(presented_bytes, key.encode())
    return ok
