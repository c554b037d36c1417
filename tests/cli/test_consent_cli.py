"""``sendguard consent``: the commands against SQLite and the real PostgreSQL, from a config file.

The commands are run in-process (``run_consent``) with their output captured, and once as
``python -m proxy.cli.consent`` in a subprocess, as an operator would.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli.consent import EXIT_BAD_INPUT, EXIT_OK, EXIT_STORE_DOWN, build_parser, run_consent
from proxy.stores.consent import ConsentStoreConfig, open_consent_store
from tests.stores.test_consent_store import closed_port

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


def write_config(tmp_path: Path, store: dict[str, Any], *, soft_opt_in: bool = True) -> Path:
    config: dict[str, Any] = {
        "listeners": [{"name": "local", "address": "127.0.0.1:2525"}],
        "stores": {"consent": store},
        "policies": [{"name": "required_headers"}],
    }
    if soft_opt_in:
        config["policies"].append(
            {
                "name": "consent",
                "soft_opt_in": {"enabled": True, "max_age": "730d", "topics": {"newsletter": ["shoes"]}},
            }
        )
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sendguard.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(params=BACKENDS)
def config_file(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if request.param == "sqlite":
        return write_config(tmp_path, {"backend": "sqlite", "path": str(tmp_path / "var" / "consent.db")})
    target = request.getfixturevalue("postgres_target")
    monkeypatch.setenv("SG_TEST_CONSENT_DSN", target.dsn)  # the DSN comes from the environment, as a secret would
    return write_config(tmp_path, {"backend": "postgres", "dsn": "${SG_TEST_CONSENT_DSN}", "timeout": "3s"})


async def cli(config: Path, *argv: str) -> tuple[int, str, str]:
    command, *rest = argv
    args = build_parser().parse_args(["consent", command, "--config", str(config), *rest])
    out, err = io.StringIO(), io.StringIO()
    code = await run_consent(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_add_revoke_suppress_and_show(config_file: Path) -> None:
    code, out, err = await cli(
        config_file,
        "add",
        "Bob@Example.org",
        "--topic",
        "newsletter",
        "--method",
        "double_opt_in",
        "--at",
        "2025-03-01T10:00:00Z",
        "--confirmed-at",
        "2025-03-01T10:04:00Z",
        "--ip",
        "192.0.2.7",
        "--text-version",
        "v3",
        "--source",
        "https://shop.example/signup",
    )
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith("recorded opted_in for bob@example.org as record #")

    code, out, _ = await cli(config_file, "show", "bob@example.org", "--topic", "newsletter")
    assert code == EXIT_OK
    assert "double_opt_in" in out and "text_version=v3" in out and "ip=192.0.2.7" in out
    assert "ALLOWED [opt_in]" in out

    assert (await cli(config_file, "revoke", "bob@example.org", "--topic", "newsletter", "--method", "link"))[0] == 0
    code, out, _ = await cli(config_file, "show", "bob@example.org", "--topic", "newsletter", "--json")
    document = json.loads(out)
    assert [e["event"] for e in document["events"]] == ["opted_in", "opted_out"]
    assert document["basis"]["basis"] == "opted_out" and document["basis"]["allowed"] is False
    assert document["events"][0]["address"] == "Bob@Example.org"  # the original spelling is kept

    code, out, _ = await cli(
        config_file, "suppress", "bob@example.org", "--reason", "mailbox gone", "--method", "hard_bounce"
    )
    assert code == EXIT_OK
    code, out, _ = await cli(config_file, "show", "bob@example.org", "--topic", "offers", "--json")
    assert json.loads(out)["basis"]["basis"] == "suppressed"
    code, out, _ = await cli(config_file, "unsuppress", "bob@example.org", "--reason", "address valid again")
    assert code == EXIT_OK
    code, out, _ = await cli(config_file, "count")
    assert out.strip() == "4"


async def test_show_judges_with_the_configured_soft_opt_in_scope(config_file: Path) -> None:
    code, _, err = await cli(
        config_file,
        "customer",
        "carol@example.org",
        "--sender",
        "shop.example",
        "--category",
        "shoes",
        "--objection-offered",
        "yes",
        "--at",
        "2025-06-01",
        "--relation",
        "order 77",
    )
    assert code == EXIT_OK, err
    _, out, _ = await cli(config_file, "show", "carol@example.org", "--topic", "newsletter", "--sender", "shop.example")
    assert "ALLOWED [soft_opt_in]" in out
    _, out, _ = await cli(config_file, "show", "carol@example.org", "--topic", "offers", "--sender", "shop.example")
    assert "REFUSED [none]" in out and "may advertise none" in out
    _, out, _ = await cli(config_file, "show", "carol@example.org", "--topic", "newsletter", "--at", "2025-05-01")
    assert "0 event(s) as known at" in out


async def test_import_reports_every_problem_by_line_and_writes_nothing(config_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "contacts.csv"
    source.write_text(
        "address,event,at,topic,method,sender,product_category,objection_offered,reason\n"
        "ann@example.org,opted_in,2024-01-01,newsletter,web_form,,,,\n"
        "not-an-address,opted_in,2024-01-01,newsletter,web_form,,,,\n"
        "cat@example.org,customer,2024-02-01,,sale,shop.example,shoes,perhaps,\n"
        "dan@example.org,suppressed,2024-03-01,,manual,,,,\n"
        "eve@example.org,opted_in,2099-01-01,newsletter,web_form,,,,\n",
        encoding="utf-8",
    )
    code, _, err = await cli(config_file, "import", str(source))
    assert code == EXIT_BAD_INPUT
    lines = err.splitlines()
    assert "nothing was imported" in lines[0]
    assert lines[1].strip() == "5 row(s): opted_in 1, error 4"
    assert lines[2].strip() == "4 problem(s):"
    assert [line.split(":")[0].strip() for line in lines[3:]] == ["line 3", "line 4", "line 5", "line 6"]
    assert "is not an address" in lines[3]
    assert "objection_offered must be yes or no" in lines[4]
    assert "suppressed needs a reason" in lines[5]
    assert "in the future" in lines[6]
    assert (await cli(config_file, "count"))[1].strip() == "0"


async def test_import_then_export_round_trips(config_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "contacts.csv"
    rows = [
        {"address": "Ann@Example.org", "event": "opted_in", "at": "2024-01-01T08:00:00Z", "topic": "newsletter",
         "method": "double_opt_in", "confirmed_at": "2024-01-01T08:03:00Z", "ip": "198.51.100.4",
         "user_agent": "Mozilla/5.0, like Gecko", "text_version": "2024-01", "source": "https://shop.example/f"},
        {"address": "@bigcorp.example", "event": "opted_in", "at": "2024-02-01", "topic": "*",
         "method": "paper", "source": "contract 2024-17"},
        {"address": "cat@example.org", "event": "customer", "at": "2024-03-01", "sender": "shop.example",
         "product_category": "shoes", "objection_offered": "yes", "relation": "order 9"},
        {"address": "dan@example.org", "event": "suppressed", "at": "2024-04-01", "method": "complaint",
         "reason": "ARF complaint", "upstream_reply": "abuse report via FBL"},
    ]  # fmt: skip
    with source.open("w", newline="", encoding="utf-8-sig") as handle:  # a BOM, as spreadsheets write it
        columns = sorted({key for row in rows for key in row})
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    code, out, err = await cli(config_file, "import", str(source), "--dry-run")
    assert (code, err) == (EXIT_OK, "") and "nothing written" in out
    assert (await cli(config_file, "count"))[1].strip() == "0"
    code, out, err = await cli(config_file, "import", str(source))
    assert (code, err) == (EXIT_OK, "")
    assert out.splitlines()[0] == f"imported 4 event(s) from {source}"

    exported_csv = tmp_path / "out.csv"
    assert (await cli(config_file, "export", str(exported_csv)))[0] == EXIT_OK
    with exported_csv.open(encoding="utf-8") as handle:
        exported = list(csv.DictReader(handle))
    assert [row["address"] for row in exported] == [row["address"] for row in rows]
    for original, back in zip(rows, exported, strict=True):
        for key, value in original.items():
            if key in ("at", "confirmed_at"):
                assert back[key].startswith(value.rstrip("Z")), key
            else:
                assert back[key] == value, key
    assert all(row["id"] and row["recorded_at"] for row in exported)

    code, out, _ = await cli(config_file, "export", "--format", "jsonl")
    documents = [json.loads(line) for line in out.splitlines()]
    assert [d["event"] for d in documents] == ["opted_in", "opted_in", "customer", "suppressed"]
    assert documents[2]["objection_offered"] is True

    # Moving the store: the export imports into another store with its recording times kept.
    other = write_config(tmp_path / "other", {"path": str(tmp_path / "other" / "consent.db")})
    code, _, err = await cli(other, "import", str(exported_csv), "--keep-recorded-at")
    assert code == EXIT_OK, err
    moved = tmp_path / "moved.csv"
    await cli(other, "export", str(moved))
    with moved.open(encoding="utf-8") as handle:
        assert [{k: v for k, v in row.items() if k != "id"} for row in csv.DictReader(handle)] == [
            {k: v for k, v in row.items() if k != "id"} for row in exported
        ]


async def test_bad_arguments_exit_2_and_write_nothing(config_file: Path) -> None:
    code, _, err = await cli(config_file, "add", "bob", "--topic", "news", "--method", "api")
    assert code == EXIT_BAD_INPUT and "is not an address" in err
    code, _, err = await cli(config_file, "add", "bob@example.org", "--topic", "news", "--method", "api", "--at", "x")
    assert code == EXIT_BAD_INPUT and "not a time" in err
    code, _, err = await cli(config_file, "customer", "c@example.org", "--sender", "*", "--category", "shoes",
                             "--objection-offered", "no")  # fmt: skip
    assert code == EXIT_BAD_INPUT and "belongs to one sender" in err
    code, _, err = await cli(config_file, "show", "nobody")
    assert code == EXIT_BAD_INPUT
    assert (await cli(config_file, "count"))[1].strip() == "0"


async def test_a_broken_config_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"backend": "postgres"})  # no dsn
    code, _, err = await cli(path, "count")
    assert code == EXIT_BAD_INPUT
    assert "stores.consent" in err and "needs a dsn" in err
    path.write_text(yaml.safe_dump({"stores": {"consent": {"bakend": "sqlite"}}}))
    code, _, err = await cli(path, "count")
    assert code == EXIT_BAD_INPUT and "did you mean 'backend'" in err


async def test_an_unreachable_store_exits_3(tmp_path: Path) -> None:
    dsn = f"postgresql://sendguard:hunter2@127.0.0.1:{closed_port()}/consent"
    path = write_config(tmp_path, {"backend": "postgres", "dsn": dsn, "timeout": "500ms"})
    code, _, err = await cli(path, "show", "bob@example.org")
    assert code == EXIT_STORE_DOWN
    assert "unreachable" in err and "hunter2" not in err


async def test_without_a_stores_section_the_default_sqlite_file_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "plain.yaml"
    path.write_text("listeners: [{name: local, address: '127.0.0.1:2525'}]\n")
    code, _, err = await cli(path, "add", "bob@example.org", "--topic", "*", "--method", "paper")
    assert code == EXIT_OK, err
    assert (tmp_path / "var" / "consent.db").exists()


async def test_runs_as_a_module(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"path": str(tmp_path / "consent.db")})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli.consent", "add", "zoe@example.org", "--topic", "news", "--method", "api",
        "--config", str(config), cwd=str(ROOT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert b"recorded opted_in for zoe@example.org" in out
    store = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "consent.db")))
    try:
        assert (await store.basis("zoe@example.org", "news")).allowed
    finally:
        await store.close()
