"""The big-message memory benchmark's harness works end to end (issue 15, part 3).

Only the mechanics are checked (a real sendguard, every message accepted and delivered, the
JSON's shape); memory targets are the benchmark's business, never a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(90)
def test_big_message_benchmark_delivers_every_message(tmp_path: Path) -> None:
    output = tmp_path / "big_messages.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "big_messages.py"), "--quick", "--out", str(output)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr

    report = json.loads(output.read_text())
    assert report["benchmark"] == "big_messages"
    assert report["quick"] is True
    runs = report["runs"]
    assert [run["concurrent"] for run in runs] == [1, 5]
    for run in runs:
        where = f"{run['concurrent']} concurrent"
        assert run["ok"] is True, where
        assert run["peak_rss_mib"] > 0, where
        assert run["accepted"] == run["delivered"] == run["concurrent"], where
        assert run["all_delivered"] is True, where
