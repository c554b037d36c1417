"""The milter benchmark's harness works end to end: every target answers every message
(miltertest checks the accept and the inserted field) and the JSON has its shape; speed is
the benchmark's business, never a test's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import need_program, run_quick_bench


@pytest.mark.timeout(90)
def test_milter_benchmark_runs_every_target(tmp_path: Path) -> None:
    need_program("miltertest")
    _, report = run_quick_bench("milter_libraries.py", tmp_path)
    assert report["benchmark"] == "milter_libraries" and report["quick"] is True
    assert set(report["rates"]) == {"pymilter", "pymilter-nodelay", "sendguard"}
    for target, rates in report["rates"].items():
        assert len(rates) == 1 and rates[0] > 0, target
