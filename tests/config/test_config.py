"""The config schema: every error at once, with file, line and key path; one test per rule."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.config.settings import ConfigError, load_config, load_config_text
from proxy.schema import Duration, Rate, Size, parse_duration, parse_rate, parse_size

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
listeners:
  - name: local
    address: 127.0.0.1:2525
upstream:
  address: maildir:var/maildir
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(textwrap.dedent(text), "test.yaml", environ=environ or {})
    return [str(issue) for issue in caught.value.issues]


def test_shipped_config_is_valid_and_not_an_open_relay() -> None:
    settings = load_config(ROOT / "config" / "sendguard.yaml")
    assert settings.upstream.is_maildir
    for listener in settings.listeners:
        assert all(network.prefixlen >= 8 for network in listener.trusted_networks)


def test_minimal_config_gets_safe_defaults() -> None:
    settings = load_config_text(GOOD, environ={})
    listener = settings.listeners[0]
    assert [str(n) for n in listener.trusted_networks] == ["127.0.0.0/8", "::1/128"]
    assert listener.auth == "none"
    assert settings.upstream.verify_certificate is True
    assert settings.upstream.tls == "starttls"


def test_every_error_is_reported_at_once_with_line_and_path() -> None:
    found = problems("""
        listeners:
          - name: local
            address: 127.0.0.1:2525
            auth: optinal
            max_message_size: 25 parsecs
          - name: other
            adress: 127.0.0.1:2526
        timeouts:
          idle: soon
        policies:
          - name: no_such_policy
        """)
    assert found == [
        "test.yaml:5: listeners[0].auth: must be one of none, optional, required, not 'optinal'; did you mean 'optional'?",
        "test.yaml:6: listeners[0].max_message_size: not a size: '25 parsecs' (use e.g. 512KB, 25MB, 1GB)",
        "test.yaml:8: listeners[1].adress: unknown key; did you mean 'address'?",
        "test.yaml:7: listeners[1].address: required key is missing",
        "test.yaml:10: timeouts.idle: not a duration: 'soon' (use e.g. 500ms, 10s, 5m, 2h, 1d)",
        "test.yaml:12: policies[0].name: unknown policy 'no_such_policy'; known policies: "
        + ", ".join(sorted(__import__("policies").REGISTRY)),
    ]


def test_yaml_syntax_error_names_the_line() -> None:
    found = problems("listeners:\n  - name: [unclosed\n")
    assert len(found) == 1
    assert found[0].startswith("test.yaml:3: (top): YAML syntax error")


def test_duplicate_keys_are_errors() -> None:
    assert problems(GOOD + "upstream:\n  address: maildir:other\n") == ["test.yaml:7: upstream: key appears twice"]


@pytest.mark.parametrize(
    ("networks", "ok"),
    [
        (["10.0.0.0/8"], True),
        (["0.0.0.0/0"], False),
        (["0.0.0.0/1"], False),
        (["::/0"], False),
    ],
)
def test_trusted_networks_that_would_make_an_open_relay_are_refused(networks: list[str], ok: bool) -> None:
    text = f"listeners:\n  - name: l\n    address: 127.0.0.1:25\n    trusted_networks: {networks}\n"
    text = text.replace("'", '"')
    if ok:
        load_config_text(text, environ={})
    else:
        assert "would make sendguard an open relay" in problems(text)[0]


def test_environment_expansion_for_secrets() -> None:
    text = GOOD.replace("maildir:var/maildir", "smtp.example.com:587") + (
        "  username: relay@example.com\n  password: ${RELAY_PW}\n"
    )
    settings = load_config_text(text, environ={"RELAY_PW": "s3cret"})
    assert settings.upstream.password == "s3cret"
    assert problems(text) == [
        "test.yaml:8: upstream.password: environment variable RELAY_PW is not set (write ${RELAY_PW:-default} for a default)"
    ]
    default = text.replace("${RELAY_PW}", "${RELAY_PW:-fallback}")
    assert load_config_text(default, environ={}).upstream.password == "fallback"


@pytest.mark.parametrize(
    ("rule_text", "message"),
    [
        ("  - name: local\n    address: 127.0.0.1:2526\n", "listener name 'local' is used twice"),
        ("  - name: other\n    address: 127.0.0.1:2525\n", "address 127.0.0.1:2525 is used by two listeners"),
        (
            "  - name: tls\n    address: 127.0.0.1:2527\n    tls: {mode: starttls}\n",
            "cert and key must be given together",
        ),
        ("  - name: req\n    address: 127.0.0.1:2528\n    tls: {required: true}\n", "requires tls.mode: starttls"),
        ("  - name: small\n    address: 127.0.0.1:2529\n    max_line_length: 500\n", "must be at least 1000"),
    ],
)
def test_listener_rules(rule_text: str, message: str) -> None:
    found = problems(GOOD.replace("upstream:", rule_text + "upstream:"))
    assert any(message in problem for problem in found), found


def test_password_without_tls_is_refused() -> None:
    text = GOOD.replace("maildir:var/maildir", "smtp.example.com:25") + ("  tls: none\n  username: u\n  password: p\n")
    assert problems(text) == [
        "test.yaml:7: upstream.tls: sending a password without TLS is refused; use starttls or implicit"
    ]


def test_timeout_budget_must_fit_the_clients_patience() -> None:
    text = GOOD + "  timeouts: {data: 500s}\npolicies:\n  - name: required_headers\n    timeout: 120s\n"
    found = problems(text)
    assert len(found) == 1
    assert "add up to 620s" in found[0] and "RFC 5321 4.5.3.2.6" in found[0]


def test_policy_options_are_validated_against_the_policy() -> None:
    text = GOOD + "policies:\n  - name: required_headers\n    requir: [From]\n    mode: enforced\n"
    assert problems(text) == [
        "test.yaml:9: policies[0].requir: unknown key; did you mean 'require'?",
        "test.yaml:10: policies[0].mode: must be one of enforce, monitor, not 'enforced'; did you mean 'enforce'?",
    ]


def test_duplicate_policy_ids_are_refused() -> None:
    text = GOOD + "policies:\n  - name: required_headers\n  - name: required_headers\n"
    assert problems(text) == [
        "test.yaml:9: policies[1].id: policy id 'required_headers' appears twice; give one of them its own id"
    ]


def test_class_rules_need_a_condition_and_known_listeners() -> None:
    text = GOOD + "classes:\n  rules:\n    - class: commercial\n    - class: commercial\n      listeners: [nope]\n"
    found = problems(text)
    assert any("a class rule needs at least one condition" in p for p in found)


def test_serve_flags_override_the_file() -> None:
    settings = load_config_text(
        GOOD,
        environ={},
        overrides={"listen": "127.0.0.1:3000", "upstream": "smtp.example.com:587", "http": "127.0.0.1:9999"},
    )
    assert (settings.listeners[0].address.host, settings.listeners[0].address.port) == ("127.0.0.1", 3000)
    assert settings.upstream.address == "smtp.example.com:587"
    assert settings.http.address is not None and settings.http.address.port == 9999


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("10s", 10), ("5m", 300), ("2h", 7200), ("1d", 86400), ("30", 30)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == Duration(seconds)


@pytest.mark.parametrize(("text", "size"), [("512KB", 524288), ("25MB", 26214400), ("1GB", 1073741824), ("100", 100)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == Size(size)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("30/min", Rate(30, 60)), ("10000/day", Rate(10000, 86400)), ("5/10m", Rate(5, 600)), ("100/s", Rate(100, 1))],
)
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_config_check_command(tmp_path: Path) -> None:
    good = run_cli("config", "check", "config/sendguard.yaml")
    assert good.returncode == 0
    assert "OK" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners:\n  - name: l\n    address: nowhere\n")
    result = run_cli("config", "check", str(bad))
    assert result.returncode == 2
    assert f"{bad}:3: listeners[0].address: not HOST:PORT: 'nowhere'" in result.stderr


def test_serve_refuses_to_start_on_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "surprise: true\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "surprise: unknown key" in result.stderr


def test_bare_numbers_for_durations_and_sizes_are_accepted_with_a_warning(tmp_path: Path) -> None:
    """Issue 12: `rate_window: 24` meant hours to its writer and is read as seconds; the loader
    keeps reading it so (a config that ran keeps running) but says so, with line and key."""
    path = tmp_path / "bare.yaml"
    path.write_text(
        "listeners:\n"
        "  - name: local\n"
        "    address: 127.0.0.1:0\n"
        "    max_message_size: 1000000\n"
        "timeouts:\n"
        "  idle: 24\n"
        "  session: 10m\n"
        "policies:\n"
        "  - {name: rate_limit, limits: [{key: global, rates: [10/min], hold: 0}]}\n"  # zero is zero in any unit
    )
    settings = load_config(path)
    assert settings.timeouts.idle == 24
    assert settings.listeners[0].max_message_size == 1_000_000
    assert settings.load_warnings == (
        f"{path}:4: listeners[0].max_message_size: 1000000 without a unit is read as 1000000 bytes; "
        "write the unit: 1000000B, 1000000KB or 1000000MB",
        f"{path}:6: timeouts.idle: 24 without a unit is read as 24 seconds; write the unit: 24s, 24m or 24h",
    )


def test_the_shipped_configs_write_their_units() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in [root / "config" / "sendguard.yaml", *sorted((root / "config" / "examples").glob("*.yaml"))]:
        assert load_config(path, environ={"SENDGUARD_UPSTREAM_PASSWORD": "x"}).load_warnings == (), path
