"""The corpus figures: every label of tests/corpus/MANIFEST.tsv reached by the detectors,
and scripts/corpus_scores.py runs and prints them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "corpus_scores.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("corpus_scores", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_targets_are_met() -> None:
    scores = load_script().score()
    for confusion in scores.confusions:
        assert (confusion.precision, confusion.recall) == (1.0, 1.0), (confusion.name, confusion.misses)
    assert scores.body.true_positive == 21 and scores.body.true_negative == 113
    # The three the reader cannot see (tests/corpus/READER_VIEW.tsv) are the label's only misses.
    assert sorted(m.split(":")[0] for m in scores.body_as_labelled.misses) == [
        "newsletter-12.eml",
        "newsletter-14.eml",
        "newsletter-17.eml",
    ]
    assert scores.header.true_positive == 15
    assert scores.one_click.true_positive == 1
    assert scores.recipients_refused.true_positive == 7  # the policy's default limit, 10
    assert (scores.recipients_exact, scores.recipients_total) == (134, 134), scores.recipient_misses
    assert scores.perfect


def test_script_prints_the_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "-v"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "body unsubscribe link" in out and "precision 100.0%  recall 100.0%" in out
    assert "To/Cc mailboxes, exact count         134/134 (100.0%)" in out
    assert "visible_recipients refusal (> 10)    precision 100.0%  recall 100.0%  (tp 7," in out
    assert "many-recipients-04.eml" in out and "removeme.html" in out
