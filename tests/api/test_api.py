"""The consent API against the real aiohttp server, the real consent store (SQLite, and
PostgreSQL where marked) and the real limit store (memory, and Redis where marked); every
answer is checked against the OpenAPI document (harness.conform)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.api.openapi import openapi_document
from proxy.api.server import build_api_app, dumps_document
from proxy.config.settings import ConfigError, load_config_text
from tests.api.harness import READER, WRITER, Api, api_section, stores_section
from tests.services import PostgresTarget, RedisTarget

ROOT = Path(__file__).resolve().parents[2]
BOB = "bob@example.org"
OPT_IN = {
    "address": BOB,
    "event": "opted_in",
    "method": "web_form",
    "topic": "newsletter",
    "source": "https://shop.example/signup",
    "ip": "198.51.100.7",
    "user_agent": "Firefox",
    "text_version": "v3",
}


@pytest.mark.parametrize(
    ("name", "method", "path", "route", "token", "body", "status", "says"),
    [
        ("no token", "GET", f"/v1/addresses/{BOB}/status", "/v1/addresses/{address}/status", None, None, 401, "Bearer"),
        (
            "unknown token",
            "GET",
            f"/v1/addresses/{BOB}/history",
            "/v1/addresses/{address}/history",
            "sgapi_nope",
            None,
            401,
            "unknown token",
        ),
        ("read token writes", "POST", "/v1/events", None, READER, OPT_IN, 403, "lacks the write scope"),
        (
            "read token reads",
            "GET",
            f"/v1/addresses/{BOB}/status",
            "/v1/addresses/{address}/status",
            READER,
            None,
            200,
            "",
        ),
        ("opt-in with evidence", "POST", "/v1/events", None, WRITER, OPT_IN, 201, ""),
        (
            "opt-in without method",
            "POST",
            "/v1/events",
            None,
            WRITER,
            {"address": BOB, "event": "opted_in"},
            422,
            "method for opted_in",
        ),
        ("bad ip", "POST", "/v1/events", None, WRITER, OPT_IN | {"ip": "300.1.1.1"}, 422, "is not an IP address"),
        (
            "unknown field",
            "POST",
            "/v1/events",
            None,
            WRITER,
            OPT_IN | {"colour": "red"},
            422,
            "unknown field(s): colour",
        ),
        ("not an object", "POST", "/v1/events", None, WRITER, ["x"], 400, "JSON object"),
        ("number value", "POST", "/v1/events", None, WRITER, OPT_IN | {"ip": 7}, 422, "ip must be a string"),
        ("future", "POST", "/v1/events", None, WRITER, OPT_IN | {"at": "2999-01-01T00:00:00Z"}, 422, "in the future"),
        ("opt-out", "POST", "/v1/opt-outs", None, WRITER, {"address": BOB, "topic": "newsletter"}, 201, ""),
        (
            "opt-out of another kind",
            "POST",
            "/v1/opt-outs",
            None,
            WRITER,
            {"address": BOB, "event": "opted_in"},
            422,
            "records opted_out",
        ),
        (
            "suppression without reason",
            "POST",
            "/v1/suppressions",
            None,
            WRITER,
            {"address": BOB},
            422,
            "suppressed needs a reason",
        ),
        ("suppression", "POST", "/v1/suppressions", None, WRITER, {"address": BOB, "reason": "CRM: deceased"}, 201, ""),
        (
            "status of a non-address",
            "GET",
            "/v1/addresses/nobody/status",
            "/v1/addresses/{address}/status",
            READER,
            None,
            422,
            "not an address",
        ),
    ],
)
async def test_routes(
    api_factory: Any,
    name: str,
    method: str,
    path: str,
    route: str | None,
    token: str | None,
    body: Any,
    status: int,
    says: str,
) -> None:
    api: Api = await api_factory()
    got, answer, headers = await api.call(method, path, token=token, body=body, route=route)
    assert got == status, (name, answer)
    if says:
        assert says in json.dumps(answer), (name, answer)
    if status == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_status_follows_the_consent_rules_and_every_change_is_audited(api_factory: Any) -> None:
    api: Api = await api_factory()
    status_route = "/v1/addresses/{address}/status"
    status, answer, _ = await api.call("GET", f"/v1/addresses/{BOB}/status?topic=newsletter", route=status_route)
    assert (status, answer["allowed"], answer["basis"]["basis"]) == (200, False, "none")
    status, recorded, _ = await api.call("POST", "/v1/events", body=OPT_IN)
    assert status == 201
    assert recorded["event"]["ip"] == "198.51.100.7"
    assert recorded["event"]["text_version"] == "v3"
    _, answer, _ = await api.call("GET", f"/v1/addresses/{BOB}/status?topic=newsletter", route=status_route)
    assert (answer["allowed"], answer["basis"]["basis"]) == (True, "opt_in")
    assert answer["basis"]["record"]["id"] == recorded["event"]["id"]
    await api.call("POST", "/v1/opt-outs", body={"address": BOB, "topic": "newsletter", "reason": "CRM preference"})
    _, answer, _ = await api.call("GET", f"/v1/addresses/{BOB}/status?topic=newsletter", route=status_route)
    assert (answer["allowed"], answer["basis"]["basis"]) == (False, "opted_out")
    # As the store knew it before the opt-out: the decision sendguard made then.
    at = recorded["event"]["recorded_at"]
    _, answer, _ = await api.call("GET", f"/v1/addresses/{BOB}/status?topic=newsletter&at={at}", route=status_route)
    assert answer["allowed"] is True
    _, history, _ = await api.call("GET", f"/v1/addresses/{BOB}/history", route="/v1/addresses/{address}/history")
    assert [e["event"] for e in history["events"]] == ["opted_in", "opted_out"]
    assert history["events"][1]["method"] == "api"
    lines = [line for line in await api.proxy.wait_audit(2) if line.get("event") == "api"]
    assert [(line["action"], line["token"], line["recipient"]) for line in lines] == [
        ("opted_in", "crm", BOB),
        ("opted_out", "crm", BOB),
    ]
    assert lines[0]["record"] == recorded["event"]["id"]


async def test_a_retried_post_records_once_sqlite(api_factory: Any, tmp_path: Path) -> None:
    await retried_post_records_once(await api_factory())


async def test_a_retried_post_records_once_postgres(
    api_factory: Any, tmp_path: Path, postgres_target: PostgresTarget
) -> None:
    await retried_post_records_once(
        await api_factory({"stores": stores_section(tmp_path, "postgres", "memory", postgres_target, None)})
    )


async def retried_post_records_once(api: Api) -> None:
    key = {"Idempotency-Key": "crm-7f3a"}
    first = await api.call("POST", "/v1/events", body=OPT_IN, headers=key)
    again = await api.call("POST", "/v1/events", body=OPT_IN, headers=key)
    assert first[0] == again[0] == 201
    assert first[1] == again[1]
    assert again[2].get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first[2]
    _, history, _ = await api.call("GET", f"/v1/addresses/{BOB}/history", route="/v1/addresses/{address}/history")
    assert len(history["events"]) == 1
    # The same key with another body is a mistake of the caller's, not a retry.
    status, answer, _ = await api.call("POST", "/v1/events", body=OPT_IN | {"topic": "offers"}, headers=key)
    assert status == 422
    assert "another request" in answer["error"]
    # A refusal is an answer too: replayed, not recorded on a second try.
    bad = {"Idempotency-Key": "crm-bad"}
    first = await api.call("POST", "/v1/events", body={"address": BOB, "event": "opted_in"}, headers=bad)
    again = await api.call("POST", "/v1/events", body={"address": BOB, "event": "opted_in"}, headers=bad)
    assert first[0] == again[0] == 422
    # Several POSTs with one key at once: exactly one records, the others wait or replay.
    burst = {"Idempotency-Key": "crm-burst"}
    answers = await asyncio.gather(
        *(api.call("POST", "/v1/opt-outs", body={"address": BOB}, headers=burst) for _ in range(6))
    )
    assert {status for status, _, _ in answers} <= {201, 409}
    _, history, _ = await api.call("GET", f"/v1/addresses/{BOB}/history", route="/v1/addresses/{address}/history")
    assert [e["event"] for e in history["events"]].count("opted_out") == 1


async def test_each_token_has_its_own_rate_limit_memory(api_factory: Any) -> None:
    await own_rate_limit(await api_factory({"api": api_section(rate="3/min")}))


async def test_each_token_has_its_own_rate_limit_redis(
    api_factory: Any, tmp_path: Path, redis_target: RedisTarget
) -> None:
    stores = stores_section(tmp_path, "sqlite", "redis", None, redis_target)
    await own_rate_limit(await api_factory({"api": api_section(rate="3/min"), "stores": stores}))


async def own_rate_limit(api: Api) -> None:
    route = "/v1/addresses/{address}/status"
    codes = [(await api.call("GET", f"/v1/addresses/{BOB}/status", route=route))[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    status, answer, headers = await api.call("GET", f"/v1/addresses/{BOB}/status", route=route)
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 20
    assert "crm" in answer["error"]
    # Another token's budget is its own.
    assert (await api.call("GET", f"/v1/addresses/{BOB}/status", token=READER, route=route))[0] == 200


CSV_OK = (
    "address,event,method,topic,source\r\n"
    "ann@example.org,opted_in,web_form,newsletter,https://shop.example/f\r\n"
    "cid@example.org,opted_out,link,newsletter,\r\n"
)
NDJSON_OK = "\n".join(
    json.dumps(row)
    for row in (
        {"address": "ann@example.org", "event": "opted_in", "method": "import", "source": "crm export"},
        {"address": "cid@example.org", "event": "suppressed", "method": "import", "reason": "crm: bounced"},
        {
            "address": "dan@example.org",
            "event": "customer",
            "sender": "shop.example",
            "product_category": "shoes",
            "objection_offered": True,
        },
    )
)


@pytest.mark.parametrize(
    ("name", "content_type", "data", "status", "imported", "says"),
    [
        ("json lines", "application/x-ndjson", NDJSON_OK.encode(), 200, 3, ""),
        ("csv", "text/csv", CSV_OK.encode(), 200, 2, ""),
        (
            "a bad line",
            "application/x-ndjson",
            (NDJSON_OK + '\n{"address": "x@y.example", "event": "opted_in"}\nnope').encode(),
            422,
            0,
            "line 4: method for opted_in",
        ),
        (
            "bad csv header",
            "text/csv",
            b"mail,event\r\nann@example.org,opted_in\r\n",
            422,
            0,
            "unknown column(s): mail",
        ),
        ("too large", "application/x-ndjson", b'{"address": "a@b.example"}\n' * 2000, 413, 0, "at most"),
        ("not a format", "application/json", b"[]", 415, 0, "x-ndjson"),
    ],
)
async def test_bulk_import(
    api_factory: Any, name: str, content_type: str, data: bytes, status: int, imported: int, says: str
) -> None:
    api: Api = await api_factory({"api": api_section(max_import="32KB")})
    got, answer, _ = await api.call("POST", "/v1/imports", data=data, headers={"Content-Type": content_type})
    assert got == status, (name, answer)
    if says:
        assert says in json.dumps(answer), (name, answer)
    store = api.proxy.app.runtime.consent
    assert store is not None
    assert await store.count() == imported
    if status == 200:
        assert answer == {"imported": imported}
        lines = [line for line in await api.proxy.wait_audit(1) if line.get("event") == "api"]
        assert lines[-1]["action"] == "import"
        assert lines[-1]["count"] == imported


async def test_the_served_document_is_the_committed_one_and_names_every_route(api_factory: Any) -> None:
    api: Api = await api_factory()
    async with api.session.get(api.base + "/openapi.json") as response:
        served = await response.text()
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert served == committed, "stale: python -m proxy.api.openapi > docs/openapi.json"
    document = json.loads(served)
    assert document["openapi"].startswith("3.1")
    routes = {
        (resource.canonical, route.method.lower())
        for resource in build_api_app(api.proxy.app.api_server.ctx).router.resources()  # type: ignore[union-attr]
        for route in resource
        if route.method != "HEAD"
    }
    declared = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == declared
    assert dumps_document(openapi_document()) == committed


@pytest.mark.parametrize(
    ("name", "api", "problem"),
    [
        (
            "the metrics address",
            {"address": "127.0.0.1:9025", "tokens": [{"name": "a", "hash": "sha256:" + "0" * 64}]},
            "api.address",
        ),
        ("no tokens", {"address": "127.0.0.1:8026"}, "at least one token"),
        ("a plain token", {"address": "127.0.0.1:8026", "tokens": [{"name": "a", "hash": "secret"}]}, "sha256:"),
        ("unknown key", {"adress": "127.0.0.1:8026"}, "adress"),
        (
            "unknown scope",
            {"address": "127.0.0.1:8026", "tokens": [{"name": "a", "hash": "sha256:" + "0" * 64, "scopes": ["admin"]}]},
            "scopes",
        ),
    ],
)
def test_config_errors_name_the_path(name: str, api: dict[str, Any], problem: str) -> None:
    text = (
        "listeners: [{name: local, address: 127.0.0.1:2525}]\nhttp: {address: 127.0.0.1:9025}\napi: "
        + json.dumps(api)
        + "\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "test.yaml")
    shown = str(caught.value)
    assert problem in shown, (name, shown)
    assert "test.yaml:3" in shown, (name, shown)


def test_webhook_config_errors() -> None:
    base = "listeners: [{name: local, address: 127.0.0.1:2525}]\nwebhooks:\n  endpoints:\n"
    for endpoint, problem in (
        ("  - {url: 'http://crm.example/hook', secret: 0123456789abcdef}", "use https://"),
        ("  - {url: 'https://crm.example/hook', secret: short}", "at least 16"),
        ("  - {url: 'https://crm.example/hook', secret: 0123456789abcdef, events: [opened]}", "events"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_config_text(base + endpoint + "\n", "w.yaml")
        assert problem in str(caught.value)
        assert "w.yaml:4" in str(caught.value)


async def test_an_import_retried_with_its_key_records_once(api_factory: Any) -> None:
    api: Api = await api_factory({"api": api_section(max_import="32KB", max_body="8KB")})
    headers = {"Content-Type": "text/csv", "Idempotency-Key": "export-2026-12-03"}
    first = await api.call("POST", "/v1/imports", data=CSV_OK.encode(), headers=headers)
    again = await api.call("POST", "/v1/imports", data=CSV_OK.encode(), headers=headers)
    assert first[:2] == again[:2] == (200, {"imported": 2})
    assert again[2]["Idempotent-Replayed"] == "true"
    store = api.proxy.app.runtime.consent
    assert store is not None
    assert await store.count() == 2
    # Larger than a JSON body may be, within what an import may be: the key's path reads it all.
    rows = "".join(f"p{n}@example.org,opted_in,web_form,newsletter,https://shop.example/f\r\n" for n in range(400))
    big = ("address,event,method,topic,source\r\n" + rows).encode()
    assert 32 * 1024 > len(big) > 8 * 1024
    status, answer, _ = await api.call("POST", "/v1/imports", data=big, headers=headers | {"Idempotency-Key": "big"})
    assert (status, answer) == (200, {"imported": 400})


async def test_tokens_follow_a_reload(api_factory: Any) -> None:
    api: Api = await api_factory()
    route = "/v1/addresses/{address}/status"
    assert (await api.call("GET", f"/v1/addresses/{BOB}/status", token=READER, route=route))[0] == 200
    config = yaml.safe_load(api.proxy.config_path.read_text())
    config["api"]["tokens"] = [t for t in config["api"]["tokens"] if t["name"] != "dashboard"]
    api.proxy.config_path.write_text(yaml.safe_dump(config))
    assert await api.proxy.app.reload()
    assert (await api.call("GET", f"/v1/addresses/{BOB}/status", token=READER, route=route))[0] == 401
    assert (await api.call("GET", f"/v1/addresses/{BOB}/status", token=WRITER, route=route))[0] == 200
