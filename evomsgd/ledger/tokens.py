"""API tokens: made here, shown once, kept in the ledger only as a SHA-256, checked per request."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence

from evomsgd import clock, egress
from evomsgd.errors import TokenError
from evomsgd.ledger import callbacks
from evomsgd.ledger.records import TokenRow
from evomsgd.ledger.store import Store

PREFIX = "evm_"  # lets secret scanners (and people) recognise a leaked evomsgd token
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
INSTANCE = re.compile(r"^[^\x00-\x1f/\\?#%,]{1,100}$")
# A token created or revoked with the CLI takes effect in the daemon within this many seconds.
CACHE_TTL = 1.0


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """The hex SHA-256 the ledger keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "backslashreplace")).hexdigest()


def match(rows: Sequence[TokenRow], presented: str) -> TokenRow | None:
    """The token row whose hash equals the presented token's, compared in constant time."""
    wanted = digest(presented)
    found = None
    for row in rows:  # no early exit: the time taken does not depend on which row matches
        if hmac.compare_digest(row.sha256, wanted):
            found = row
    return found


def create(store: Store, name: str, instances: Sequence[str] = ()) -> str:
    """Store a new token's hash under `name`; returns the token (the only time it is seen)."""
    if not NAME.match(name):
        raise TokenError(
            f"token name {name!r} is not allowed - use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    for instance in instances:
        if not INSTANCE.match(instance):
            raise TokenError(
                f"instance {instance!r} is not a valid instance name - no commas, slashes "
                "or control characters, at most 100 characters"
            )
    token = new_token()
    if not store.add_token(name, digest(token), sorted(set(instances)), clock.now()):
        raise TokenError(
            f"a token named {name!r} already exists - revoke it first "
            f"(`evomsgd token revoke {name}`) or pick another name"
        )
    return token


def revoke(store: Store, name: str) -> None:
    """Delete the token called `name`; requests with it fail from the next cache refresh on."""
    if not store.revoke_token(name):
        raise TokenError(f"no token named {name!r} - see `evomsgd token list`")
    # Its callback endpoint goes with it: a new token of that name must not inherit it.
    callbacks.remove_endpoint(store, callbacks.token_endpoint(name))


class TokenCache:
    """The tokens table as the daemon sees it: re-read at most every CACHE_TTL seconds.

    The CLI writes the table directly (daemon up or down), so the daemon must notice changes
    without a restart; a short TTL costs one indexed read a second under load.
    """

    def __init__(self, store: Store, ttl: float = CACHE_TTL) -> None:
        self.store = store
        self.ttl = ttl
        self._rows: list[TokenRow] = []
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def rows(self) -> list[TokenRow]:
        """Every token; a blocking read (in a thread) only when the copy is older than the TTL."""
        if time.monotonic() - self._read_at < self.ttl:
            return self._rows
        async with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                self._rows = await asyncio.to_thread(self.store.tokens)
                self._read_at = time.monotonic()
        return self._rows


def create_with_callback(
    store: Store, name: str, instances: Sequence[str], callback_url: str
) -> tuple[str, str]:
    """`create`, with the token's own callback endpoint; returns (token, callback secret), both
    shown this once. A token's messages are then called back there only."""
    try:
        egress.parse(callback_url)
    except egress.UrlError as exc:
        raise TokenError(f"--callback-url: {exc}") from None
    token = create(store, name, instances)
    secret = callbacks.new_secret()
    try:
        callbacks.add_endpoint(
            store, callbacks.token_endpoint(name), callback_url, secret, clock.now()
        )
    except BaseException:
        store.revoke_token(name)  # all or nothing: no token without the endpoint it was made for
        raise
    return token, secret
