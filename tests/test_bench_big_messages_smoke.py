"""The big-message memory benchmark's harness works end to end (issue 15, part 3).

Only the mechanics are checked (a real sendguard, every message accepted and delivered, the
JSON's shape); memory targets are the benchmark's business, never a test's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_quick_bench


@pytest.mark.timeout(90)
def test_big_message_benchmark_delivers_every_message(tmp_path: Path) -> None:
    _, report = run_quick_bench("big_messages.py", tmp_path)

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
