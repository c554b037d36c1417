"""The throughput benchmark's harness works end to end: every target relays every message into smtp-sink.

Only the mechanics are checked here (messages counted by smtp-sink, the JSON's shape); speed is
the benchmark's business, never a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, need_program

TARGETS = ["direct", "naive", "sendguard", "sendguard-noaudit", "sendguard-w2"]  # w2: workers: 2 on Redis


@pytest.mark.external
@pytest.mark.timeout(120)
def test_benchmark_relays_every_message_through_every_target(tmp_path: Path) -> None:
    need_program("smtp-source")
    need_program("smtp-sink")
    output = tmp_path / "relay_throughput.json"
    # Two scenarios, to cover several recipients and smtp-source -d (many messages per session).
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "relay_throughput.py"),
            "--messages=20",
            "--warmup=5",
            "--quiet-wait=0",  # a test must not wait for a busy CI machine to calm down
            "--scenario=2:2000:2",
            "--scenario=2:2000:1:d",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr

    report = json.loads(output.read_text())
    assert report["benchmark"] == "relay_throughput"
    assert report["ok"] is True
    assert {"machine", "versions", "parameters", "summary", "runs"} <= set(report)
    assert report["versions"]["aiosmtpd"] and report["versions"]["aiosmtplib"]
    assert report["parameters"]["messages_per_run"] == 20
    assert report["versions"]["git_commit"] is None or len(report["versions"]["git_commit"]) == 40
    scenarios = [
        {"sessions": 2, "size": 2000, "recipients": 2, "reuse_sessions": False},
        {"sessions": 2, "size": 2000, "recipients": 1, "reuse_sessions": True},
    ]
    assert report["parameters"]["scenarios"] == scenarios

    runs = report["runs"]
    assert [(run["scenario"], run["target"]) for run in runs] == [(s, t) for s in scenarios for t in TARGETS]
    for run in runs:
        where = f"{run['target']} {run['scenario']}"
        assert run["ok"] is True, where
        assert run["delivered"] == run["messages"] == 20, where  # counted by smtp-sink, not by the relay
        assert run["seconds"] > 0 and run["messages_per_s"] > 0, where
        if run["target"] == "direct":
            assert "relay" not in run, where
        else:
            relay = run["relay"]
            assert relay["cpu_s"] >= 0 and relay["peak_rss_mib"] > 0, where
            assert relay["cpu_user_s"] + relay["cpu_system_s"] == pytest.approx(relay["cpu_s"], abs=0.02), where

    for row in report["summary"]:
        assert set(row["messages_per_s"]) == set(TARGETS)
        assert all(rate > 0 for rate in row["messages_per_s"].values())
        for ratio in (
            "sendguard_vs_direct",
            "sendguard_vs_naive",
            "naive_vs_direct",
            "sendguard_audit_on_vs_off",
            "sendguard_w2_vs_w1",
            "sendguard_w2_vs_naive",
        ):
            assert row[ratio] > 0, ratio
