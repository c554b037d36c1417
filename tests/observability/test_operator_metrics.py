"""Issue 12, metrics that tell the truth: each recipient counted once with its final outcome,
upstream connect and pool wait apart, per-policy latency, what an operator watches, and the
README's metric table checked against a live /metrics both ways."""

from __future__ import annotations

import gzip
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest

from proxy.api.webhooks import WebhookMetrics
from proxy.unsubscribe import UnsubscribeMetrics
from tests.conftest import Proxy, message, submit
from tests.fakes import FakeUpstream, Faults
from tests.observability.test_http_metrics import get, sample

README = Path(__file__).resolve().parents[2] / "README.md"


def rcpt(text: str, outcome: str, klass: str = "transactional") -> float | None:
    return sample(text, "sendguard_recipients_total", listener="local", outcome=outcome, **{"class": klass})


async def test_each_recipient_counts_once_with_its_final_outcome(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], proxy_factory: Callable[..., Awaitable[Proxy]]
) -> None:
    upstream = await upstream_factory(
        faults=Faults(
            rcpt_replies={"dead@example.org": "550 5.1.1 no such user", "busy@example.org": "450 4.2.1 try later"},
            data_replies={"spamtrap@example.org": "554 5.7.1 refused as spam"},
        )
    )
    proxy = await proxy_factory(upstream.address)
    # 1: two delivered, one dead (upstream), one busy (upstream, for now) at RCPT.
    code, _ = await submit(
        proxy.port, recipients=["bob@example.org", "carol@example.org", "dead@example.org", "busy@example.org"]
    )
    assert code == 250
    # 2: the upstream refuses the message itself after DATA: its recipient is refused upstream.
    code, _ = await submit(proxy.port, recipients=["spamtrap@example.org"])
    assert code == 554
    # 3: a policy refuses the message after DATA (no From): refused by sendguard.
    code, _ = await submit(proxy.port, b"To: x@example.org\r\n\r\nno from\r\n", recipients=["x@example.org"])
    assert code == 550
    await proxy.wait_audit(3)
    _, _, text = await get(proxy.http_port, "/metrics")
    assert rcpt(text, "delivered") == 2
    assert rcpt(text, "refused_upstream") == 2  # dead at RCPT, spamtrap at DATA
    assert rcpt(text, "tempfailed") == 1  # busy
    assert rcpt(text, "refused_policy") == 1
    assert rcpt(text, "accepted") is None  # the old outcome is gone: a recipient counts once
    assert sample(text, "sendguard_transactions_in_flight") == 0
    assert sample(text, "sendguard_transaction_duration_seconds_count", outcome="delivered") == 1
    assert sample(text, "sendguard_transaction_duration_seconds_count", outcome="rejected") == 2
    assert sample(text, "sendguard_tls_transactions_total", listener="local", tls="plaintext") == 3
    assert sample(text, "sendguard_tls_transactions_total", listener="local", tls="tls") == 0
    assert sample(text, "sendguard_upstream_replies_total", stage="rcpt", code_class="5xx") == 1


async def test_a_policy_refusal_at_rcpt_counts_as_refused_by_policy(
    upstream: FakeUpstream, proxy_factory: Callable[..., Awaitable[Proxy]]
) -> None:
    limits = {"name": "rate_limit", "limits": [{"key": "global", "rates": ["1/hour"], "name": "tiny"}]}
    proxy = await proxy_factory(upstream.address, {"policies": [limits]})
    # Two recipients at once exceed the burst of 1/hour for good: a 5xx by sendguard.
    code, _ = await submit(proxy.port, recipients=["bob@example.org", "carol@example.org"])
    assert code == 250  # bob went through; carol was refused
    await proxy.wait_audit(1)
    _, _, text = await get(proxy.http_port, "/metrics")
    assert rcpt(text, "delivered") == 1
    assert (rcpt(text, "tempfailed") or 0) + (rcpt(text, "refused_policy") or 0) == 1
    assert sample(text, "sendguard_ratelimit_refusals_total", limit="tiny") == 1


async def test_upstream_connect_pool_wait_policy_latency_and_up(
    upstream: FakeUpstream, proxy_factory: Callable[..., Awaitable[Proxy]]
) -> None:
    proxy = await proxy_factory(upstream.address)
    _, _, text = await get(proxy.http_port, "/metrics")
    assert sample(text, "sendguard_upstream_up") == 1  # nothing tried: nothing known wrong
    assert sample(text, "sendguard_policy_duration_seconds_count", policy="required_headers") == 0
    for _ in range(2):
        assert (await submit(proxy.port))[0] == 250
    await proxy.wait_audit(2)
    _, _, text = await get(proxy.http_port, "/metrics")
    # One new connection (the second transaction reuses it from the pool): one connect.
    assert sample(text, "sendguard_upstream_stage_duration_seconds_count", stage="connect") == 1
    assert sample(text, "sendguard_upstream_stage_duration_seconds_count", stage="mail") == 2
    assert sample(text, "sendguard_upstream_pool_wait_seconds_count") == 2
    # required_headers runs at MAIL and after DATA: two checks a message, each timed.
    assert (sample(text, "sendguard_policy_duration_seconds_count", policy="required_headers") or 0) >= 2
    assert sample(text, "sendguard_upstream_up") == 1


async def test_upstream_up_drops_when_it_cannot_be_reached(proxy_factory: Callable[..., Awaitable[Proxy]]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    proxy = await proxy_factory(f"127.0.0.1:{dead_port}")
    assert (await submit(proxy.port))[0] == 451
    _, _, text = await get(proxy.http_port, "/metrics")
    assert sample(text, "sendguard_upstream_up") == 0
    assert sample(text, "sendguard_upstream_replies_total", stage="connect", code_class="error") == 1
    assert sample(text, "sendguard_upstream_stage_duration_seconds_count", stage="connect") == 0


async def test_openmetrics_gzip_process_collectors_and_no_created_series(proxy: Proxy) -> None:
    url = f"http://127.0.0.1:{proxy.http_port}/metrics"
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"}
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            text = gzip.decompress(await response.read()).decode()
    assert text.rstrip().endswith("# EOF")
    assert "_created" not in text
    assert re.search(r"^process_resident_memory_bytes ", text, re.M)
    assert re.search(r"^python_info\{", text, re.M)
    # A plain scrape (curl) still gets the text format.
    _, content_type, plain = await get(proxy.http_port, "/metrics")
    assert content_type.startswith("text/plain") and "# EOF" not in plain


def _readme_table() -> dict[str, set[str]]:
    """metric name -> labels, from the README's table of `sendguard_` families."""
    rows: dict[str, set[str]] = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\| `(sendguard_\w+)` \| (\w+) \| ([^|]*) \|", line)
        if match:
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(3)))
    return rows


def _families(text: str) -> dict[str, set[str]]:
    """family name as scraped (counters with _total) -> label names seen on its samples."""
    types = dict(re.findall(r"^# TYPE (sendguard_\w+) (\w+)$", text, re.M))
    families: dict[str, set[str]] = {}
    for name, kind in types.items():
        shown = f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
        labels: set[str] = set()
        for sample_name, label_text in re.findall(r"^(sendguard_\w+)\{([^}]*)\}", text, re.M):
            if sample_name in (name, shown) or sample_name in (f"{name}_bucket", f"{name}_count", f"{name}_sum"):
                labels |= set(re.findall(r'(\w+)="', label_text)) - {"le"}
        families[shown] = labels
    return families


async def test_the_readme_metric_table_is_what_metrics_shows(
    upstream: FakeUpstream, proxy_factory: Callable[..., Awaitable[Proxy]], tmp_path: Path
) -> None:
    limits = {"name": "rate_limit", "limits": [{"key": "global", "rates": ["100/hour"], "name": "hourly"}]}
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "required_headers"}, limits]})
    assert (await submit(proxy.port, message()))[0] == 250
    await proxy.wait_audit(1)
    _, _, text = await get(proxy.http_port, "/metrics")
    scraped = _families(text)
    # The unsubscribe families exist with unsubscribe: enabled; their own registry shows them.
    extra = CollectorRegistry()
    UnsubscribeMetrics(extra)
    WebhookMetrics(extra)  # likewise with webhooks.endpoints or api.address
    scraped.update(_families(generate_latest(extra).decode()))
    documented = _readme_table()
    assert len(documented) >= 40
    assert sorted(set(documented) - set(scraped)) == [], "in the README, not in /metrics"
    assert sorted(set(scraped) - set(documented)) == [], "in /metrics, not in the README"
    wrong = {
        name: (documented[name], labels)
        for name, labels in scraped.items()
        if labels and labels != documented[name]  # a family with no sample yet shows no labels
    }
    assert wrong == {}
    # Every metric named anywhere in the README's prose exists, and so do the labels it gives
    # in braces (`sendguard_recipients_total{outcome}`, `{stage="connect"}`).
    text_of_readme = README.read_text()
    for name, braces in re.findall(r"\b(sendguard_[a-z_]*[a-z])(\{[^}]*\})?", text_of_readme):
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        if family in ("sendguard_unsubscribe",):  # "the sendguard_unsubscribe* families"
            continue
        assert family in scraped, f"the README names {name}, which /metrics does not have"
        for label in re.findall(r"(\w+)(?:=|,|\})", braces or ""):
            assert label in documented[family], f"the README gives {name} a label {label} it does not have"
    # Families whose labels could not be seen must be few and known to start empty.
    unseen = {name for name, labels in scraped.items() if not labels and documented[name]}
    assert unseen <= {
        "sendguard_blocklist_listed",
        "sendguard_blocklist_unknown",
        "sendguard_pause_until_timestamp_seconds",
        "sendguard_dkim_domain_signatures_total",
        "sendguard_backoff_matches_total",
        "sendguard_backoff_pauses_total",
    }, unseen


async def test_consent_lookups_are_timed_and_their_errors_counted(
    upstream: FakeUpstream, proxy_factory: Callable[..., Awaitable[Proxy]], tmp_path: Path
) -> None:
    from tests.test_classification_relay import compliance, promotion

    proxy = await proxy_factory(upstream.address, compliance(tmp_path))
    code, _ = await submit(proxy.port, promotion(), sender="info@dehoek.example", recipients=["klant@example.org"])
    assert code == 550  # commercial, no consent: the store was asked
    _, _, text = await get(proxy.http_port, "/metrics")
    asked = sum(
        sample(text, "sendguard_consent_lookups_total", operation=op, result="ok") or 0 for op in ("basis", "history")
    )
    assert asked >= 1
    timed = sum(
        sample(text, "sendguard_consent_lookup_duration_seconds_count", operation=op) or 0
        for op in ("basis", "history")
    )
    assert timed == asked
    # The store closed under the policy: the look-up fails, is counted as an error, 451.
    consent = proxy.app.runtime.consent
    assert consent is not None
    await consent.close()
    code, _ = await submit(proxy.port, promotion(), sender="info@dehoek.example", recipients=["klant@example.org"])
    assert code == 451
    _, _, text = await get(proxy.http_port, "/metrics")
    errors = sum(
        sample(text, "sendguard_consent_lookups_total", operation=op, result="error") or 0
        for op in ("basis", "history")
    )
    assert errors >= 1


def test_the_pause_gauge_shows_when_each_pause_ends_and_forgets_ended_ones() -> None:
    from proxy.observability.metrics import Metrics
    from proxy.stores.pauses import Pause

    metrics = Metrics("test")
    throttle = Pause("class", "commercial", 2_000_000_000.0, "421 try later", "throttling")
    listed = Pause("all", "*", 2_000_000_500.0, "listed on bl.test", "blocklist")
    metrics.set_pause_counts([throttle, listed])
    get_value = metrics.registry.get_sample_value
    assert get_value("sendguard_pause_until_timestamp_seconds", {"scope": "class", "reason": "throttling"}) == 2e9
    assert get_value("sendguard_pauses_active", {"scope": "all"}) == 1
    metrics.set_pause_counts([listed])
    assert get_value("sendguard_pause_until_timestamp_seconds", {"scope": "class", "reason": "throttling"}) is None
    assert (
        get_value("sendguard_pause_until_timestamp_seconds", {"scope": "all", "reason": "blocklist"}) == 2_000_000_500
    )
