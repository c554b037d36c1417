"""Every query of the shipped Grafana dashboard (deploy/grafana/dashboards/sendguard.json),
evaluated by a real Prometheus (Debian's package) that scrapes a real sendguard under a small
load, returns data; the same Prometheus loads the shipped alert rules.

Everything on 127.0.0.1 with ephemeral ports; the load is bounded in count (48 messages) and
time; Prometheus gets its own data directory and is stopped at the end. Grafana itself cannot
be run here (no packages, no images): its provisioning files are checked for shape only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.reputation.dkim import generate_private_key, write_private_key
from proxy.stores.pauses import Pause
from tests.conftest import ROOT, Proxy, message, need_program, submit
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream, Faults

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sendguard.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
MESSAGES = 48


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with the dashboard's variables set to 'all'."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$instance", ".*").replace("$job", ".*")
            queries.append((panel["title"], expr))
    return queries


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target_port: int) -> AsyncIterator[str]:
    binary = need_program("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "sendguard", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/-/ready") as response:
                        if response.status == 200:
                            break
                if process.returncode is not None or time.monotonic() > deadline:
                    pytest.fail(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
                await asyncio.sleep(0.2)
        yield base
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def query(session: aiohttp.ClientSession, base: str, expr: str) -> list[Any]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


async def test_every_dashboard_query_returns_data_from_a_live_sendguard(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Awaitable[Proxy]],
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    dns = await DNSServer().start()  # answers NXDOMAIN: nothing listed, the watch completes
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"dead@example.org": "550 5.1.1 no such user"}))
    key = tmp_path / "dkim.pem"
    write_private_key(key, generate_private_key("ed25519-sha256"))
    proxy = await proxy_factory(
        upstream.address,
        {
            "policies": [
                {"name": "required_headers"},
                {"name": "rate_limit", "limits": [{"key": "global", "rates": ["1000/hour"], "name": "hourly"}]},
            ],
            "dkim": {
                "keys": [
                    {"domain": "example.com", "selector": "s1", "key_file": str(key), "algorithm": "ed25519-sha256"}
                ]
            },
            "backoff": {
                "rules": [{"name": "throttling", "match": {"code": "4xx", "text": "try again"}, "threshold": "5/10m"}]
            },
            "dns": {
                "resolver": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "1s"},
                "sending_ips": ["203.0.113.10"],
                "blocklists": {"zones": [{"zone": "bl.test", "type": "ip", "self_test": False}]},
            },
        },
    )
    # A pause for one sender domain, as a backoff rule would set it: the pause gauges show it.
    await proxy.app.runtime.pauses.pause(
        Pause(scope="sender", value="paused.example", until=time.time() + 3600, reason="test", source="throttle")
    )
    try:
        async with prometheus(tmp_path, proxy.http_port) as base:
            # The load: delivered, refused upstream, refused by a policy, paused; 4 at a time.
            kinds = [
                dict(content=message()),
                dict(content=message(), recipients=["bob@example.org", "dead@example.org"]),
                dict(content=b"To: x@example.org\r\n\r\nno from\r\n"),
                dict(content=message(sender="news@paused.example"), sender="news@paused.example"),
            ]
            gate = asyncio.Semaphore(4)

            async def one(i: int) -> int:
                async with gate:
                    return (await submit(proxy.port, **kinds[i % len(kinds)], timeout=10))[0]  # type: ignore[arg-type]

            codes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(MESSAGES))), 60)
            assert sorted(set(codes)) == [250, 451, 550]
            async with aiohttp.ClientSession() as session:
                # Wait for a scrape that saw the whole load (and at least a few before it).
                deadline = time.monotonic() + 30
                while True:
                    done = await query(session, base, "sum(sendguard_messages_total)")
                    if done and float(done[0]["value"][1]) >= MESSAGES:
                        break
                    assert time.monotonic() < deadline, "prometheus never saw the load"
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2.5)  # two more scrapes: rate() has two samples after the load
                empty = []
                queries = dashboard_queries()
                assert len(queries) >= 35
                for title, expr in queries:
                    if not await query(session, base, expr):
                        empty.append(f"{title}: {expr}")
                assert empty == [], "dashboard queries with no data:\n" + "\n".join(empty)
                # The load was signed: DKIM signatures count under the key's domain.
                signed = await query(session, base, 'sendguard_dkim_domain_signatures_total{domain="example.com"} > 0')
                assert signed, "no DKIM signature counted for example.com"
                async with session.get(f"{base}/api/v1/rules") as response:
                    groups = (await response.json())["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                assert len(rules) >= 13 and all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    finally:
        await dns.stop()
    assert time.monotonic() - started < 90


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    dashboards = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/sendguard.yaml").read_text())
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert dashboards["providers"][0]["type"] == "file"
    assert datasources["datasources"][0]["type"] == "prometheus"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "sendguard"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
