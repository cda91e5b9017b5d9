"""Turn what a client typed into the `number` Evolution API should receive.

Evolution strips every non-digit itself, so the danger is not formatting but a number that
reaches the wrong person or nobody: a local number read as international, a typo that still
looks like digits, 18+ digits silently treated as a group id. We refuse those here, at the
edge, with a reason the client can act on, instead of burning a send that WhatsApp rejects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import phonenumbers
from phonenumbers import (
    NumberParseException,
    PhoneMetadata,
    PhoneNumber,
    PhoneNumberFormat,
    ValidationResult,
)
from phonenumbers import phonenumberutil as _util
from phonenumbers import timezone as _timezone

__all__ = ["PhoneError", "Recipient", "normalize", "time_zones", "validate_region"]

MAX_INPUT_CHARS = 64
# E.164 caps a number at 15 digits; Evolution reads 18+ bare digits as a group id.
_MAX_E164_DIGITS = 15
_GROUP_ID_DIGITS = 18
_EXAMPLE = "+5215512345678"
_INTERNATIONAL = f"send it in international format, e.g. {_EXAMPLE}"

# Local part: a phone or LID, an old-style "creator-timestamp" group id, an optional ":device".
# Evolution's own schema requires `number` to start with a digit, so nothing else is worth
# passing through.
_JID = re.compile(r"[0-9]+(?:-[0-9]+)?(?::[0-9]+)?@(?:s\.whatsapp\.net|g\.us|lid)", re.IGNORECASE)
# Only ASCII separators people actually type; anything else (letters, extensions, "/", look-alike
# Unicode digits) is refused rather than guessed at - libphonenumber would turn "1-800-FLOWERS"
# into digits, which is not something a transactional sender should do silently.
_SEPARATORS = re.compile(r"[\s\-.()\[\]]+")
_ALLOWED = re.compile(r"\+?[0-9]*")
_NON_DIGIT = re.compile(r"[^0-9+\s\-.()\[\]]")

_UNKNOWN_ZONE = "Etc/Unknown"  # what libphonenumber answers for a number it cannot place
_MEXICO = 52
_BRAZIL = 55


@dataclass(frozen=True, slots=True)
class Recipient:
    """A destination Evolution API accepts as `number`."""

    number: str  # E.164 digits without "+", or a WhatsApp JID as sent (surrounding space cut)
    kind: Literal["phone", "jid"]
    input: str  # exactly what the client sent
    region: str | None  # ISO 3166 region of a phone; None for JIDs and non-geographic numbers


class PhoneError(ValueError):
    """The input cannot be a WhatsApp destination; the message says why and what to send."""


def validate_region(code: str) -> str:
    """Return `code` as an upper-case region libphonenumber knows, or raise PhoneError."""
    region = code.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise PhoneError(
            f"{code!r} is not a region code libphonenumber knows - "
            "use an ISO 3166 alpha-2 code such as MX, BR or GB"
        )
    return region


def normalize(raw: str, default_region: str | None = None) -> Recipient:
    """Return the Recipient for `raw`, reading digits without a country code in default_region."""
    if len(raw) > MAX_INPUT_CHARS:
        raise PhoneError(
            f"phone is {len(raw)} characters long, the limit is {MAX_INPUT_CHARS} - "
            f"send one number, e.g. {_EXAMPLE}"
        )
    text = raw.strip()
    if not text:
        raise PhoneError("phone is empty")
    region = validate_region(default_region) if default_region is not None else None

    if "@" in text:
        if _JID.fullmatch(text) is None:
            raise PhoneError(
                f"{text!r} is not a WhatsApp JID - a JID is digits followed by @s.whatsapp.net, "
                "@g.us or @lid; send phone numbers without '@'"
            )
        return Recipient(number=text, kind="jid", input=raw, region=None)

    compact = _SEPARATORS.sub("", text)
    if _ALLOWED.fullmatch(compact) is None:
        bad = _NON_DIGIT.search(text)
        what = f"contains {bad.group()!r}, which" if bad else "has a '+' that"
        raise PhoneError(
            f"{text!r} {what} does not belong in a phone number - "
            f"use digits with an optional leading '+', e.g. {_EXAMPLE}"
        )
    if compact.startswith("+"):
        number = _international(text, compact[1:])
    elif compact.startswith("00"):
        number = _international(text, compact[2:])
    else:
        number = _bare(text, compact, region)

    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    detected = phonenumbers.region_code_for_number(number)
    # "001" is libphonenumber's marker for non-geographic codes (+800, +882...), not a region.
    found = detected if detected in phonenumbers.SUPPORTED_REGIONS else None
    return Recipient(number=e164.removeprefix("+"), kind="phone", input=raw, region=found)


def _international(text: str, digits: str) -> PhoneNumber:
    """Read digits that follow "+" or "00" as country code + national number."""
    if not digits:
        raise PhoneError(
            f"{text!r} has no digits after the international prefix - {_INTERNATIONAL}"
        )
    parsed = _parse_digits(digits) or _parse(text, "+" + digits)
    usable = _usable(parsed)
    if usable is None:
        raise PhoneError(_reason(text, parsed))
    return usable


def _bare(text: str, digits: str, region: str | None) -> PhoneNumber:
    """Read digits written without "+" or "00": international digits or a local number.

    WhatsApp users often write international numbers without "+" ("5215512345678"), but a local
    number can also be a valid international one: US numbers in area code 203 also read as valid
    Egyptian +20 numbers, and libphonenumber accepts almost any digits as a German number. So the
    order is: digits written exactly as the default region writes its own numbers (the operator
    chose that region), then international digits, then anything else libphonenumber accepts
    for the region (e.g. a Brazilian number with its trunk "0"). Clients that need certainty
    send "+".
    """
    if not digits:
        raise PhoneError(f"{text!r} has no digits - {_INTERNATIONAL}")

    local: PhoneNumber | None = None
    local_parsed: PhoneNumber | None = None
    if region is not None:
        local_parsed = _parse_or_none(digits, region)
        local = _usable(local_parsed) if local_parsed is not None else None
        if local is not None and _national_digits(local) == digits:
            return local

    too_short = False
    if digits[0] != "0":
        try:
            international_parsed = phonenumbers.parse("+" + digits, None)
        except NumberParseException as exc:
            # libphonenumber needs a country code plus at least two digits to even try.
            too_short = exc.error_type == NumberParseException.NOT_A_NUMBER
        else:
            international = _usable(international_parsed)
            if international is not None:
                return international
            too_short = _is_too_short(international_parsed)
    if local is not None:
        return local

    if len(digits) > _MAX_E164_DIGITS:
        advice = (
            "Evolution would read it as a group id; send a group as the full JID ending in @g.us"
            if len(digits) >= _GROUP_ID_DIGITS
            else _INTERNATIONAL
        )
        raise PhoneError(
            f"{text!r} has {len(digits)} digits, more than any phone number has "
            f"({_MAX_E164_DIGITS}) - {advice}"
        )
    if local_parsed is not None and region is not None:
        raise PhoneError(_reason(text, local_parsed, region))
    if too_short:
        raise PhoneError(f"{text!r} is too short to be a phone number - {_INTERNATIONAL}")
    if region is not None:
        raise PhoneError(f"{text!r} is not a phone number in {region} - {_INTERNATIONAL}")
    raise PhoneError(
        f"{text!r} has no country code - {_INTERNATIONAL}, "
        "or set EVOMSGD_DEFAULT_REGION to read local numbers"
    )


def _usable(number: PhoneNumber) -> PhoneNumber | None:
    """Return the number WhatsApp should get, or None when it is not a real, valid number."""
    if not _fits_e164(number):
        return None
    if phonenumbers.is_valid_number(number):
        return number
    nsn = phonenumbers.national_significant_number(number)
    # Mexico dropped the mobile "1" after +52 in 2019 and libphonenumber now rejects
    # "+52 1 55 1234 5678" as too long, but WhatsApp users still write it. Evolution drops that
    # digit itself from any 13-digit 52... number before asking WhatsApp, so "+52 1 55 1234 5678"
    # and "+52 55 1234 5678" both become 525512345678 here, which is what Evolution would send
    # anyway; it answers with the JID WhatsApp actually uses (key.remoteJid).
    if number.country_code == _MEXICO and len(nsn) == 11 and nsn.startswith("1"):
        return _valid(_MEXICO, nsn[1:])
    # Brazil put a 9 in front of every 8-digit mobile (finished 2016); libphonenumber calls the
    # old form "+55 11 8888-7777" possible but invalid. Subscriber numbers starting 6-9 were
    # mobiles (landlines start 2-5), so we restore the 9 when that yields a valid mobile.
    # Evolution then removes or keeps the 9 to match the JID WhatsApp registered.
    if number.country_code == _BRAZIL and len(nsn) == 10 and nsn[2] in "6789":
        fixed = _valid(_BRAZIL, nsn[:2] + "9" + nsn[2:])
        if (
            fixed is not None
            and phonenumbers.number_type(fixed) == phonenumbers.PhoneNumberType.MOBILE
        ):
            return fixed
    return None


def _valid(country_code: int, nsn: str) -> PhoneNumber | None:
    number = PhoneNumber(country_code=country_code, national_number=int(nsn))
    return number if phonenumbers.is_valid_number(number) else None


def _parse(text: str, international: str) -> PhoneNumber:
    try:
        return phonenumbers.parse(international, None)
    except NumberParseException as exc:
        if exc.error_type == NumberParseException.INVALID_COUNTRY_CODE:
            raise PhoneError(
                f"{text!r} does not start with a known country code - {_INTERNATIONAL}"
            ) from None
        if exc.error_type == NumberParseException.TOO_LONG:
            raise PhoneError(
                f"{text!r} is too long to be a phone number - {_INTERNATIONAL}"
            ) from None
        # What is left (NOT_A_NUMBER, TOO_SHORT_NSN) means too few digits after the country code.
        raise PhoneError(f"{text!r} is too short to be a phone number - {_INTERNATIONAL}") from None


# libphonenumber's own steps for "+<digits>", without its handling of free text (extensions,
# RFC 3966, letters, Unicode digits) that the input filter above has already ruled out. That
# handling is most of parse()'s cost, which was the largest single cost of a POST. The helpers are private, so the fast path switches itself
# off if they ever go away, and tests/test_phone.py checks it against phonenumbers.parse.
_FAST_HELPERS = (
    "_extract_country_code",
    "_maybe_strip_national_prefix_carrier_code",
    "_test_number_length",
    "_set_italian_leading_zeros_for_phone_number",
)
_FAST = all(callable(getattr(_util, name, None)) for name in _FAST_HELPERS)
_KEEP_PREFIX = (
    ValidationResult.TOO_SHORT,
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
    ValidationResult.INVALID_LENGTH,
)


def _parse_digits(digits: str) -> PhoneNumber | None:
    """phonenumbers.parse("+" + digits) for ASCII digits; None leaves the case to parse()."""
    if not _FAST or not 4 <= len(digits) <= _MAX_E164_DIGITS + 2:
        return None
    country_code, national = _util._extract_country_code(digits)
    if country_code == 0 or len(national) < 2:
        return None  # parse() words these errors
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(
        country_code, phonenumbers.region_code_for_country_code(country_code)
    )
    if metadata is None:
        return None
    _, stripped, _ = _util._maybe_strip_national_prefix_carrier_code(national, metadata)
    if _util._test_number_length(stripped, metadata) not in _KEEP_PREFIX:
        national = stripped
    if not 2 <= len(national) <= 17:
        return None
    number = PhoneNumber(country_code=country_code, national_number=int(national))
    _util._set_italian_leading_zeros_for_phone_number(national, number)
    return number


def _parse_or_none(digits: str, region: str | None) -> PhoneNumber | None:
    try:
        return phonenumbers.parse(digits, region)
    except NumberParseException:
        return None


def _fits_e164(number: PhoneNumber) -> bool:
    # libphonenumber's German metadata validates up to 14 national digits, which with "49"
    # exceeds E.164's 15; WhatsApp numbers are E.164, so such a reading is a typo, not a phone.
    nsn = phonenumbers.national_significant_number(number)
    return len(str(number.country_code)) + len(nsn) <= _MAX_E164_DIGITS


def _national_digits(number: PhoneNumber) -> str:
    national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
    return "".join(c for c in national if c.isdigit())


def _is_too_short(number: PhoneNumber) -> bool:
    return phonenumbers.is_possible_number_with_reason(number) == ValidationResult.TOO_SHORT


def _reason(text: str, number: PhoneNumber, place: str | None = None) -> str:
    """Word libphonenumber's verdict on an unusable number for the client."""
    if place is None:
        where = phonenumbers.region_code_for_country_code(number.country_code or 0)
        place = where if where in phonenumbers.SUPPORTED_REGIONS else f"+{number.country_code}"
    if not _fits_e164(number):
        return (
            f"{text!r} is too long to be a phone number (E.164 allows {_MAX_E164_DIGITS} digits "
            f"with the country code) - {_INTERNATIONAL}"
        )
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason == ValidationResult.INVALID_COUNTRY_CODE:
        return f"{text!r} does not start with a known country code - {_INTERNATIONAL}"
    if reason == ValidationResult.TOO_SHORT:
        return f"{text!r} is too short to be a phone number in {place} - {_INTERNATIONAL}"
    if reason == ValidationResult.TOO_LONG:
        return f"{text!r} is too long to be a phone number in {place} - {_INTERNATIONAL}"
    if reason == ValidationResult.INVALID_LENGTH:
        return f"{text!r} has the wrong number of digits for {place} - {_INTERNATIONAL}"
    if reason == ValidationResult.IS_POSSIBLE_LOCAL_ONLY:
        return f"{text!r} is missing its area code - {_INTERNATIONAL}"
    return (
        f"{text!r} has the right length but is not a valid number in {place} - check it for typos"
    )


def time_zones(number: str) -> tuple[str, ...]:
    """The IANA time zones where a stored recipient (E.164 digits, or a phone JID) may live,
    from libphonenumber's prefix data; empty when unknown (a group, a LID, an unknown range)."""
    digits, _, domain = number.partition("@")
    if domain and domain.lower() != "s.whatsapp.net":
        return ()  # a group or a LID says nothing about where anyone lives
    digits = digits.partition(":")[0]
    try:
        parsed = phonenumbers.parse("+" + digits)
    except NumberParseException:
        return ()
    zones = _timezone.time_zones_for_number(parsed)
    return tuple(zone for zone in zones if zone != _UNKNOWN_ZONE)
