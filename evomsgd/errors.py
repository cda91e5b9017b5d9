"""The exceptions evomsgd raises; translated to HTTP or CLI output only at the edges."""

from __future__ import annotations

from typing import Any


class EvomsgdError(Exception):
    """Base class: `str(exc)` says what failed, the offending value and what to do next."""

    exit_code = 1


class ConfigError(EvomsgdError):
    """The configuration cannot work (missing URL, bad value, unsafe bind)."""

    exit_code = 2


class DataDirError(EvomsgdError):
    """The data directory is missing, unwritable or already used by another daemon."""

    exit_code = 2


class TokenError(EvomsgdError):
    """A token command cannot do what it was asked (bad or taken name, unknown token)."""


class DomainError(EvomsgdError):
    """Something the daemon was asked that it cannot do; each edge maps the kind to its own terms.

    `code` is stable and machine-readable; `retry_after` (seconds) is set when trying again later
    can succeed.
    """

    code = "error"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class NotFound(DomainError):
    """No such task (or other named thing)."""

    code = "not_found"


class Conflict(DomainError):
    """The thing exists but is in a state that forbids the request (too late to cancel, ...)."""

    code = "conflict"


class InvalidInput(DomainError):
    """The request's values break a rule; `details` names each field and what is wrong with it."""

    code = "validation_error"

    def __init__(self, details: list[dict[str, Any]], message: str | None = None) -> None:
        super().__init__(message or summary(details))
        self.details = details


class TooLarge(DomainError):
    """A media file over EVOMSGD_MAX_MEDIA_BYTES (HTTP 413)."""

    code = "media_too_large"


class Backpressure(DomainError):
    """Accepting now would queue more than an instance can send in time; retry after a while."""

    code = "queue_full"


class ShuttingDown(DomainError):
    """The daemon is draining and accepts nothing new."""

    code = "shutting_down"


class StoreUnavailable(DomainError):
    """The ledger cannot be written right now (locked, disk full, read-only); try again."""

    code = "store_unavailable"


def summary(details: list[dict[str, Any]]) -> str:
    """The one "field: message; field: message" summary of validation problems."""
    return "; ".join(
        f"{d['field']}: {d['message']}" if d.get("field") else str(d["message"]) for d in details
    )


class ApiError(EvomsgdError):
    """An HTTP-level refusal with its status and the one JSON body shape (`web.errors`); raised
    only by the web room, for what is not a domain error (bad JSON, auth, browser guards)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}


class DaemonUnreachable(EvomsgdError):
    """The CLI could not reach a running daemon."""

    exit_code = 2
