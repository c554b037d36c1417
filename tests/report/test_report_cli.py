"""``sendguard report``'s answers to bad input: every one exit 2 with a sentence that says what
to do, before anything is read; and ``--out`` writes a file only its owner and group read."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from proxy.cli.main import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "sendguard.yaml"
    path.write_text(
        "listeners: [{name: local, address: '127.0.0.1:2525'}]\n"
        f"stores:\n  consent:\n    path: {tmp_path / 'consent.db'}\naudit:\n  path: {tmp_path / 'audit.jsonl'}\n"
    )
    (tmp_path / "audit.jsonl").write_text(
        json.dumps({"time": "2026-11-02T10:00:00Z", "txn": "t1", "sender": "news@shop.example",
                    "recipients": ["ann@example.org"], "refused": {}, "class": "commercial", "policies": [],
                    "upstream_reply": "250 ok", "copies": None, "outcome": "delivered"}) + "\n"
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "2026-11-01"], "--from and --to go together"),
        ([], "a report needs --from and --to"),
        (["--from", "2026-11-30", "--to", "2026-11-01"], "--to is before --from"),
        (["--from", "1 November", "--to", "2026-11-30"], "neither a date"),
        (["--address", "not an address"], ""),
        (["--from", "2026-11-01", "--to", "2026-11-30", "--audit-log", "/nonexistent/audit.jsonl"], "no audit log at"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    config: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sendguard: ") and message in err


def test_out_file_is_private_and_holds_the_report(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "nov.csv"
    argv = ["report", "--config", str(config), "--from", "2026-11-01", "--to", "2026-11-30", "--format", "csv"]
    assert main([*argv, "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) & 0o007 == 0
    assert b"\r\ncommercial,messages,,1\r\n" in out.read_bytes()
