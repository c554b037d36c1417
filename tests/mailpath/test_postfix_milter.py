"""sendguard as a real Postfix's milter (``smtpd_milters``): Postfix owns the SMTP session and
its queue, sendguard decides through milter actions. What must hold end to end: a consent
refusal reaches the original client as sendguard's 5xx; a per-IP limit counts the original
client (two clients on 127.0.0.2 and 127.0.0.3); an accepted commercial message reaches the
next hop with sendguard's one-click headers and a DKIM signature that verifies; the audit
line names the client; with sendguard down, Postfix's milter_default_action = tempfail
answers 4xx and loses nothing."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim

from proxy.config.settings import load_config
from proxy.reputation.dkim import generate_private_key, load_keys, write_private_key
from tests.conftest import eventually, message
from tests.fakes import FakeUpstream
from tests.milter.harness import RunningMilter, add_consent, milter_config, running_milter
from tests.postfix import postfix_instance


async def send_from(source: str, port: int, recipient: str, subject: str) -> tuple[int, str]:
    """One commercial message from a client bound to ``source``; the deciding reply."""
    content = message(subject=subject, body="Twenty percent off this week.", sender="news@example.com", to=recipient)
    try:
        _, reply = await aiosmtplib.send(
            content,
            sender="news@example.com",
            recipients=[recipient],
            hostname="127.0.0.1",
            port=port,
            source_address=(source, 0),
            start_tls=False,
            timeout=30,
        )
    except aiosmtplib.SMTPRecipientsRefused as error:
        return error.recipients[0].code, error.recipients[0].message
    except aiosmtplib.SMTPResponseException as error:
        return error.code, error.message
    return 250, reply


def dkim_verifies(content: bytes, config_path: Path) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, the keys' records taken from the config."""
    records = {
        f"{key.config.selector}._domainkey.{key.config.domain}.": key.dns_record().encode()
        for key in load_keys(load_config(config_path).dkim)
    }

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        return records.get(key if key.endswith(".") else key + ".")

    count = content.split(b"\r\n\r\n", 1)[0].lower().count(b"\r\ndkim-signature:") + content.lower().startswith(
        b"dkim-signature:"
    )
    verifier = dkim.DKIM(content)
    return [bool(verifier.verify(index, dnsfunc=dnsfunc)) for index in range(count)]


def config(tmp_path: Path) -> dict[str, Any]:
    key = tmp_path / "rsa.pem"
    write_private_key(key, generate_private_key("rsa-sha256", 2048))
    return milter_config(
        tmp_path,
        {
            "policies": [
                {"name": "required_headers"},
                {
                    "name": "rate_limit",
                    "limits": [{"key": "client_ip", "name": "per_client", "count": "messages", "rates": ["1/h"]}],
                },
                {"name": "consent"},
                {"name": "list_unsubscribe"},
            ],
            "dkim": {
                "keys": [
                    {"domain": "example.com", "selector": "m2026", "key_file": str(key), "algorithm": "rsa-sha256"}
                ]
            },
        },
    )


def milter_main_cf(milter: RunningMilter) -> dict[str, str]:
    return {"smtpd_milters": milter.spec, "milter_default_action": "tempfail", "milter_protocol": "6"}


async def test_postfix_with_sendguard_as_its_milter(upstream: FakeUpstream, tmp_path: Path) -> None:
    async with running_milter(tmp_path, config(tmp_path)) as milter:
        add_consent(tmp_path / "milter.yaml", "carol@example.org")
        async with postfix_instance(
            relayhost=f"[127.0.0.1]:{upstream.port}", main_cf=milter_main_cf(milter)
        ) as postfix:
            # Accepted: consent, first message of 127.0.0.2 this hour
            code, _ = await send_from("127.0.0.2", postfix.port, "carol@example.org", "Offer one")
            assert code == 250, postfix.log()[-3000:] + milter.log()[-3000:]
            assert await eventually(lambda: len(upstream.messages) == 1, timeout=20), postfix.log()[-3000:]
            relayed = upstream.messages[0].content
            parsed = email.message_from_bytes(relayed, policy=email.policy.default)
            assert str(parsed["List-Unsubscribe"]).startswith("<https://unsubscribe.shop.example/")
            assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
            assert dkim_verifies(relayed, tmp_path / "milter.yaml") == [True]
            received = [str(value) for value in parsed.get_all("Received", [])]
            assert any("(sendguard)" in value and "127.0.0.2" in value for value in received), received
            assert b"X-Sendguard-Topic" not in relayed

            # The same client again: its per-IP budget is spent, Postfix says sendguard's 451
            code, text = await send_from("127.0.0.2", postfix.port, "carol@example.org", "Offer two")
            assert (code, text.split(" ")[0]) == (451, "4.7.1"), text

            # Another client has its own budget; no consent for bob: sendguard's 550 reaches it
            code, text = await send_from("127.0.0.3", postfix.port, "bob@example.org", "Offer three")
            assert (code, text.split(" ")[0]) == (550, "5.7.1"), text
            assert "consent" in text

            lines = await milter.wait_audit(3)
            assert [(line["client"], line["outcome"]) for line in lines] == [
                ("127.0.0.2", "delivered"),
                ("127.0.0.2", "tempfailed"),
                ("127.0.0.3", "rejected"),
            ]
            assert all(line["listener"] == "milter" for line in lines)
            await postfix.wait_queue_empty()
            assert len(upstream.messages) == 1


async def test_sendguard_down_means_tempfail_never_a_silent_pass(upstream: FakeUpstream, tmp_path: Path) -> None:
    async with running_milter(tmp_path, config(tmp_path)) as milter:
        spec = milter_main_cf(milter)
    # The milter has stopped: with milter_default_action = tempfail Postfix answers 4xx
    async with postfix_instance(relayhost=f"[127.0.0.1]:{upstream.port}", main_cf=spec) as postfix:
        code, text = await send_from("127.0.0.2", postfix.port, "carol@example.org", "While down")
        assert 400 <= code < 500, (code, text)
        await postfix.wait_queue_empty()
        assert upstream.messages == [] and "status=sent" not in postfix.log()
