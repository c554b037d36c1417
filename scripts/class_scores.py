"""Score the commercial-mail detector on a labelled set and print what it decided.

    python scripts/class_scores.py [corpus|dev|holdout] [-v]

corpus: tests/corpus (newsletter -> commercial; personal, transactional, mailing-list -> not);
dev/holdout: tests/fixtures/classifier/<set>/cases.tsv (expected column).
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies.commercial import CommercialDetector  # noqa: E402
from policies.message import ParsedMessage  # noqa: E402
from proxy.relay import rawmsg  # noqa: E402

CORPUS_LABELS = {"newsletter": "commercial", "personal": "transactional", "transactional": "transactional",
                 "mailing-list": "transactional"}  # fmt: skip


def cases(which: str) -> list[tuple[Path, str, str, str]]:
    """(file, language, group, expected) per case."""
    if which == "corpus":
        base = ROOT / "tests" / "corpus"
        rows = csv.DictReader((base / "MANIFEST.tsv").read_text("utf-8").splitlines(), delimiter="\t",
                              quoting=csv.QUOTE_NONE)  # fmt: skip
        return [(base / "messages" / r["file"], r["language"], r["category"], CORPUS_LABELS[r["category"]])
                for r in rows if r["category"] in CORPUS_LABELS]  # fmt: skip
    base = ROOT / "tests" / "fixtures" / "classifier" / which
    rows = csv.DictReader((base / "cases.tsv").read_text("utf-8").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [(base / r["file"], r["language"], r.get("kind", ""), r["expected"]) for r in rows]


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "corpus"
    verbose = "-v" in sys.argv
    detector = CommercialDetector()
    grey_is_commercial = True
    tally: Counter[tuple[str, str]] = Counter()
    by_language: Counter[tuple[str, str, str]] = Counter()  # (language, expected, got)
    for path, language, group, expected in cases(which):
        message = ParsedMessage(rawmsg.normalize_newlines(path.read_bytes()))
        detection = detector.detect(message)
        got = (
            "commercial"
            if detection.verdict == "commercial" or (detection.verdict == "grey" and grey_is_commercial)
            else "transactional"
        )
        ok = got == expected
        tally[(group, "ok" if ok else "wrong")] += 1
        by_language[(language, expected, got)] += 1
        if verbose or not ok:
            mark = "  " if ok else "XX"
            print(
                f"{mark} {path.name:28} {language:3} {group:18} want={expected[:5]} got={detection.verdict:13} {detection.score:6.2f}  {'; '.join(detection.as_dict()['signals'])[:260]}"
            )
    groups = sorted({g for g, _ in tally})
    for group in groups:
        print(f"{group:20} ok={tally[(group, 'ok')]:3} wrong={tally[(group, 'wrong')]:3}")
    print("\nlanguage  commercial found/expected  not-commercial called commercial/expected")
    for language in sorted({lang for lang, _, _ in by_language}):
        hit = by_language[(language, "commercial", "commercial")]
        want = hit + by_language[(language, "commercial", "transactional")]
        false = by_language[(language, "transactional", "commercial")]
        others = false + by_language[(language, "transactional", "transactional")]
        print(f"{language:9} {hit:3}/{want:<3}                      {false:3}/{others:<3}")
    hits = sum(n for (_, e, g), n in by_language.items() if e == g == "commercial")
    called = sum(n for (_, _, g), n in by_language.items() if g == "commercial")
    wanted = sum(n for (_, e, _), n in by_language.items() if e == "commercial")
    print(f"\nprecision {hits / called:.1%}  recall {hits / wanted:.1%}" if called and wanted else "")


if __name__ == "__main__":
    main()
