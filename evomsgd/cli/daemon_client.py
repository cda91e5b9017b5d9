"""A small synchronous HTTP client the CLI uses to talk to a running daemon."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from evomsgd.errors import DaemonUnreachable


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


class DaemonClient:
    """JSON over HTTP to evomsgd; raises DaemonUnreachable when nothing answers."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """Send one request; HTTP errors are returned as replies, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None or method not in ("GET", "HEAD"):
            # The daemon takes POST/DELETE only as JSON: that is what stops cross-site form posts.
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return Reply(resp.status, _decode(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, _decode(exc.read()), dict(exc.headers))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DaemonUnreachable(
                f"no evomsgd answering at {self.base_url} ({reason}) - is `evomsgd serve` "
                "running? (set EVOMSGD_URL or --url if it listens elsewhere)"
            ) from None


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return {"raw": raw.decode("utf-8", "replace")}


def error_text(reply: Reply) -> str:
    """The message of an error reply in the daemon's one error shape."""
    body = reply.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{reply.status} {body['error'].get('code')}: {body['error'].get('message')}"
    return f"HTTP {reply.status}: {body}"
