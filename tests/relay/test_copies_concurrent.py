"""Per-recipient copies sent several at once (``upstream.copy_concurrency``), each over its own
pooled upstream connection: they really overlap, never more than the setting or the pool
allows, and every guarantee of the copies sent one after another still holds: 250 only when
each copy was accepted or is on disk in the retry queue, a DSN for copies refused for good, a
4xx when every copy was refused for now, a pushback stops new copies, and each recipient gets
exactly one copy (delivered, queued or reported), never none and never two.

Real sockets: the proxy, the fault-injecting fake upstream (which holds each final dot for a
moment so concurrent copies overlap, and counts how many it holds at once); the queue file
is read with sqlite3."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config.settings import ConfigError, UpstreamConfig, UpstreamPool, load_config_text
from proxy.relay.copies import copy_width
from tests.conftest import Proxy, eventually, message, submit
from tests.fakes import FakeUpstream, Faults
from tests.relay.test_spool import SENDER, copies_to, rows

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]

NAMES = ["ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal"]
RECIPIENTS = [f"{name}@example.org" for name in NAMES]
HOLD = 0.2  # seconds the fake upstream holds each final dot


def split_config(tmp_path: Path, **upstream: Any) -> dict[str, Any]:
    """visible_recipients with remedy: split (every message here shows more than two
    addresses: one copy each); a retry queue whose rows wait an hour, so what the 250 left
    in it is still there when the test looks."""
    return {
        "policies": [{"name": "visible_recipients", "max_visible": 2, "remedy": "split"}],
        "spool": {"path": str(tmp_path / "spool.db"), "interval": "100ms", "retry_min": "1h"},
        "upstream": upstream,
    }


def content(recipients: list[str]) -> bytes:
    return message(sender=SENDER, to=", ".join(recipients))


def dsn_recipients(upstream: FakeUpstream) -> list[str]:
    """The recipients named as failed in the DSNs the upstream received."""
    found = []
    for m in upstream.messages:
        if m.mail_from == "<>":
            for line in m.content.decode().splitlines():
                if line.startswith("Final-Recipient: rfc822; "):
                    found.append(line.removeprefix("Final-Recipient: rfc822; "))
    return found


@pytest.mark.parametrize(
    ("upstream_changes", "expected"),
    [
        ({}, 4),  # the default
        ({"copy_concurrency": 1}, 1),  # one after another, as before
        ({"copy_concurrency": 3}, 3),
        ({"copy_concurrency": 8, "pool": {"max_connections": 2}}, 2),  # never more than the pool
    ],
)
async def test_copies_overlap_as_far_as_the_setting_and_the_pool_allow(
    upstream_factory: UpstreamFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    upstream_changes: dict[str, Any],
    expected: int,
) -> None:
    upstream = await upstream_factory(faults=Faults(data_delay=HOLD))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path, **upstream_changes))
    code, text = await submit(proxy.port, content(RECIPIENTS), sender=SENDER, recipients=RECIPIENTS)
    assert code == 250, text
    assert text.startswith(f"2.0.0 Delivered as {len(RECIPIENTS)} separate copies, one per recipient [")
    assert upstream.handler.most_in_data == expected
    assert [copies_to(upstream, r) for r in RECIPIENTS] == [1] * len(RECIPIENTS)
    assert rows(tmp_path) == []
    audit = (await proxy.wait_audit(1))[-1]
    # Accounted in the client's order of recipients, whatever order the copies finished in.
    assert list(audit["copies"]) == RECIPIENTS
    assert {c["fate"] for c in audit["copies"].values()} == {"delivered"}


def test_the_width_is_the_setting_bounded_by_the_pool(tmp_path: Path) -> None:
    assert copy_width(UpstreamConfig(address="127.0.0.1:25")) == 4
    assert copy_width(UpstreamConfig(address="127.0.0.1:25", copy_concurrency=9, pool=UpstreamPool(5))) == 5
    assert copy_width(UpstreamConfig(address=f"maildir:{tmp_path}", copy_concurrency=6)) == 6


def test_a_copy_concurrency_below_one_is_a_config_error() -> None:
    text = "listeners:\n  - {name: local, address: 127.0.0.1:2525}\nupstream:\n  address: 127.0.0.1:25\n"
    with pytest.raises(ConfigError) as caught:
        load_config_text(text + "  copy_concurrency: 0\n", "test.yaml", environ={})
    assert any("upstream.copy_concurrency" in str(i) and "at least 1" in str(i) for i in caught.value.issues)
    assert load_config_text(text, "test.yaml", environ={}).upstream.copy_concurrency == 4


async def test_one_copy_refused_for_now_is_queued_while_the_others_go_out_together(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(
        faults=Faults(data_delay=HOLD, data_replies={"cat@example.org": "451 4.2.0 mailbox busy"})
    )
    proxy = await proxy_factory(upstream.address, split_config(tmp_path))
    code, text = await submit(proxy.port, content(RECIPIENTS), sender=SENDER, recipients=RECIPIENTS)
    assert code == 250, text
    assert f"Delivered as {len(RECIPIENTS) - 1} separate copies, one per recipient; 1 queued for retry" in text
    assert upstream.handler.most_in_data > 1
    (row,) = rows(tmp_path)  # on disk before the 250
    assert (row["kind"], row["recipient"], row["attempts"]) == ("copy", "cat@example.org", 1)
    assert "451 4.2.0 mailbox busy" in row["last_reply"]
    assert [copies_to(upstream, r) for r in RECIPIENTS] == [0 if r == "cat@example.org" else 1 for r in RECIPIENTS]
    audit = (await proxy.wait_audit(1))[-1]
    assert list(audit["copies"]) == RECIPIENTS
    assert audit["copies"]["cat@example.org"]["queue_id"] == row["id"]


async def test_every_copy_refused_for_now_gives_the_client_a_4xx_and_queues_nothing(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_delay=0.05, data_reply="452 4.3.1 queue full"))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path))
    code, text = await submit(proxy.port, content(RECIPIENTS), sender=SENDER, recipients=RECIPIENTS)
    assert code == 452
    assert text.startswith("4.3.1 queue full [")
    assert upstream.handler.commands.count("DATA") == len(RECIPIENTS)  # a 4xx at the dot is no pushback
    assert upstream.handler.most_in_data > 1
    assert upstream.messages == []
    assert rows(tmp_path) == []  # the client keeps its message: nothing is queued


async def test_a_copy_refused_for_good_is_reported_in_one_dsn(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(
        faults=Faults(data_delay=HOLD, data_replies={"dan@example.org": "550 5.1.1 no such user"})
    )
    proxy = await proxy_factory(upstream.address, split_config(tmp_path))
    code, text = await submit(proxy.port, content(RECIPIENTS), sender=SENDER, recipients=RECIPIENTS)
    assert code == 250, text
    assert "; 1 refused, reported to the sender" in text
    assert await eventually(lambda: dsn_recipients(upstream) == ["dan@example.org"])
    assert [copies_to(upstream, r) for r in RECIPIENTS] == [0 if r == "dan@example.org" else 1 for r in RECIPIENTS]


async def test_an_upstream_that_drops_one_copy_mid_transfer_loses_nothing(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_delay=HOLD, drop_data_for={"ben@example.org"}))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path))
    code, text = await submit(proxy.port, content(RECIPIENTS), sender=SENDER, recipients=RECIPIENTS)
    assert code == 250, text
    assert "; 1 queued for retry" in text
    (row,) = rows(tmp_path)
    assert row["recipient"] == "ben@example.org"
    assert [copies_to(upstream, r) for r in RECIPIENTS] == [0 if r == "ben@example.org" else 1 for r in RECIPIENTS]


async def test_a_421_stops_new_copies_and_queues_the_rest_untried(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_replies={"cat@example.org": "421 4.7.0 slow down"}))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path, copy_concurrency=1))
    recipients = RECIPIENTS[:5]
    code, text = await submit(proxy.port, content(recipients), sender=SENDER, recipients=recipients)
    assert code == 250, text
    assert "Delivered as 2 separate copies, one per recipient; 3 queued for retry" in text
    assert upstream.handler.commands.count("DATA") == 3  # ann, ben, then cat's 421: no more
    queued = {row["recipient"]: row["attempts"] for row in rows(tmp_path)}
    assert queued == {"cat@example.org": 1, "dan@example.org": 0, "eve@example.org": 0}
    assert [copies_to(upstream, r) for r in recipients] == [1, 1, 0, 0, 0]


async def test_a_pushback_on_every_copy_in_flight_gives_the_client_a_4xx(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(data_delay=0.05, data_reply="421 4.7.0 too many messages"))
    proxy = await proxy_factory(upstream.address, split_config(tmp_path, copy_concurrency=2))
    code, text = await submit(proxy.port, content(RECIPIENTS), sender=SENDER, recipients=RECIPIENTS)
    assert code == 451  # the upstream's 421, without its "closing" (RFC 5321 3.8)
    assert "too many messages" in text
    assert upstream.handler.commands.count("DATA") == 2  # the two in flight; none started after
    assert upstream.messages == []
    assert rows(tmp_path) == []


async def test_mixed_failures_under_concurrency_give_each_recipient_exactly_one_fate(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    recipients = [f"r{i:02d}@example.org" for i in range(20)]
    faults = Faults(
        data_delay=0.05,
        data_replies={"r03@example.org": "451 4.2.0 busy", "r11@example.org": "550 5.1.1 unknown"},
        drop_data_for={"r07@example.org", "r16@example.org"},
    )
    upstream = await upstream_factory(faults=faults)
    proxy = await proxy_factory(upstream.address, split_config(tmp_path, copy_concurrency=3))
    code, text = await submit(proxy.port, content(recipients), sender=SENDER, recipients=recipients)
    assert code == 250, text
    assert upstream.handler.most_in_data == 3
    assert await eventually(lambda: len(dsn_recipients(upstream)) == 1)
    queued = [row["recipient"] for row in rows(tmp_path) if row["kind"] == "copy"]
    for recipient in recipients:
        fates = copies_to(upstream, recipient) + queued.count(recipient) + dsn_recipients(upstream).count(recipient)
        assert fates == 1, recipient
    assert sorted(queued) == ["r03@example.org", "r07@example.org", "r16@example.org"]
    audit = (await proxy.wait_audit(1))[-1]
    assert list(audit["copies"]) == recipients
