"""``sendguard milter`` against Debian's miltertest (OpenDKIM's milter test driver, Lua
scripts): the milter protocol as libmilter speaks it, the answers and the header actions."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.milter.server import libmilter_address
from tests.conftest import need_program
from tests.milter.harness import add_consent, milter_config, running_milter

MESSAGE = """
mt.header(conn, "From", "News <news@example.com>")
mt.header(conn, "To", "{rcpt}")
mt.header(conn, "Subject", "Our offer")
mt.header(conn, "Date", "Sun, 29 Nov 2026 10:00:00 +0000")
mt.header(conn, "Message-ID", "<{mid}@example.com>")
mt.header(conn, "Bcc", "hidden@example.org")
mt.eoh(conn)
mt.bodystring(conn, "Twenty percent off this week.\\r\\n")
mt.eom(conn)
"""


def script(port: int, rcpt: str, tail: str, mid: str = "1") -> str:
    return (
        f'conn = mt.connect("inet:{port}@127.0.0.1")\n'
        'if conn == nil then error("no connection") end\n'
        'mt.macro(conn, SMFIC_CONNECT, "j", "mta.example.test")\n'
        'if mt.conninfo(conn, "client.example.test", "127.0.0.9") ~= nil then error("conninfo") end\n'
        'if mt.helo(conn, "client.example.test") ~= nil then error("helo") end\n'
        'mt.mailfrom(conn, "<news@example.com>")\n'
        'if mt.getreply(conn) ~= SMFIR_CONTINUE then error("MAIL refused") end\n'
        f'mt.rcptto(conn, "<{rcpt}>")\n'
        'if mt.getreply(conn) ~= SMFIR_CONTINUE then error("RCPT refused") end\n'
        + MESSAGE.format(rcpt=rcpt, mid=mid)
        + tail
        + "mt.disconnect(conn)\n"
    )


async def miltertest(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    program = need_program("miltertest")
    path = tmp_path / "script.lua"
    # miltertest exits 1 on a script error without saying which: say it
    path.write_text(
        f"local ok, err = pcall(function()\n{text}\nend)\nif not ok then print('FAILED: ' .. tostring(err)); os.exit(1) end\n"
    )
    return await asyncio.to_thread(
        subprocess.run, [program, "-s", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


async def test_commercial_mail_without_consent_is_refused_at_end_of_message(tmp_path: Path) -> None:
    async with running_milter(tmp_path, milter_config(tmp_path)) as milter:
        # (miltertest's MT_SMTPREPLY check does not see libmilter's reply: the code is read
        # from the audit line here, and from the client's own reply through Postfix)
        tail = "if mt.getreply(conn) ~= SMFIR_REPLYCODE then error('not refused') end\n"
        done = await miltertest(tmp_path, script(milter.port, "bob@example.org", tail))
        assert done.returncode == 0, done.stdout + done.stderr + milter.log()[-3000:]
        lines = await milter.wait_audit(1)
        assert lines[-1]["outcome"] == "rejected"
        assert lines[-1]["client"] == "127.0.0.9" and lines[-1]["listener"] == "milter"
        assert lines[-1]["reply"].startswith("550 5.7.1") and "consent" in lines[-1]["reply"].lower()


async def test_accepted_mail_gets_its_headers_through_milter_actions(tmp_path: Path) -> None:
    async with running_milter(tmp_path, milter_config(tmp_path)) as milter:
        add_consent(milter.tmp_path / "milter.yaml", "carol@example.org")
        tail = (
            "if mt.getreply(conn) ~= SMFIR_ACCEPT then error('not accepted') end\n"
            # our Received field names the client's AUTH state: ESMTPA
            'if not string.find(mt.getheader(conn, "Received", 0), "with ESMTPA", 1, true) '
            'then error("not ESMTPA: " .. mt.getheader(conn, "Received", 0)) end\n'
            'if not mt.eom_check(conn, MT_HDRINSERT, "List-Unsubscribe") then error("no List-Unsubscribe") end\n'
            'if not mt.eom_check(conn, MT_HDRINSERT, "List-Unsubscribe-Post", " List-Unsubscribe=One-Click") '
            'then error("no List-Unsubscribe-Post") end\n'
            'if not mt.eom_check(conn, MT_HDRINSERT, "Received") then error("no Received") end\n'
            # Bcc must never reach the recipients: removed through chgheader
            'if not mt.eom_check(conn, MT_HDRCHANGE, "Bcc") then error("Bcc kept") end\n'
        )
        text = script(milter.port, "carol@example.org", tail, mid="2")
        # Postfix sends the SASL login with MAIL ({auth_authen} in milter_mail_macros)
        text = text.replace("mt.mailfrom(", 'mt.macro(conn, SMFIC_MAIL, "{auth_authen}", "alice")\nmt.mailfrom(', 1)
        done = await miltertest(tmp_path, text)
        assert done.returncode == 0, done.stdout + done.stderr + milter.log()[-3000:]
        lines = await milter.wait_audit(1)
        assert lines[-1]["outcome"] == "delivered" and lines[-1]["recipients"] == ["carol@example.org"]
        assert lines[-1]["helo"] == "client.example.test" and lines[-1]["auth_user"] == "alice"


async def test_a_second_recipient_waits_for_its_own_transaction(tmp_path: Path) -> None:
    """list_unsubscribe gives each recipient its own link: one recipient per message."""
    async with running_milter(tmp_path, milter_config(tmp_path)) as milter:
        text = script(milter.port, "carol@example.org", "mt.getreply(conn)\n")
        second = (
            'mt.rcptto(conn, "<dave@example.org>")\n'
            'if mt.getreply(conn) ~= SMFIR_REPLYCODE then error("second recipient accepted") end\n'
        )
        text = text.replace("mt.header(conn,", second + "mt.header(conn,", 1)
        done = await miltertest(tmp_path, text)
        assert done.returncode == 0, done.stdout + done.stderr + milter.log()[-3000:]


async def test_garbage_and_a_vanished_mta_leave_the_milter_serving(tmp_path: Path) -> None:
    async with running_milter(tmp_path, milter_config(tmp_path)) as milter:
        # Not the milter protocol at all; then a packet that claims 1 GB and stops.
        for junk in (b"GET / HTTP/1.0\r\n\r\n" * 10, b"\x40\x00\x00\x00O\x00\x00\x00\x06"):
            reader, writer = await asyncio.open_connection("127.0.0.1", milter.port)
            writer.write(junk)
            with contextlib.suppress(OSError):  # it may be closed already
                await writer.drain()
                writer.write_eof()
            # libmilter drops the connection: end of stream (or a reset), nothing answered
            try:
                answered = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                answered = b""
            assert answered == b""
            writer.close()
        # A session that goes away in the middle of a message
        half = script(milter.port, "bob@example.org", "").split("mt.eom(conn)")[0]
        done = await miltertest(tmp_path, half + "mt.disconnect(conn)\n")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = await milter.wait_audit(1)
        assert lines[-1]["outcome"] == "abandoned"
        tail = "if mt.getreply(conn) ~= SMFIR_REPLYCODE then error('not refused') end\n"
        done = await miltertest(tmp_path, script(milter.port, "bob@example.org", tail, mid="3"))
        assert done.returncode == 0, done.stdout + done.stderr + milter.log()[-3000:]
        assert milter.process.poll() is None


def test_what_a_milter_cannot_do_is_a_config_error(tmp_path: Path) -> None:
    config = milter_config(tmp_path, {"policies": [{"name": "visible_recipients", "remedy": "split"}]})
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(config))
    sendguard = str(Path(sys.executable).parent / "sendguard")
    done = subprocess.run(
        [sendguard, "milter", "--config", str(path), "--listen", "inet:127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "policies.visible_recipients: remedy: split" in done.stderr and "milter cannot" in done.stderr


def test_listen_addresses_in_postfixs_spelling() -> None:
    assert libmilter_address("inet:127.0.0.1:8891") == "inet:8891@127.0.0.1"
    assert libmilter_address("inet6:[::1]:8891") == "inet6:8891@::1"
    assert libmilter_address("unix:/run/sendguard/milter") == "unix:/run/sendguard/milter"
    for bad in ("127.0.0.1:8891", "inet:8891", "inet:host:0", "unix:"):
        with pytest.raises(ValueError, match="inet:HOST:PORT or unix:PATH"):
            libmilter_address(bad)
