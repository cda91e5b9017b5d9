"""What a media attachment may be: its declared type held against its bytes, its mimetype and file
name. Pure rules, no I/O; the bytes' format is read from their magic numbers by `filetype`."""

from __future__ import annotations

import base64
import binascii
import mimetypes
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

import filetype

# What Evolution's sendMedia takes as `mediatype` (models.MediaIn.type).
MediaKind = Literal["image", "document", "video", "audio"]

# Evolution sends these with its defaults when no file name is given; documents get one derived
# from the mimetype (Evolution refuses a base64 document without one).
DEFAULT_STEM: dict[str, str] = {
    "image": "image",
    "document": "document",
    "video": "video",
    "audio": "audio",
}
FALLBACK_MIMETYPE = "application/octet-stream"

# The built-in table only: the system's /etc/mime.types differs between machines, and the
# PyInstaller binary must answer as the tests did.
_TABLE = mimetypes.MimeTypes(filenames=())
# What the built-in table lacks among the formats people send on WhatsApp.
for _mime, _ext in (
    ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", ".docx"),
    ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", ".xlsx"),
    ("application/vnd.openxmlformats-officedocument.presentationml.presentation", ".pptx"),
    ("audio/ogg", ".ogg"),
    ("audio/ogg", ".opus"),
    ("audio/mp4", ".m4a"),
    ("audio/aac", ".aac"),
    ("audio/amr", ".amr"),
    ("image/webp", ".webp"),
):
    _TABLE.add_type(_mime, _ext)
# filetype reads the first 8 KiB at most (its `_NUM_SIGNATURE_BYTES`).
_HEAD = 8192
# Formats that are programs: never sent to a recipient, whatever they are declared as.
_PROGRAMS = frozenset(
    {
        "application/x-executable",  # ELF
        "application/x-msdownload",  # PE (Windows .exe, .dll)
        "application/wasm",
        "application/x-shockwave-flash",
        "application/x-google-chrome-extension",
        "application/x-nintendo-nes-rom",
    }
)
# Formats filetype knows by their magic: a file declared as one of them must carry it.
_DETECTABLE = frozenset(kind.mime for kind in filetype.types)
# Office and e-book formats are zip files: filetype may see only the zip.
_ZIP_FAMILY = frozenset(
    {
        "application/zip",
        "application/epub+zip",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
        "application/vnd.oasis.opendocument.presentation",
    }
)
_FAMILIES = ("image/", "video/", "audio/")


# base64 is converted in slices: the conversion holds the GIL (a thread does not free the event
# loop), and a slice takes milliseconds where a 16 MiB file took a tenth of a second and more.
_SLICE = 3 * 256 * 1024  # bytes per slice: a multiple of 3, so no padding between slices
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def to_base64(data: bytes) -> str:
    """Standard base64 of `data`, in slices (see _SLICE)."""
    return "".join(
        base64.b64encode(data[i : i + _SLICE]).decode("ascii") for i in range(0, len(data), _SLICE)
    )


def from_base64(text: str) -> bytes:
    """The bytes of standard base64 as Evolution takes it (alphabet, length a multiple of 4,
    `=` only as the last one or two characters, no data: prefix, no line breaks), in slices;
    ValueError otherwise."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("not ASCII") from None
    body = raw.rstrip(b"=")
    if len(raw) % 4 or len(raw) - len(body) > 2 or body.translate(None, _B64_ALPHABET):
        raise ValueError("not standard base64")
    step = _SLICE // 3 * 4
    try:
        return b"".join(binascii.a2b_base64(raw[i : i + step]) for i in range(0, len(raw), step))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


class MediaError(ValueError):
    """The media breaks a rule; `field` names the request field, `str()` what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Checked:
    """What is sent to Evolution for bytes that passed `check`."""

    mimetype: str
    filename: str


def sniff(data: bytes) -> str | None:
    """The mimetype the bytes' magic numbers say, or None when they match no known format."""
    if data.startswith(b"#!"):
        return "text/x-shellscript"  # a script is a program too; filetype has no entry
    guessed = filetype.guess_mime(data[:_HEAD])
    return guessed if isinstance(guessed, str) else None


def mimetype_of(filename: str) -> str | None:
    """The mimetype a file name's extension stands for, when it stands for one."""
    guessed, _ = _TABLE.guess_type(PurePosixPath(filename).name, strict=False)
    return guessed


def extension_of(mimetype: str) -> str | None:
    """The usual extension (".pdf") of a mimetype, when it has one."""
    if mimetype == "image/jpeg":
        return ".jpg"  # the table's first pick is ".jpe"
    return _TABLE.guess_extension(mimetype, strict=False)


def _normal(mimetype: str) -> str:
    top, _, sub = mimetype.lower().partition("/")
    return f"{top}/{sub.removeprefix('x-')}"


def _compatible(declared: str, found: str) -> bool:
    """Whether bytes of format `found` may stand for `declared` (same format, or same family:
    WhatsApp re-encodes images and plays any audio; an office file is a zip)."""
    if _normal(declared) == _normal(found):
        return True
    if declared in _ZIP_FAMILY and found in _ZIP_FAMILY:
        return True
    return any(declared.startswith(f) and found.startswith(f) for f in _FAMILIES)


def check(
    kind: str, data: bytes, *, mimetype: str | None = None, filename: str | None = None
) -> Checked:
    """The mimetype and file name to send, or `MediaError` when the bytes are not what the
    request says: a program, an "image" that is no image, a "pdf" that is something else."""
    if not data:
        raise MediaError("media", "is empty: the file has no bytes")
    found = sniff(data)
    if found in _PROGRAMS or found == "text/x-shellscript":
        raise MediaError(
            "media", f"is a program ({found}), not a {kind}: evomsgd does not send executables"
        )
    if kind != "document" and not (found or "").startswith(f"{kind}/"):
        what = found or "of no format evomsgd recognises"
        raise MediaError("media.type", f"is {kind}, but the bytes are {what}")
    by_name = mimetype_of(filename) if filename else None
    for field, declared in (("media.mimetype", mimetype), ("media.filename", by_name)):
        if declared is None:
            continue
        if found is not None and not _compatible(declared, found):
            raise MediaError(field, f"says {declared}, but the bytes are {found}")
        if found is None and declared in _DETECTABLE:
            raise MediaError(field, f"says {declared}, but the bytes are not in that format")
    # The bytes' own format when they show one (a renamed JPEG is still a JPEG); else what the
    # request said.
    final = found if found is not None and kind != "document" else None
    final = final or mimetype or found or by_name or FALLBACK_MIMETYPE
    return Checked(final, _filename(kind, filename, final))


def _filename(kind: str, given: str | None, mimetype: str) -> str:
    """The given name with an extension Evolution can read the type from (it replaces the
    mimetype with the extension's), or one made from the kind and the mimetype."""
    ext = extension_of(mimetype) or ""
    if not given:
        return DEFAULT_STEM.get(kind, "file") + ext
    if not PurePosixPath(given).suffix and ext:
        return given + ext
    return given
