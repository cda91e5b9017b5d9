"""Downloading a media URL when a message is accepted (`fetch`), within the operator's allow-list
(`egress`), without redirects, under a size limit enforced while the bytes stream in, and within
one overall timeout."""

from __future__ import annotations

import asyncio

import aiohttp

from evomsgd import egress

SETTING = "EVOMSGD_MEDIA_FETCH_ALLOWED"
_CHUNK = 64 * 1024


class FetchError(Exception):
    """The download failed; `str()` says why in words the client can act on."""


class FetchTooLarge(FetchError):
    """The file is over the limit (said by Content-Length, or counted while streaming)."""


async def fetch(url: str, prefixes: tuple[str, ...], *, limit: int, timeout: float) -> bytes:
    """The bytes at `url` if the allow-list permits it and they fit in `limit`; else FetchError."""
    try:
        egress.check(url, prefixes, SETTING)
    except egress.UrlError as exc:
        raise FetchError(str(exc)) from None
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            if resp.status != 200:
                where = resp.headers.get("Location")
                moved = f" (a redirect to {where!r}, not followed)" if where else ""
                raise FetchError(f"{url!r} answered HTTP {resp.status}{moved}")
            if resp.content_length is not None and resp.content_length > limit:
                raise FetchTooLarge(f"{url!r} is {resp.content_length} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise FetchTooLarge(f"{url!r} is over {limit} bytes")
            return bytes(body)
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError(f"{url!r} did not download within {timeout:g}s") from None
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        raise FetchError(f"{url!r} could not be downloaded ({type(exc).__name__})") from None
