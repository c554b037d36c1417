"""What-a-reader-sees renderer: the hand-written tokenizer it replaced against lexbor + tinycss2,
side by side, on a newsletter and on hostile HTML; and what the unsubscribe check and the
commercial detector cost on a 200 KB newsletter with each.

Two renderers, each called on the same HTML string:

* ``legacy``: the hand-written tokenizer and renderer that policies/readable.py had before
  issue 14 (kept verbatim in bench/legacy_readable.py for this comparison only): inline
  ``style`` only, last duplicate attribute wins, no classes, no colours;
* ``lexbor``: policies.readable.render: selectolax's HTML5 tree, tinycss2, the cascade with
  style blocks, and the bounds (nesting, distinct names, nodes, rule matching), with a style
  sheet it has not seen before (its cache cleared); ``lexbor warm`` the same with the style
  sheet already read, as for the next copy of a campaign.

The inputs: ``newsletter 200 KB`` (bench/classifier.py's campaign newsletter: nested tables,
inline CSS, ~150 tracked links), the same with a 20 KB ``<style>`` block of the kind template
builders emit (resets, classes, media queries), and hostile documents: deep nesting (10k and
100k ``<div>``), 100k unclosed tags of several kinds, 100k ``<a `` with no ``>``, 1 MB of
``<!--``, a 1 MB style block, 5 000 hiding rules, long descendant and ``:has()`` selectors on a
deep tree, 50 000 attributes on one tag, 100 000 distinct attribute and tag names.

Rounds are interleaved: each round times every input with each renderer, which one goes first
turning from round to round, so a slower moment of a shared machine hits both; the figure
is the median over the rounds (at least 3) of one call each.

Then, on the 200 KB newsletter (parsed before the clock, a fresh message per call):
``unsubscribe judge`` is ``UnsubscribePolicy.judge`` with each renderer (the legacy one wired
into ``policies.readable.render`` for the "before" figure), and ``detector`` is
``CommercialDetector.detect``, which does not render (it reads HTML with its own bounded
expressions) and so costs the same before and after.

    .venv/bin/python bench/readable.py            # about a minute
    .venv/bin/python bench/readable.py --quick    # a few seconds: 3 rounds, the smaller inputs

The table goes to stdout, the figures to bench/results/readable.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import legacy_readable  # noqa: E402
from bench.classifier import MAIL_FROM, RECIPIENTS, newsletter  # noqa: E402
from policies import htmlstyle, readable  # noqa: E402
from policies.commercial import CommercialDetector  # noqa: E402
from policies.message import ParsedMessage  # noqa: E402
from policies.unsubscribe import UnsubscribePolicy  # noqa: E402

RESULTS = ROOT / "bench" / "results"

STYLE_BLOCK = (
    "body,table,td,a{-webkit-text-size-adjust:100%;-ms-text-size-adjust:100%}"
    "table,td{mso-table-lspace:0pt;mso-table-rspace:0pt}img{-ms-interpolation-mode:bicubic;border:0;height:auto}"
    ".preheader{display:none!important;visibility:hidden;opacity:0;color:transparent;height:0;width:0}"
    + "".join(
        f".col-{i}{{width:{i * 10}px;padding:{i % 7}px}}"
        f" .txt-{i}{{font-size:{10 + i % 9}px;color:#{i * 37 % 4096:03x}}}"
        f" .bg-{i}{{background-color:#{(i * 91) % 4096:03x}}} td.cell-{i} a{{color:#{(i * 53) % 4096:03x}}}"
        for i in range(120)
    )
    + "@media screen and (max-width:600px){"
    + "".join(f".mob-{i}{{display:none!important}} .col-{i}{{width:100%!important}}" for i in range(60))
    + "}"
)


def newsletter_html(size: int) -> str:
    message = ParsedMessage(newsletter(size))
    return next(p.text for p in message.text_parts if p.content_type == "text/html")


def styled(html: str) -> str:
    return (
        html.replace("<head>", f"<head><style>{STYLE_BLOCK}</style>", 1)
        if "<head>" in html
        else (f"<style>{STYLE_BLOCK}</style>" + html)
    )


TAIL = '<p>Stop these mails: <a href="https://news.example/unsubscribe?u=1">unsubscribe</a></p>'


def hostile(quick: bool) -> dict[str, str]:
    scale = 10 if quick else 1
    n = 100_000 // scale
    return {
        "deep div 10k": "<div>" * 10_000 + TAIL,
        f"deep div {n // 1000}k": "<div>" * n + TAIL,
        f"unclosed <a href> {n // 1000}k": '<a href="https://x.example/">' * n + TAIL,
        f"unclosed <b><i><font> {n // 1000}k": "<b><i><font>" * (n // 3) + TAIL,
        f"unclosed table cells {n // 1000}k": "<table><tr><td>" * (n // 3) + TAIL,
        f"'<a ' without '>' {n // 1000}k": TAIL + "<a " * n,
        f"'<!--' x {n // 1000}k": TAIL + "<!--" * n,
        "style block 1 MB": "<style>" + ".c{color:red;display:block}" * (40_000 // scale) + "</style>" + TAIL,
        "5000 hiding rules": "<style>"
        + "".join(f".c{i} div{{display:none}}" for i in range(5_000 // scale))
        + "</style>"
        + "<div>" * 300
        + TAIL,
        "1000 rules on named classes, deep": "<style>"
        + "".join(f".c{i} div{{display:none}}" for i in range(1_000))
        + "</style>"
        + "".join(f"<div class=c{i}>" for i in range(400))
        + TAIL,
        "long and :has() selectors": "<style>"
        + "div " * 70
        + "a{display:none} :has(:has(:has(a))){opacity:0}</style>"
        + "<div>" * 400
        + TAIL,
        "50k attributes on one tag": "<p " + " ".join(f"a{i}=x" for i in range(50_000 // scale)) + ">" + TAIL,
        f"distinct attribute names {n // 1000}k": "".join(f"<p a{i}=x>" for i in range(n)) + TAIL,
        f"distinct tag names {n // 1000}k": "".join(f"<t{i}></t{i}>" for i in range(n)) + TAIL,
    }


def once(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def render_side_by_side(inputs: dict[str, str], rounds: int) -> dict[str, dict[str, Any]]:
    def cold(html: str) -> Any:
        htmlstyle.parse_sheet.cache_clear()  # a style sheet not seen before
        return readable.render(html)

    renderers: dict[str, Callable[[str], Any]] = {
        "legacy": legacy_readable.render_html,
        "lexbor": cold,
        "lexbor_warm": readable.render,  # the style sheet already read (the next copy of a campaign)
    }
    samples: dict[str, dict[str, list[float]]] = {name: {r: [] for r in renderers} for name in inputs}
    for html in inputs.values():  # warm-up, untimed
        for render in renderers.values():
            render(html)
    for index in range(rounds):
        order = list(renderers)[index % 3 :] + list(renderers)[: index % 3]  # each goes first in turn
        for name, html in inputs.items():
            for which in order:
                samples[name][which].append(once(lambda html=html, which=which: renderers[which](html)))
    results: dict[str, dict[str, Any]] = {}
    for name, html in inputs.items():
        rendered = readable.render(html)
        _, legacy_links = legacy_readable.render_html(html)
        results[name] = {
            "size_bytes": len(html.encode("utf-8", "surrogatepass")),
            "legacy_ms": statistics.median(samples[name]["legacy"]) * 1000,
            "lexbor_ms": statistics.median(samples[name]["lexbor"]) * 1000,
            "lexbor_warm_ms": statistics.median(samples[name]["lexbor_warm"]) * 1000,
            "legacy_links": len(legacy_links),
            "lexbor_links": len(rendered.links),
            "lexbor_complete": rendered.complete,
        }
    return results


def judge_side_by_side(raw: bytes, rounds: int, calls: int) -> dict[str, float]:
    """Milliseconds per message (median over rounds of the mean of ``calls``) for the
    unsubscribe judge with each renderer, and for the commercial detector."""
    policy = UnsubscribePolicy(UnsubscribePolicy.Options())
    detector = CommercialDetector()
    lexbor_render = readable.render

    def legacy_render(source: str) -> readable.Rendered:
        text, links = legacy_readable.render_html(source)
        return readable.Rendered(text, links, True)

    def timed(operation: Callable[[ParsedMessage], Any]) -> float:
        messages = [ParsedMessage(raw) for _ in range(calls)]
        started = time.perf_counter()
        for message in messages:
            operation(message)
        return (time.perf_counter() - started) / calls

    samples: dict[str, list[float]] = {"judge_legacy_ms": [], "judge_lexbor_ms": [], "detector_ms": []}
    try:
        for index in range(rounds + 1):  # the first round warms up and is not kept
            figures: dict[str, float] = {}
            order = ["legacy", "lexbor"] if index % 2 == 0 else ["lexbor", "legacy"]
            for which in order:
                readable.render = legacy_render if which == "legacy" else lexbor_render  # type: ignore[assignment]
                htmlstyle.parse_sheet.cache_clear()
                figures[f"judge_{which}_ms"] = timed(policy.judge)
            readable.render = lexbor_render  # type: ignore[assignment]
            figures["detector_ms"] = timed(
                lambda message: detector.detect(message, mail_from=MAIL_FROM, recipients=RECIPIENTS)
            )
            if index:
                for key, value in figures.items():
                    samples[key].append(value)
    finally:
        readable.render = lexbor_render  # type: ignore[assignment]
    return {key: statistics.median(values) * 1000 for key, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, hostile inputs a tenth the size")
    parser.add_argument("--out", type=Path, default=RESULTS / "readable.json", help="where the JSON goes")
    args = parser.parse_args()
    rounds = 3 if args.quick else 5
    html = newsletter_html(200 * 1024)
    inputs = {"newsletter 200 KB": html, "newsletter 200 KB + 20 KB <style>": styled(html), **hostile(args.quick)}
    renders = render_side_by_side(inputs, rounds)
    judge = judge_side_by_side(newsletter(200 * 1024), rounds, 2 if args.quick else 5)

    print(f"{'input':<40} {'KB':>7} {'legacy ms':>10} {'lexbor ms':>10} {'warm ms':>8}  links legacy/lexbor  complete")
    for name, row in renders.items():
        print(
            f"{name:<40} {row['size_bytes'] / 1024:7.0f} {row['legacy_ms']:10.1f} {row['lexbor_ms']:10.1f}"
            f" {row['lexbor_warm_ms']:8.1f}"
            f"  {row['legacy_links']:>6}/{row['lexbor_links']:<6}        {row['lexbor_complete']}"
        )
    print(
        f"\nnewsletter 200 KB: unsubscribe judge {judge['judge_legacy_ms']:.1f} ms before (legacy renderer), "
        f"{judge['judge_lexbor_ms']:.1f} ms after (lexbor); commercial detector {judge['detector_ms']:.1f} ms "
        "(renders nothing: the same code before and after)"
    )
    report = {
        "bench": "readable",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "rounds": rounds,
        "bounds": {
            "max_depth": readable.MAX_DEPTH,
            "rule_cost": readable.RULE_COST,
            "max_sheet_chars": htmlstyle.MAX_SHEET_CHARS,
            "max_rules": htmlstyle.MAX_RULES,
            "max_names": readable.MAX_NAMES,
            "max_nodes": readable.MAX_NODES,
            "match_budget": readable.MATCH_BUDGET,
        },
        "render": renders,
        "newsletter_200k": judge,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
