"""evomsgd.phone: what clients type becomes a `number` Evolution API will deliver to."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat, PhoneNumberType, ValidationResult

from evomsgd.phone import PhoneError, Recipient, _parse_digits, normalize, validate_region

# (input, default region, number sent to Evolution, region detected)
PHONES = [
    # Mexico: the old mobile "1" is dropped, as Evolution itself would do.
    ("+52 1 55 1234 5678", None, "525512345678", "MX"),
    ("+52 55 1234 5678", None, "525512345678", "MX"),
    ("+5215512345678", None, "525512345678", "MX"),
    ("5215512345678", None, "525512345678", "MX"),
    ("5215512345678", "MX", "525512345678", "MX"),
    ("55 1234 5678", "MX", "525512345678", "MX"),
    ("(55) 1234-5678", "mx", "525512345678", "MX"),
    # Brazil: with the ninth digit, and the old 8-digit mobile form with it restored.
    ("+55 11 98888-7777", None, "5511988887777", "BR"),
    ("+55 11 8888-7777", None, "5511988887777", "BR"),
    ("(11) 98888-7777", "BR", "5511988887777", "BR"),
    ("(11) 8888-7777", "BR", "5511988887777", "BR"),
    ("011988887777", "BR", "5511988887777", "BR"),
    ("+55 11 3888-7777", None, "551138887777", "BR"),  # a landline: no 9 added
    ("5511988887777", None, "5511988887777", "BR"),
    ("5511988887777", "US", "5511988887777", "BR"),
    # United States / United Kingdom.
    ("+1 (202) 555-0143", None, "12025550143", "US"),
    ("+1.202.555.0143", None, "12025550143", "US"),
    ("2025550143", "US", "12025550143", "US"),
    ("(203) 555-0143", "US", "12035550143", "US"),  # also valid as Egypt's +20 35550143
    ("011 52 55 1234 5678", "US", "525512345678", "MX"),  # the US international prefix
    ("020 7946 0018", "GB", "442079460018", "GB"),
    ("+44 (0)20 7946 0018", None, "442079460018", "GB"),
    ("[+44] 20 7946 0018", None, "442079460018", "GB"),
    # "00" international prefix, with or without a default region.
    ("0052 55 1234 5678", None, "525512345678", "MX"),
    ("00 55 11 98888 7777", "GB", "5511988887777", "BR"),
    # International digits without "+" beat a German reading that lacks the trunk "0".
    ("447911123456", "DE", "447911123456", "GG"),
    # Surrounding whitespace, including non-breaking space from copy-paste.
    ("  +52 55 1234 5678\n", None, "525512345678", "MX"),
    ("\u00a0+55\u00a011\u00a098888-7777\u00a0", None, "5511988887777", "BR"),
    # Non-geographic numbers are valid but have no ISO region.
    ("+800 1234 5678", None, "80012345678", None),
]

JIDS = [
    "5511988887777@s.whatsapp.net",
    "5511988887777@S.WhatsApp.NET",
    "5511988887777:12@s.whatsapp.net",
    "120363025246125486@g.us",
    "5215512345678-1616161616@G.US",
    "123456789012345@lid",
]

# (input, default region, substring of the error)
ERRORS = [
    ("", None, "phone is empty"),
    ("   ", None, "phone is empty"),
    ("\t\n", "MX", "phone is empty"),
    ("hello", None, "'hello' contains 'h', which does not belong in a phone number"),
    ("+", None, "'+' has no digits after the international prefix"),
    ("00", None, "'00' has no digits after the international prefix"),
    ("()", None, "'()' has no digits"),
    ("123", None, "'123' is too short to be a phone number"),
    ("12", None, "'12' is too short to be a phone number"),
    ("1234", "MX", "'1234' is too short to be a phone number in MX"),
    ("1" * 40, None, "has 40 digits, more than any phone number has (15)"),
    ("1" * 40, None, "full JID ending in @g.us"),
    ("120363025246125486", None, "Evolution would read it as a group id"),
    ("1" * 16, "US", "has 16 digits"),
    ("+" + "1" * 20, None, "too long to be a phone number"),
    ("1" * 65, None, "phone is 65 characters long, the limit is 64"),
    ("abc@example.com", None, "'abc@example.com' is not a WhatsApp JID"),
    ("5511988887777@s.whatsapp.net.evil", None, "is not a WhatsApp JID"),
    ("55 11@s.whatsapp.net", None, "is not a WhatsApp JID"),
    ("abc@g.us", None, "is not a WhatsApp JID"),
    ("@lid", None, "is not a WhatsApp JID"),
    ("\U0001f4de", None, "contains '\U0001f4de'"),
    ("+52 55 1234 5678 ext 12", None, "contains 'e'"),
    ("+1 800 FLOWERS", None, "contains 'F'"),
    ("\u0665\u0665\u0661\u0662", None, "which does not belong in a phone number"),
    ("55+11988887777", None, "has a '+' that does not belong"),
    ("+52123456789", None, "'+52123456789' is too short to be a phone number in MX"),
    ("+999 1234567", None, "does not start with a known country code"),
    ("+44 20 7946 001", None, "is not a valid number in GB"),
    ("55 1234 5678", None, "set EVOMSGD_DEFAULT_REGION"),
    ("020 7946 0018", None, "has no country code"),
    ("+55 11 8888 777", None, "BR"),
    ("+52 1 55 1234 567", None, "in MX"),
    ("55", "XX", "'XX' is not a region code"),
    ("30000000000000", "DE", "E.164 allows 15 digits"),
]


@pytest.mark.parametrize(("raw", "region", "number", "detected"), PHONES)
def test_phone(raw: str, region: str | None, number: str, detected: str | None) -> None:
    assert normalize(raw, region) == Recipient(
        number=number, kind="phone", input=raw, region=detected
    )


@pytest.mark.parametrize("raw", JIDS)
def test_jid_passes_through(raw: str) -> None:
    assert normalize(f" {raw} ", "MX") == Recipient(
        number=raw, kind="jid", input=f" {raw} ", region=None
    )


@pytest.mark.parametrize(("raw", "region", "message"), ERRORS)
def test_rejected(raw: str, region: str | None, message: str) -> None:
    with pytest.raises(PhoneError) as info:
        normalize(raw, region)
    assert message in str(info.value)


def test_error_texts() -> None:
    """The messages clients see most, word for word."""
    cases = {
        "12": "'12' is too short to be a phone number - send it in international format, "
        "e.g. +5215512345678",
        "55 1234 5678": "'55 1234 5678' has no country code - send it in international format, "
        "e.g. +5215512345678, or set EVOMSGD_DEFAULT_REGION to read local numbers",
        "1" * 18: "'111111111111111111' has 18 digits, more than any phone number has (15) - "
        "Evolution would read it as a group id; send a group as the full JID ending in @g.us",
    }
    for raw, message in cases.items():
        with pytest.raises(PhoneError) as info:
            normalize(raw)
        assert str(info.value) == message


def test_phone_error_is_value_error() -> None:
    assert issubclass(PhoneError, ValueError)


def test_libphonenumber_verdicts_we_work_around() -> None:
    """If a phonenumbers upgrade changes these, revisit the Mexico/Brazil rules in phone.py."""
    old_mexican_mobile = phonenumbers.parse("+52 1 55 1234 5678")
    assert phonenumbers.is_possible_number_with_reason(old_mexican_mobile) == (
        ValidationResult.TOO_LONG
    )
    assert phonenumbers.is_valid_number(phonenumbers.parse("+52 55 1234 5678"))
    assert not phonenumbers.is_valid_number(phonenumbers.parse("+55 11 8888-7777"))
    assert phonenumbers.is_possible_number_with_reason(phonenumbers.parse("+52123456789")) == (
        ValidationResult.TOO_SHORT
    )
    # Why a region's own national format wins over an international reading of bare digits.
    assert phonenumbers.region_code_for_number(phonenumbers.parse("+2035550143")) == "EG"
    assert phonenumbers.is_valid_number(phonenumbers.parse("+2035550143"))


@pytest.mark.parametrize(("code", "expected"), [("mx", "MX"), (" BR ", "BR"), ("gb", "GB")])
def test_validate_region(code: str, expected: str) -> None:
    assert validate_region(code) == expected


@pytest.mark.parametrize("code", ["", "XX", "001", "MEX", "ZZ"])
def test_validate_region_rejects(code: str) -> None:
    with pytest.raises(PhoneError, match="use an ISO 3166 alpha-2 code such as MX"):
        validate_region(code)


REGIONS = st.one_of(st.none(), st.sampled_from(["MX", "BR", "US", "GB", "DE", "IN", "xx", ""]))
# Mostly misses, so also build digits behind real country codes (and Mexico's old "1").
PHONE_LIKE = st.from_regex(r"\A\s?(\+|00)?[0-9 ()\-.]{0,24}\s?\Z") | st.builds(
    "".join,
    st.tuples(
        st.sampled_from(["", "+", "00", "+ ", "0"]),
        st.sampled_from(["1", "20", "44", "49", "52", "521", "55", "91", "0", ""]),
        st.from_regex(r"\A[0-9][0-9 \-]{5,13}\Z"),
    ),
)


def _check(raw: str, region: str | None) -> None:
    try:
        result = normalize(raw, region)
    except PhoneError:
        return
    if result.kind == "jid":
        assert result.number == raw.strip()
        assert normalize(result.number) == Recipient(result.number, "jid", result.number, None)
        return
    assert result.number.isascii() and result.number.isdigit()
    assert len(result.number) <= 15
    assert result.input == raw
    again = normalize("+" + result.number)
    assert (again.number, again.region) == (result.number, result.region)
    assert normalize(result.number).number == result.number


@given(st.text(max_size=80), REGIONS)
def test_any_text_gives_recipient_or_phone_error(raw: str, region: str | None) -> None:
    _check(raw, region)


@given(PHONE_LIKE, REGIONS)
def test_phone_like_text_round_trips(raw: str, region: str | None) -> None:
    _check(raw, region)


@given(
    st.from_regex(r"\A[0-9]{5,20}(-[0-9]{10})?(:[0-9]{1,2})?\Z"),
    st.sampled_from(["s.whatsapp.net", "S.WHATSAPP.NET", "g.us", "G.us", "lid", "LID"]),
    st.sampled_from(["", " ", "\n", "\t "]),
)
def test_jids_are_untouched(local: str, domain: str, pad: str) -> None:
    raw = f"{pad}{local}@{domain}{pad}"
    assert normalize(raw) == Recipient(number=raw.strip(), kind="jid", input=raw, region=None)


VALID_REGIONS = ["MX", "BR", "US", "GB", "DE", "FR", "IN", "ES", "AR", "CO", "AU", "NG", "ID"]


@st.composite
def valid_numbers(draw: st.DrawFn) -> phonenumbers.PhoneNumber:
    region = draw(st.sampled_from(VALID_REGIONS))
    kind = draw(st.sampled_from([PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE]))
    example = phonenumbers.example_number_for_type(region, kind)
    assert example is not None
    nsn = phonenumbers.national_significant_number(example)
    tail = draw(st.text("0123456789", min_size=4, max_size=4))
    number = phonenumbers.parse(nsn[:-4] + tail, region)

    assume(phonenumbers.is_valid_number(number))
    return number


@given(valid_numbers(), st.sampled_from(["E164", "INTERNATIONAL", "NATIONAL", "DIGITS"]))
def test_valid_numbers_in_any_common_format(number: phonenumbers.PhoneNumber, style: str) -> None:
    """A number libphonenumber calls valid, written the usual ways, reaches its E.164 self."""
    region = phonenumbers.region_code_for_number(number)
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    if style == "DIGITS":
        raw, default = e164[1:], None
    elif style == "NATIONAL":
        raw, default = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL), region
    else:
        raw, default = phonenumbers.format_number(number, getattr(PhoneNumberFormat, style)), None
    result = normalize(raw, default)
    assert result.number == e164[1:]
    assert result.region == region


# -- the fast path for "+<digits>" must be libphonenumber's parse, only faster ------------------

_TYPES = [t for t in vars(PhoneNumberType).values() if isinstance(t, int)]


def _slow(digits: str) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        return None


def test_the_fast_parse_equals_libphonenumber_on_every_example_number() -> None:
    """Every region's example numbers, plus variants with a trunk "0" and a digit more or less."""
    compared = 0
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in _TYPES:
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            digits = phonenumbers.format_number(example, PhoneNumberFormat.E164)[1:]
            for variant in (
                digits,
                digits[:2] + "0" + digits[2:],
                digits[:3] + "00" + digits[3:],
                digits + "7",
                digits[:-1],
            ):
                fast = _parse_digits(variant)
                if fast is not None:
                    assert fast == _slow(variant), variant
                    compared += 1
    assert compared > 5000  # the fast path really runs (it declines only error cases)


@given(st.text(alphabet="0123456789", min_size=1, max_size=20))
def test_the_fast_parse_equals_libphonenumber_on_any_digits(digits: str) -> None:
    fast = _parse_digits(digits)
    if fast is not None:
        assert fast == _slow(digits)


@given(
    st.sampled_from(sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)),
    st.text(alphabet="0123456789", min_size=2, max_size=15),
)
def test_the_fast_parse_equals_libphonenumber_after_any_country_code(code: int, rest: str) -> None:
    digits = f"{code}{rest}"
    fast = _parse_digits(digits)
    if fast is not None:
        assert fast == _slow(digits)
