"""The renderer benchmark (bench/readable.py) runs end to end and reports both renderers for
every input, and the unsubscribe and detector costs on the 200 KB newsletter.

Only the mechanics and the bounds' effect are checked here; speed is the benchmark's business,
never a test's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_quick_bench


@pytest.mark.timeout(90)
def test_readable_benchmark_reports_both_renderers(tmp_path: Path) -> None:
    completed, report = run_quick_bench("readable.py", tmp_path)
    assert "unsubscribe judge" in completed.stdout
    assert report["bench"] == "readable" and report["quick"] is True and report["rounds"] >= 3
    renders = report["render"]
    assert {"newsletter 200 KB", "newsletter 200 KB + 20 KB <style>", "deep div 10k"} <= set(renders)
    for name, row in renders.items():
        assert row["legacy_ms"] > 0 and row["lexbor_ms"] > 0 and row["lexbor_warm_ms"] > 0, name
    newsletter = renders["newsletter 200 KB"]
    assert newsletter["lexbor_complete"] and newsletter["lexbor_links"] == newsletter["legacy_links"] > 100
    assert not renders["deep div 10k"]["lexbor_complete"]  # cut at the nesting bound, and said so
    assert set(report["newsletter_200k"]) == {"judge_legacy_ms", "judge_lexbor_ms", "detector_ms"}
