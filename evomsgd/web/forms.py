"""POST /messages as multipart/form-data (`curl -F file=@invoice.pdf -F phone=...`), and the body
limits of media requests: the text limit stays 64 KiB; only a request that carries a file may be
larger, and never more than EVOMSGD_MAX_MEDIA_BYTES allows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import BodyPartReader, web

from evomsgd.config import Settings
from evomsgd.errors import ApiError, TooLarge
from evomsgd.web.errors import body_too_slow

# Every body without a file (and a form's fields all together) stays under this.
MAX_TEXT_BODY = 64 * 1024
_CHUNK = 64 * 1024
# Form fields that describe the file; the rest are SendRequest's own.
_MEDIA_FIELDS = ("type", "filename", "mimetype", "caption")
# curl and browsers label a file they cannot place as this: no information, so not a mimetype.
_UNLABELLED = "application/octet-stream"


def media_body_limit(settings: Settings) -> int:
    """The largest JSON body of a media request: the file in base64 (4 characters per 3 bytes)
    plus room for the other fields."""
    return -(-settings.max_media_bytes // 3) * 4 + MAX_TEXT_BODY


async def read_form(
    request: web.Request, settings: Settings
) -> tuple[dict[str, Any], bytes | None]:
    """The form as a SendRequest payload (the `file` part's description under `media`) and the
    file's bytes (None without a `file` part); 413 past the limits, 408 when it trickles in."""
    timeout = settings.idle_timeout
    try:
        async with asyncio.timeout(timeout):
            fields, upload, name, label = await _parts(request, settings.max_media_bytes)
    except TimeoutError:
        raise body_too_slow(timeout) from None
    except ValueError as exc:  # aiohttp's multipart parser: a malformed body
        raise ApiError(400, "invalid_form", f"the multipart body is malformed ({exc})") from None
    payload: dict[str, Any] = {k: v for k, v in fields.items() if k not in _MEDIA_FIELDS}
    if upload is not None:
        media = {k: fields[k] for k in _MEDIA_FIELDS if k in fields}
        media.setdefault("type", "document")
        if name and "filename" not in media:
            media["filename"] = name
        if label and label != _UNLABELLED and "mimetype" not in media:
            media["mimetype"] = label
        payload["media"] = media
    return payload, upload


async def _parts(
    request: web.Request, limit: int
) -> tuple[dict[str, str], bytes | None, str | None, str | None]:
    reader = await request.multipart()
    fields: dict[str, str] = {}
    upload: bytes | None = None
    name = label = None
    text_size = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "invalid_form", "nested multipart bodies are not accepted")
        if part.name == "file":
            if upload is not None:
                raise ApiError(400, "invalid_form", "send one file part per message")
            upload = await _read_part(part, limit, _file_too_large)
            name, label = part.filename, part.headers.get("Content-Type")
            continue
        value = await _read_part(part, MAX_TEXT_BODY - text_size, _fields_too_large)
        text_size += len(value)
        if part.name:
            try:
                fields[part.name] = value.decode(part.get_charset("utf-8"))
            except (UnicodeDecodeError, LookupError):
                raise ApiError(
                    400, "invalid_form", f"form field {part.name!r} is not UTF-8 text"
                ) from None
    return fields, upload, name, label


async def _read_part(
    part: BodyPartReader, limit: int, too_large: Callable[[int], Exception]
) -> bytes:
    """The part's bytes, refused as soon as they pass `limit`."""
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise too_large(limit)
    return bytes(data)


def _file_too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"media is over {limit} bytes; at most {limit} are accepted (EVOMSGD_MAX_MEDIA_BYTES)"
    )


def _fields_too_large(limit: int) -> web.HTTPRequestEntityTooLarge:
    """The form's text fields together are held to the text body limit."""
    return web.HTTPRequestEntityTooLarge(max_size=MAX_TEXT_BODY, actual_size=MAX_TEXT_BODY + 1)
