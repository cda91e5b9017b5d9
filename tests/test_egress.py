"""The one rule for outbound URLs (callbacks, relays, media fetches): prefixes at a boundary."""

from __future__ import annotations

import pytest

from evomsgd import egress


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        ("https://hooks.example.com/a", "https://hooks.example.com"),
        ("https://HOOKS.example.com/a", "https://hooks.example.com/"),
        ("https://hooks.example.com:443/a", "https://hooks.example.com"),
        ("http://10.0.0.5:8080/app", "http://10.0.0.5:8080/app"),
        ("http://10.0.0.5:8080/app/x?y=1", "http://10.0.0.5:8080/app"),
        ("https://h.example/app/", "https://h.example/app/"),
    ],
)
def test_allowed_under_prefix(url: str, prefix: str) -> None:
    assert egress.allowed(url, [prefix])


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        ("https://hooks.example.com.evil.org/a", "https://hooks.example.com"),
        ("https://evil.org/?https://hooks.example.com", "https://hooks.example.com"),
        ("http://hooks.example.com/a", "https://hooks.example.com"),
        ("https://hooks.example.com:8443/a", "https://hooks.example.com"),
        ("http://10.0.0.5:8080/application", "http://10.0.0.5:8080/app"),
        ("https://user:pw@hooks.example.com/a", "https://hooks.example.com"),
        ("ftp://hooks.example.com/a", "ftp://hooks.example.com"),
        ("file:///etc/passwd", "file:///"),
        ("https://hooks.example.com:99999/", "https://hooks.example.com"),
    ],
)
def test_refused_outside_prefix(url: str, prefix: str) -> None:
    assert not egress.allowed(url, [prefix])


def test_check_names_the_setting() -> None:
    with pytest.raises(egress.UrlError, match="EVOMSGD_CALLBACK_ALLOWED is empty"):
        egress.check("https://a.example/x", [], "EVOMSGD_CALLBACK_ALLOWED")
    with pytest.raises(egress.UrlError, match="matches no prefix in EVOMSGD_CALLBACK_ALLOWED"):
        egress.check("https://a.example/x", ["https://b.example"], "EVOMSGD_CALLBACK_ALLOWED")
    with pytest.raises(egress.UrlError, match="must start with http"):
        egress.check("javascript:alert(1)", ["https://b.example"], "X")
    assert egress.check("https://b.example/x", ["https://b.example"], "X") == "https://b.example/x"
