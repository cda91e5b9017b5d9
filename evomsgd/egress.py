"""Which outbound URLs the operator allowed: the one rule for callbacks, relays and media fetches.

A message body must never make the daemon call an arbitrary address (SSRF). An operator allows
URL prefixes (`https://hooks.example.com/`, `http://10.0.0.5:8080/app`); a URL is allowed when it
is `http` or `https`, carries no user name or password, and starts with one of the prefixes at a
boundary, compared on the parsed parts so `https://hooks.example.com.evil.org` never matches
`https://hooks.example.com`. Redirects are not followed by any caller (a redirect would leave the
allowed prefix), so the rule is checked once, on the URL itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlError(ValueError):
    """The URL cannot be used for an outbound call; `str()` says why in words a user can act on."""


def parse(url: str) -> SplitResult:
    """The parsed URL if it can be called at all (scheme, host, no credentials); else `UrlError`."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError on a port that is not a number or out of range
    except ValueError as exc:
        raise UrlError(f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise UrlError(f"{url!r} must start with http:// or https://")
    if not parts.hostname:
        raise UrlError(f"{url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlError(f"{url!r} must not carry a user name or password")
    del port
    return parts


def _key(parts: SplitResult) -> tuple[str, str, int]:
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    return parts.scheme, (parts.hostname or "").lower(), port


def matches(url: str, prefix: str) -> bool:
    """True when `url` lies under `prefix`: same scheme, host and port, and a path under its path."""
    try:
        target, allowed = parse(url), parse(prefix)
    except UrlError:
        return False
    if _key(target) != _key(allowed):
        return False
    base = allowed.path
    if not base or base == "/":
        return True
    path = target.path or "/"
    if base.endswith("/"):
        return path.startswith(base)
    return path == base or path.startswith(base + "/")


def allowed(url: str, prefixes: Iterable[str]) -> bool:
    """True when `url` can be called and matches one of the operator's `prefixes`."""
    try:
        parse(url)
    except UrlError:
        return False
    return any(matches(url, prefix) for prefix in prefixes)


def check(url: str, prefixes: Iterable[str], setting: str) -> str:
    """`url` if allowed, else `UrlError` naming the setting that would allow it."""
    parse(url)
    prefixes = list(prefixes)
    if not any(matches(url, prefix) for prefix in prefixes):
        if not prefixes:
            raise UrlError(
                f"{url!r} is not allowed: {setting} is empty - add a prefix of this URL to it"
            )
        raise UrlError(f"{url!r} is not allowed: it matches no prefix in {setting}")
    return url
