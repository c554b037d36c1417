"""The report benchmark runs end to end: it generates an audit log, fills a SQLite consent
store, runs ``sendguard report`` as a child process for JSON and HTML and reports seconds and
peak memory. Only the mechanics are checked; the figures are the benchmark's business."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_quick_bench


@pytest.mark.timeout(90)
def test_report_benchmark_reports_time_and_memory(tmp_path: Path) -> None:
    completed, report = run_quick_bench("report.py", tmp_path)
    assert "growth MB" in completed.stdout
    assert report["bench"] == "report" and report["quick"] is True
    assert report["lines"] == 5_000 and report["log_bytes"] > 1_000_000
    assert report["report_figures"]["commercial_messages"] > 1_000
    assert report["report_figures"]["opt_outs_followed"] > 0
    for fmt in ("json", "html"):
        row = report["results"][fmt]
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0 and row["output_bytes"] > 0, fmt
