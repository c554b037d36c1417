"""Issue 12's admin commands: user list|del, pauses list|lift and limits reset, against the
real users file and the real Redis the proxy shares its state in."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import yaml

from proxy.cli.limits import reset_limits, show_limits
from proxy.cli.main import main
from proxy.cli.pauses import lift_pauses, list_pauses
from proxy.config.settings import Settings, load_config_text
from proxy.smtp.auth import UserStore, add_user
from proxy.stores.limits import Charge, LimitStoreConfig, bucket_key, open_limit_store
from proxy.stores.pauses import Pause, open_pause_store
from tests.services import RedisTarget, redis_target  # noqa: F401 - the fixture


def test_user_list_and_del(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    add_user(str(users), "alice", "alice-password")
    add_user(str(users), "app", "app-password")
    store = UserStore(str(users))
    assert store.check("app", "app-password")
    assert main(["user", "list", "--users-file", str(users)]) == 0
    assert capsys.readouterr().out.split() == ["alice", "app"]  # names only, never the hashes
    assert main(["user", "del", "--users-file", str(users), "app"]) == 0
    assert "app" not in store and store.check("alice", "alice-password")  # the proxy's view follows the file
    assert users.stat().st_mode & 0o777 == 0o600
    assert main(["user", "del", "--users-file", str(users), "app"]) == 1
    assert "no user app" in capsys.readouterr().err


def settings_with_redis(redis: RedisTarget) -> Settings:
    text = yaml.safe_dump(
        {
            "listeners": [{"name": "local", "address": "127.0.0.1:0"}],
            "policies": [
                {
                    "name": "rate_limit",
                    "limits": [
                        {"key": "auth_user", "rates": ["3/min", "100/day"]},
                        {"key": "from_domain", "rates": ["50/h"], "name": "per_domain"},
                    ],
                }
            ],
            "stores": {"state": {"backend": "redis", "url": redis.url, "key_prefix": redis.prefix}},
        }
    )
    return load_config_text(text, "admin.yaml")


async def test_pauses_list_and_lift(redis_target: RedisTarget) -> None:  # noqa: F811
    settings = settings_with_redis(redis_target)
    out, err = io.StringIO(), io.StringIO()
    assert await list_pauses(settings, as_json=False, out=out, err=err) == 0
    assert out.getvalue().strip() == "no pause in force: all mail flows"
    store = open_pause_store(settings.stores.state)
    until = time.time() + 1800
    try:
        await store.pause(Pause("class", "commercial", until, "421 4.7.0 try again later", "upstream-throttling"))
        await store.pause(Pause("sender", "shop.example", until, "bounce rate 7%", "bounces", "commercial"))
    finally:
        await store.close()
    out = io.StringIO()
    assert await list_pauses(settings, as_json=True, out=out, err=err) == 0
    listed = json.loads(out.getvalue())
    assert {(p["scope"], p["value"], p["source"]) for p in listed} == {
        ("class", "commercial", "upstream-throttling"),
        ("sender", "shop.example", "bounces"),
    }
    out = io.StringIO()
    assert await list_pauses(settings, as_json=False, out=out, err=err) == 0
    assert "bounce rate 7%" in out.getvalue() and "upstream-throttling" in out.getvalue()

    out = io.StringIO()
    assert await lift_pauses(settings, ["sender:Shop.Example"], every=False, out=out, err=err) == 0
    assert out.getvalue().startswith("lifted: sender shop.example (bounces")
    out = io.StringIO()
    assert await list_pauses(settings, as_json=True, out=out, err=err) == 0
    assert [p["value"] for p in json.loads(out.getvalue())] == ["commercial"]
    assert await lift_pauses(settings, ["sender:shop.example"], every=False, out=io.StringIO(), err=err) == 1
    assert await lift_pauses(settings, ["nonsense"], every=False, out=io.StringIO(), err=err) == 2
    assert await lift_pauses(settings, [], every=True, out=io.StringIO(), err=err) == 0
    out = io.StringIO()
    assert await list_pauses(settings, as_json=True, out=out, err=err) == 0
    assert json.loads(out.getvalue()) == []


async def test_pauses_in_memory_cannot_be_seen_from_outside() -> None:
    settings = load_config_text(yaml.safe_dump({"listeners": [{"name": "l", "address": "127.0.0.1:0"}]}), "m.yaml")
    err = io.StringIO()
    assert await list_pauses(settings, as_json=False, out=io.StringIO(), err=err) == 2
    assert "in memory" in err.getvalue()


async def test_limits_reset_makes_one_key_full_again(redis_target: RedisTarget) -> None:  # noqa: F811
    settings = settings_with_redis(redis_target)
    config = LimitStoreConfig(backend="redis", url=redis_target.url, key_prefix=redis_target.prefix)
    store = open_limit_store(config)
    try:
        await store.reserve([Charge(bucket_key("auth_user", 60, "alice"), 20, 3, 3)])
        await store.reserve([Charge(bucket_key("auth_user", 86400, "alice"), 864, 100, 3)])
        await store.reserve([Charge(bucket_key("auth_user", 60, "bob"), 20, 3, 2)])
        await store.reserve([Charge(bucket_key("per_domain", 3600, "alice"), 72, 50, 1)])
    finally:
        await store.close()
    out, err = io.StringIO(), io.StringIO()
    assert await reset_limits(settings, "Alice", only="auth_user", store_config=config, out=out, err=err) == 0
    assert out.getvalue().startswith("Alice: 2 budget(s) made full again (auth_user)")
    out = io.StringIO()
    assert await show_limits(settings, "alice", as_json=True, store_config=config, out=out) == 0
    rows = {(r["limit"], r["rate"]): r["available"] for r in json.loads(out.getvalue())}
    assert rows[("auth_user", "3/min")] == 3 and rows[("auth_user", "100/day")] == 100
    assert rows[("per_domain", "50/h")] == 49  # another limit: untouched with --limit
    out = io.StringIO()
    assert await show_limits(settings, "bob", as_json=True, store_config=config, out=out) == 0
    assert {r["rate"]: r["available"] for r in json.loads(out.getvalue())}["3/min"] == 1  # another key: untouched
    assert await reset_limits(settings, "alice", store_config=config, out=io.StringIO(), err=err) == 0
    assert await reset_limits(settings, "alice", only="nope", store_config=config, out=io.StringIO(), err=err) == 2
    assert await reset_limits(settings, "alice", store_config=LimitStoreConfig(), out=io.StringIO(), err=err) == 2
