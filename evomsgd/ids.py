"""Task ids: UUID version 7 (RFC 9562), time-ordered so the ledger's id index grows at one end.

Random (version 4) ids land on a random page of the `messages.id` index: with a million rows
that index no longer fits SQLite's page cache and each insert costs a page read. Version 7 ids
start with the creation time in milliseconds, so new ids sort after old ones, and keep 74
random bits: a client still cannot guess another client's task id. They are ordinary UUID
strings, as the old Celery stack's task ids were.
"""

from __future__ import annotations

import os
import threading
import time

_POOL_BYTES = 4096  # random bytes fetched per getrandom() call: one call per ~400 ids


class _Entropy:
    """os.urandom in bulk: the same CSPRNG bytes, without a system call per task id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._at + n > len(self._pool):
                self._pool, self._at = os.urandom(_POOL_BYTES), 0
            chunk = self._pool[self._at : self._at + n]
            self._at += n
            return chunk


_entropy = _Entropy()


def task_id(at: float | None = None) -> str:
    """A new UUIDv7 string for a message created at `at` (Unix seconds; now by default)."""
    ms = int((time.time() if at is None else at) * 1000)
    raw = bytearray(ms.to_bytes(6, "big") + _entropy.take(10))
    raw[6] = (raw[6] & 0x0F) | 0x70  # version 7
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    h = raw.hex()  # what str(uuid.UUID(bytes=raw)) gives, at a third of the cost
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
