"""The DKIM signing benchmark's harness works end to end (issue 9).

Only the mechanics are checked (every implementation signs every size, every signature
verifies, the JSON's shape); speed is the benchmark's business, never a test's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_quick_bench


@pytest.mark.timeout(90)
def test_dkim_benchmark_signs_and_verifies_every_cell(tmp_path: Path) -> None:
    _, report = run_quick_bench("dkim_speed.py", tmp_path)

    assert report["benchmark"] == "dkim_speed"
    assert report["quick"] is True
    assert report["all_verified"] is True
    assert len(report["verified_by_dkimpy"]) == 3 * 2 * 3  # sizes x algorithms x implementations
    for row in report["results"]:
        for name in ("dkimpy", "sendguard", "sendguard-fields"):
            assert row[name]["wall_ms_median"] > 0, (row["message_bytes"], row["algorithm"], name)
            assert len(row[name]["wall_ms_rounds"]) == 3
