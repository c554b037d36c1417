"""The classifier benchmark runs end to end and reports a figure for every message kind.

Only the mechanics are checked here (exit status, the JSON's shape); speed, and the issue's
targets, are the benchmark's business, never a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

KINDS = ["plain_4k", "promo_4k", "newsletter_200k", "html_1m", "corpus_mean"]
FIGURES = ["parse_us", "detect_us", "detect_again_us", "render_us", "parse_detect_us"]


@pytest.mark.timeout(90)
def test_classifier_benchmark_reports_every_message_kind(tmp_path: Path) -> None:
    output = tmp_path / "classifier.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "classifier.py"), "--quick", "--out", str(output)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "targets:" in completed.stdout

    report = json.loads(output.read_text())
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
