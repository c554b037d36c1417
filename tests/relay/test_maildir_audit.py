"""The maildir upstream (atomic, durable delivery) and the audit log (one JSON line per
transaction, rotated)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.conftest import Proxy, message, submit
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]


async def send(port: int, recipients: list[str], subject: str = "Hello") -> tuple[int, str]:
    return await submit(port, message(subject=subject), recipients=recipients)


async def test_maildir_delivery_is_one_complete_file_in_new(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    maildir = tmp_path / "maildir"
    proxy = await proxy_factory(f"maildir:{maildir}")
    code, reply = await send(proxy.port, ["bob@example.org", "carol@example.org"])
    assert code == 250
    files = list((maildir / "new").iterdir())
    assert len(files) == 1
    assert reply.startswith(f"2.0.0 Ok: delivered as {files[0].name} [")
    assert list((maildir / "tmp").iterdir()) == []  # written to tmp/, then renamed
    content = files[0].read_bytes()
    assert files[0].name.endswith(f",S={len(content)}")
    assert content.startswith(
        b"Return-Path: <alice@example.com>\nDelivered-To: bob@example.org\nDelivered-To: carol@example.org\n"
    )
    assert b"\r\n" not in content  # maildir files use the local LF convention
    assert b"\nSubject: Hello\n" in content


async def test_maildir_write_failure_is_a_451_not_a_loss(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    maildir = tmp_path / "maildir"
    proxy = await proxy_factory(f"maildir:{maildir}")
    shutil.rmtree(maildir / "new")
    (maildir / "new").write_text("not a directory")  # the rename into new/ must fail
    code, text = await send(proxy.port, ["bob@example.org"])
    assert code == 451
    assert text.startswith("4.3.0 Local mail store write error; try again later (")
    assert list((maildir / "tmp").iterdir()) == []  # no half-written file left behind


async def test_audit_log_has_one_json_line_per_transaction_and_rotates(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream.address, {"audit": {"max_size": "2KB", "keep": 2}})
    for i in range(12):
        assert (await send(proxy.port, ["bob@example.org"], subject=f"n{i}"))[0] == 250
    await proxy.app.stop()  # drains the audit queue
    names = sorted(p.name for p in tmp_path.glob("audit.jsonl*"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    entries = [json.loads(line) for name in names for line in (tmp_path / name).read_text().splitlines()]
    assert all(entry["outcome"] == "delivered" for entry in entries)
    assert len({entry["txn"] for entry in entries}) == len(entries)  # one line per transaction
    assert len(entries) < 12  # the oldest rotated away: keep: 2
    newest = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert set(newest) >= {
        "time",
        "txn",
        "listener",
        "client",
        "auth_user",
        "sender",
        "recipients",
        "class",
        "policies",
        "upstream_reply",
        "reply",
        "outcome",
        "size",
        "duration_ms",
    }


async def test_audit_line_of_a_message_with_raw_8bit_headers_is_written(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    """A Message-ID with raw UTF-8 (and a stray 8-bit byte) reaches the audit as lone
    surrogates, which the UTF-8 file refused: the line was lost (found by the corpus run of
    tests/test_check_agrees_with_proxy.py, malformed-36). It is written, the bytes as UTF-8."""
    proxy = await proxy_factory(upstream.address)
    content = message().replace(b"Message-ID: <", "Message-ID: <\u0441\u0440\xff.".encode("utf-8", "surrogateescape"))
    content = content.replace(b"\xc3\xbf", b"\xff")  # one byte that is no UTF-8 at all
    assert (await submit(proxy.port, content))[0] == 250
    (entry,) = await proxy.wait_audit(1)
    assert entry["outcome"] == "delivered"
    assert entry["message_id"].startswith("<\u0441\u0440\ufffd.")
