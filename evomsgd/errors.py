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


class StoreUnavailable(EvomsgdError):
    """The ledger cannot be written right now (locked, disk full, read-only); try again."""


class ApiError(EvomsgdError):
    """An error with an HTTP status and one JSON body shape (see `api.error_body`)."""

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
