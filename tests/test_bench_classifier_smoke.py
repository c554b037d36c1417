"""The classifier benchmark runs end to end and reports a figure for every message kind.

Only the mechanics are checked here (exit status, the JSON's shape); speed, and the issue's
targets, are the benchmark's business, never a test's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_quick_bench

KINDS = ["plain_4k", "promo_4k", "newsletter_200k", "html_1m", "corpus_mean"]
FIGURES = ["parse_us", "detect_us", "detect_again_us", "render_us", "parse_detect_us"]


@pytest.mark.timeout(90)
def test_classifier_benchmark_reports_every_message_kind(tmp_path: Path) -> None:
    completed, report = run_quick_bench("classifier.py", tmp_path)
    assert "targets:" in completed.stdout

    assert report["bench"] == "classifier"
    assert report["quick"] is True
    assert {"when", "python", "machine", "cpus", "detector_memory", "results", "targets"} <= set(report)
    assert report["detector_memory"]["bytes"] > 0
    assert list(report["results"]) == KINDS
    for kind in KINDS:
        row = report["results"][kind]
        assert row["messages"] >= 1 and row["size_bytes"] > 0, kind
        for figure in FIGURES:
            assert row[figure] > 0, (kind, figure)
    assert report["results"]["newsletter_200k"]["verdict"].startswith("commercial")
    assert report["results"]["plain_4k"]["verdict"].startswith("transactional")
    for target in report["targets"].values():
        assert target["us"] > 0 and isinstance(target["met"], bool)
