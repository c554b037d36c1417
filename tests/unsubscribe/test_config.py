"""The unsubscribe: config section (parsed by sendguard's own YAML converter) and the keygen helper."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml

from proxy.schema import Converter, HostPort, Rate, compose, is_invalid
from proxy.unsubscribe import UnsubscribeConfig, UnsubscribeService, keygen
from proxy.unsubscribe.tokens import decode_secret
from tests.unsubscribe.harness import SECRET_A, SECRET_B

FULL = f"""
enabled: true
base_url: https://mail.shop.example/optout/
listen: 0.0.0.0:8443
trusted_proxies: [10.0.0.0/8]
keys:
  - {{id: k2027, secret: "${{UNSUB_KEY_2027}}"}}
  - {{id: k2026, secret: "{SECRET_A}"}}
token_ttl: 500d
mailto: {{address: Unsubscribe@Shop.Example, listen: 127.0.0.1:2526}}
languages: [en, nl]
footer_language: both
company: Shop BV
contact: privacy@shop.example
privacy_url: https://shop.example/privacy
topics:
  - {{id: Newsletter, nl: Nieuwsbrief, en: Newsletter}}
  - {{id: offers}}
rate_limits: {{per_ip: 30/min, per_token: 5/min, invalid_per_ip: 10/h}}
"""


def convert(text: str, environ: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    converter = Converter("sendguard.yaml", environ if environ is not None else {"UNSUB_KEY_2027": SECRET_B})
    node = compose(textwrap.dedent(text), "sendguard.yaml")
    assert node is not None
    value = converter.convert(node, UnsubscribeConfig, "unsubscribe")
    return value, [str(issue) for issue in converter.issues]


def test_a_full_section() -> None:
    config, issues = convert(FULL)
    assert issues == []
    assert config.base_url == "https://mail.shop.example/optout"
    assert config.base_path == "/optout"
    assert config.listen == HostPort("0.0.0.0", 8443)
    assert [k.id for k in config.keys] == ["k2027", "k2026"]
    assert config.keys[0].secret == SECRET_B, "secrets come from the environment"
    assert SECRET_B not in repr(config), "secrets never reach a log line"
    assert config.token_ttl == 500 * 86400
    assert config.mailto.address == "Unsubscribe@shop.example"
    assert config.mailto.listen == HostPort("127.0.0.1", 2526)
    assert config.languages == ("en", "nl") and config.footer_languages == ("en", "nl")
    assert [t.id for t in config.topics] == ["newsletter", "offers"]
    assert config.rate_limits.invalid_per_ip == Rate(10, 3600)
    service = UnsubscribeService(config, lambda: None)
    assert service.codec.issuing_key.id == "k2027"
    assert service.https_url("T") == "https://mail.shop.example/optout/u/T"
    assert service.path("p", "T") == "/optout/p/T"


def test_defaults_are_off_and_need_nothing() -> None:
    config, issues = convert("{}")
    assert issues == []
    assert config.enabled is False
    assert config.token_ttl == 400 * 86400
    assert config.listen == HostPort("127.0.0.1", 8025)
    assert config.footer_languages == ("nl",)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("enabled: true", "base_url, company, contact, keys are not set"),
        ("{enabled: true, base_url: 'https://x.example', company: C, contact: c@x.example}", "keys is not set"),
        ("base_url: http://unsubscribe.example.com", "must start with https://"),
        ("base_url: https://x.example/?a=1", "without query"),
        ("keys: [{id: k, secret: c2hvcnQ=}]", "at least 32 random bytes"),
        ("keys: [{id: 'bad id', secret: '" + SECRET_A + "'}]", "key id 'bad id'"),
        (
            "keys: [{id: k, secret: '" + SECRET_A + "'}, {id: k, secret: '" + SECRET_B + "'}]",
            "two keys have the same id",
        ),
        ("keys: [{id: k, secret: '${UNSET_SECRET}'}]", "UNSET_SECRET is not set"),
        ("token_ttl: 1h", "at least 1d"),
        ("mailto: {address: 'not an address'}", "not a plain address"),
        ("languages: [nl, de]", "must be one of nl, en"),
        ("languages: []", "at least one"),
        ("tls_cert: /etc/cert.pem", "given together"),
        ("topics: [{id: '*'}]", "cannot be *"),
        ("rate_limits: {per_ip: lots}", "not a rate"),
        ("keyz: []", "did you mean 'keys'"),
    ],
)
def test_mistakes_are_reported(text: str, problem: str) -> None:
    value, issues = convert(text)
    assert is_invalid(value)
    assert any(problem in issue for issue in issues), issues
    assert all(issue.startswith("sendguard.yaml:") for issue in issues)


def test_http_is_allowed_on_loopback_only() -> None:
    for url in ("http://127.0.0.1:8025", "http://localhost:8025/x", "http://[::1]:8025"):
        config, issues = convert(f"base_url: '{url}'")
        assert issues == [] and config.base_url == url.rstrip("/")


def test_keygen_prints_an_entry_that_loads() -> None:
    entry = keygen("2027a")
    assert "- id: 2027a\n  secret: ${SENDGUARD_UNSUBSCRIBE_KEY_2027A}\n" in entry
    exported = next(line for line in entry.splitlines() if "export" in line)
    secret = exported.split("=", 1)[1].strip("'")
    assert len(decode_secret(secret)) == 32
    assert keygen("2027a") != entry, "a fresh secret every time"
    section = "enabled: true\nbase_url: https://x.example\ncompany: C\ncontact: c@x.example\nkeys:\n" + "".join(
        "  " + line + "\n" for line in entry.splitlines() if not line.startswith("#")
    )
    config, issues = convert(section, {"SENDGUARD_UNSUBSCRIBE_KEY_2027A": secret})
    assert issues == [] and config.keys[0].id == "2027a"
    assert yaml.safe_load(entry) == [{"id": "2027a", "secret": "${SENDGUARD_UNSUBSCRIBE_KEY_2027A}"}]
    assert keygen().splitlines()[-2].startswith("- id: k20")
    with pytest.raises(ValueError):
        keygen("no spaces allowed")


def test_the_keygen_command() -> None:
    import argparse
    import io

    from proxy.unsubscribe import add_unsubscribe_parser, run_unsubscribe_command

    parser = argparse.ArgumentParser(prog="sendguard")
    add_unsubscribe_parser(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    assert run_unsubscribe_command(parser.parse_args(["unsubscribe", "keygen", "--id", "2028a"]), out) == 0
    assert "- id: 2028a\n" in out.getvalue()
    assert run_unsubscribe_command(parser.parse_args(["unsubscribe", "keygen", "--id", "bad id"]), io.StringIO()) == 2
