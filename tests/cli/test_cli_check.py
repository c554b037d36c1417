"""`sendguard check`: the pipeline offline, JSON out, exit 0 / 1 / 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, message

CONFIG = ROOT / "config" / "sendguard.yaml"


def check(*args: str, stdin: bytes | None = None) -> tuple[int, dict[str, Any] | None, str]:
    # Run where the shipped config's relative paths (var/consent.db) land in a scratch directory.
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "check", *args],
            capture_output=True,
            timeout=60,
            cwd=scratch,
            input=stdin,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    stdout = result.stdout.decode()
    return result.returncode, json.loads(stdout) if stdout.strip() else None, result.stderr.decode()


def test_accepted_message(tmp_path: Path) -> None:
    path = tmp_path / "ok.eml"
    path.write_bytes(message())
    code, decision, _ = check("--config", str(CONFIG), str(path))
    assert code == 0
    assert decision is not None
    assert decision["action"] == "accept"
    assert decision["sender"] == "alice@example.com"  # from the headers
    assert decision["recipients"] == ["bob@example.org"]
    assert decision["class"] == "transactional"
    assert decision["policies"][0] == {
        "policy": "required_headers",
        "stage": "message",
        "action": "accept",
        "mode": "enforce",
        "reason": "",
    }
    # unsubscribe and consent apply to commercial mail only
    assert [(p["policy"], p["action"]) for p in decision["policies"]] == [
        ("required_headers", "accept"),
        ("visible_recipients", "accept"),
    ]


def test_rejected_message_gives_the_reply_and_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "nofrom.eml"
    path.write_bytes(b"To: bob@example.org\r\nSubject: x\r\n\r\nbody\r\n")
    code, decision, _ = check("--config", str(CONFIG), "--from", "a@example.com", str(path))
    assert code == 1
    assert decision is not None
    assert decision["action"] == "reject"
    assert decision["reply"] == ("550 5.6.0 Message has no From: header (RFC 5322 section 3.6); add one and send again")
    assert decision["policies"][0]["reason"] == "missing From header"


def test_added_headers_are_shown(tmp_path: Path) -> None:
    path = tmp_path / "nodate.eml"
    path.write_bytes(b"From: a@example.com\r\nTo: b@example.org\r\n\r\nbody\r\n")
    code, decision, _ = check("--config", str(CONFIG), str(path))
    assert code == 0
    assert decision is not None
    assert [h.split(":")[0] for h in decision["added_headers"]] == ["Date", "Message-ID"]


def test_message_from_stdin_with_explicit_envelope_and_class() -> None:
    code, decision, _ = check(
        "--config",
        str(CONFIG),
        "--from",
        "news@example.com",
        "--to",
        "x@example.org",
        "--to",
        "y@example.org",
        "--class",
        "commercial",
        "-",
        stdin=message(),
    )
    # As commercial mail it lacks an unsubscribe link (and nobody consented): refused, and why.
    assert code == 1
    assert decision is not None
    assert decision["class"] == "commercial"
    assert decision["recipients"] == ["x@example.org", "y@example.org"]
    assert decision["action"] == "reject"
    assert decision["reply"].startswith("550 5.7.1 ")
    assert "unsubscribe" in decision["reply"].lower()
    # Every problem at once (the running proxy stops at the first): the missing link decided,
    # and the missing consent of each recipient is reported too.
    refusals = [
        (p["policy"], p.get("recipient"), p.get("decided", False))
        for p in decision["policies"]
        if p["action"] == "reject"
    ]
    assert refusals == [
        ("unsubscribe", None, True),
        ("consent", "x@example.org", False),
        ("consent", "y@example.org", False),
    ]
    assert [p["policy"] for p in decision["problems"]] == ["unsubscribe", "consent", "consent"]


def test_smuggling_content_is_judged_like_the_proxy_does(tmp_path: Path) -> None:
    path = tmp_path / "nul.eml"
    path.write_bytes(message() + b"\x00")
    code, decision, _ = check("--config", str(CONFIG), str(path))
    assert code == 1
    assert decision is not None
    assert decision["reply"].startswith("550 5.6.0 Message contains NUL")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "no-such.yaml", "x.eml"], "cannot read the file"),
        (["--config", str(CONFIG), "no-such.eml"], "cannot read no-such.eml"),
        (["--config", str(CONFIG), "--listener", "nope", str(CONFIG)], "no listener is called 'nope'"),
    ],
)
def test_bad_input_exits_2(args: list[str], expected: str) -> None:
    code, decision, stderr = check(*args)
    assert code == 2
    assert decision is None
    assert expected in stderr


def test_no_recipients_anywhere_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "norcpt.eml"
    path.write_bytes(b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n")
    code, decision, _ = check("--config", str(CONFIG), str(path))
    assert code == 2
    assert decision is not None
    assert decision["action"] == "error"


def consent_setup(tmp_path: Path, database: Path) -> tuple[Path, Path]:
    """A config with the unsubscribe and consent policies on this consent store (consent
    decided at RCPT), and a newsletter with a link."""
    config = tmp_path / "sendguard.yaml"
    config.write_text(
        "listeners:\n  - {name: local, address: 127.0.0.1:2525}\n"
        f"stores:\n  consent: {{backend: sqlite, path: {database}}}\n"
        "policies:\n  - {name: unsubscribe}\n  - {name: consent, topic_header: null}\n"
    )
    newsletter = tmp_path / "news.eml"
    newsletter.write_bytes(
        message(body="Deals! Unsubscribe: https://example.com/unsubscribe?u=1", sender="news@example.com")
    )
    return config, newsletter


async def test_check_judges_consent_from_the_configured_store(tmp_path: Path) -> None:
    from proxy.stores.consent import OPTED_IN, ConsentStoreConfig, new_event, open_consent_store

    database = tmp_path / "consent.db"
    store = await open_consent_store(ConsentStoreConfig(path=str(database)))
    await store.add(
        new_event(
            OPTED_IN,
            "fan@example.org",
            method="double_opt_in",
            confirmed_at="2026-01-02",
            at="2026-01-01",
            source="https://example.com/signup",
        )
    )
    await store.close()
    config, newsletter = consent_setup(tmp_path, database)
    code, decision, _ = check(
        "--config", str(config), "--class", "commercial", "--to", "fan@example.org", str(newsletter)
    )
    assert code == 0
    assert decision is not None
    (consent,) = [p for p in decision["policies"] if p["policy"] == "consent"]
    assert consent["evidence"]["record"]["method"] == "double_opt_in"

    code, decision, _ = check(
        "--config",
        str(config),
        "--class",
        "commercial",
        "--to",
        "fan@example.org",
        "--to",
        "stranger@example.org",
        str(newsletter),
    )
    assert code == 1
    assert decision is not None
    assert list(decision["refused_recipients"]) == ["stranger@example.org"]
    assert decision["recipients"] == ["fan@example.org"]


async def test_check_reads_the_envelope_as_the_session_does(tmp_path: Path) -> None:
    """Issue 14: ``--to '"bob2"@example.net'`` was looked up with its quotes, so the check and
    the proxy (which reads the RCPT addr-spec as bob2@example.net) disagreed. Both read one
    form now, compare by one key, and refuse a hard-bounced address at RCPT alike."""
    from proxy.stores.consent import OPTED_IN, SUPPRESSED, ConsentStoreConfig, new_event, open_consent_store

    database = tmp_path / "consent.db"
    store = await open_consent_store(ConsentStoreConfig(path=str(database)))
    evidence = {"method": "double_opt_in", "confirmed_at": "2026-01-02", "at": "2026-01-01"}
    await store.add(
        new_event(OPTED_IN, "BOB2@Example.NET.", source="https://example.com/signup", **evidence),
        new_event(OPTED_IN, "dead@example.net", source="https://example.com/signup", **evidence),
        new_event(SUPPRESSED, "dead@example.net", method="hard_bounce", reason="550 5.1.1 no such user"),
    )
    await store.close()
    config, newsletter = consent_setup(tmp_path, database)
    args = ("--config", str(config), "--class", "commercial", "--from", "<news@example.com>")
    code, decision, _ = check(*args, "--to", '"bob2"@example.net', "--to", "Bob2@EXAMPLE.net", str(newsletter))
    assert code == 0, decision
    assert decision is not None
    assert decision["recipients"] == decision["deliver_to"] == ["bob2@example.net"]  # one recipient, once
    assert decision["sender"] == "news@example.com"
    assert decision["data_reply"] == "250 2.0.0 Ok"

    # Transactional mail too: the proxy refuses a hard-bounced address at RCPT for any class.
    transactional = ("--config", str(config), "--class", "transactional", "--from", "news@example.com")
    code, decision, _ = check(*transactional, "--to", '"dead"@example.net', "--to", "bob2@example.net", str(newsletter))
    assert code == 1 and decision is not None
    assert decision["refused_recipients"]["dead@example.net"].startswith(
        "550 5.1.1 <dead@example.net>: this address hard-bounced before"
    )
    assert decision["deliver_to"] == ["bob2@example.net"]

    code, decision, stderr = check(*args, "--to", "<bob2@example.net> extra", str(newsletter))
    assert code == 2 and decision is not None and "is not one address" in decision["reason"], stderr
