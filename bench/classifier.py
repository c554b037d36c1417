"""Commercial-mail detector cost: time per message and memory held, against the issue's targets.

The targets: under 0.3 ms per 4 KB message and under 3 ms per 200 KB HTML newsletter, with
no network. What is measured, per message (each a median of several rounds, after a warm-up):

* ``parse``: ``ParsedMessage(raw)``, the proxy's one parse, shared by every policy;
* ``detect``: ``CommercialDetector.detect`` on a freshly parsed message, nothing cached: what
  classification adds to every message in the proxy (decoding the text parts, reading the
  headers and addresses it needs, scanning and scoring). Parse time is excluded: the messages
  are parsed before the clock starts;
* ``detect again``: ``detect`` once more on one message, every view of it cached: the
  detector's own scanning and scoring alone;
* ``render``: ``ParsedMessage.readable_texts`` (the full HTML renderer, with visibility and
  links), for comparison: the detector does not use it; the unsubscribe policy does, for
  commercial mail only;
* ``parse+detect``: the two in one, timed together.

Cached properties hold a message's views, so every timed call gets a message object of its
own, parsed before the clock starts.

The messages are generated here with the stdlib ``email`` package, deterministically:

* ``plain 4 KB``: a plain-text order confirmation (transactional);
* ``promo 4 KB``: a multipart/alternative text + HTML promotion;
* ``newsletter 200 KB``: an HTML newsletter (quoted-printable) as campaign tools build them:
  nested layout tables, inline CSS, a hidden preheader, a web-version link, repeated product
  blocks with images, prices and "Shop now" buttons, ~150 links with UTM parameters through a
  click-tracking redirect, social icons, an unsubscribe footer and a 1x1 open-tracking pixel;
* ``html 1 MB``: the same newsletter grown to 1 MB, to show the bound (the detector reads at
  most ``HTML_BUDGET`` characters of HTML and ``TEXT_BUDGET`` of text per part, its beginning
  and its end; rendering is not bounded);

plus ``corpus mean``: the mean over the messages of tests/corpus/messages, read as the proxy
reads them (``normalize_newlines`` of ``proxy.relay.rawmsg``). ``detector memory`` is what one
``CommercialDetector()`` holds (tracemalloc around its construction: word lists included).

    .venv/bin/python bench/classifier.py            # one to two minutes
    .venv/bin/python bench/classifier.py --quick    # about ten seconds: one round, a quarter of the corpus

The table goes to stdout, the figures to bench/results/classifier.json (``--out`` to change).
Not part of pytest (tests/test_bench_classifier_smoke.py only checks that it runs).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies.commercial import HTML_BUDGET, TEXT_BUDGET, CommercialDetector  # noqa: E402
from policies.message import ParsedMessage  # noqa: E402

try:  # where the proxy's own message reading lives (proxy/relay since the package split)
    from proxy.relay.rawmsg import normalize_newlines
except ImportError:  # pragma: no cover - the layout before the split
    from proxy.rawmsg import normalize_newlines  # type: ignore[no-redef]

RESULTS = ROOT / "bench" / "results"
CORPUS = ROOT / "tests" / "corpus" / "messages"
MAIL_FROM = "bounces+8412@mail.shop.example"
RECIPIENTS = ("jan.jansen@example.nl",)
#: (message kind, target in microseconds): the issue's budgets.
TARGETS = {"plain_4k": 300.0, "promo_4k": 300.0, "newsletter_200k": 3000.0}
LABELS = {
    "plain_4k": "plain 4 KB",
    "promo_4k": "promo 4 KB",
    "newsletter_200k": "newsletter 200 KB",
    "html_1m": "html 1 MB",
    "corpus_mean": "corpus mean",
}


# ---- the messages ----------------------------------------------------------------------------


def _headers(msg: EmailMessage, *, sender: str, subject: str, bulk: bool) -> None:
    msg["From"] = sender
    msg["To"] = "Jan Jansen <jan.jansen@example.nl>"
    msg["Subject"] = subject
    msg["Date"] = "Tue, 05 Mar 2024 09:30:00 +0100"
    msg["Message-ID"] = "<20240305093000.4f1c2a@mail.shop.example>"
    if bulk:
        msg["List-Unsubscribe"] = "<https://mail.shop.example/u/8412/a7f3c9>, <mailto:unsub-8412@mail.shop.example>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["Feedback-ID"] = "spring24:newsletter:shop:esp"
        msg["X-Campaign-ID"] = "spring-2024-week10"


def _raw(msg: EmailMessage) -> bytes:
    return normalize_newlines(msg.as_bytes(policy=SMTP))


def plain_transactional(size: int = 4096) -> bytes:
    """An order confirmation in plain text, grown with order lines to about ``size`` bytes."""
    rng = random.Random(1)
    head = (
        "Dear Jan Jansen,\n\n"
        "Thank you for your order. We have received your payment and are preparing your parcel.\n\n"
        "Order number: 2024-118734\nInvoice number: INV-88213409\nOrder date: 5 March 2024\n"
        "Payment: iDEAL, paid\n\nYour items:\n\n"
    )
    tail = (
        "\nDelivery address:\nJan Jansen\nKerkstraat 12\n1017 GC Amsterdam\nNetherlands\n\n"
        "Your parcel is expected on Thursday 7 March. As soon as it ships you will receive the "
        "tracking number in a separate e-mail.\n\n"
        "Questions about your order? Reply to this e-mail or see https://www.shop.example/help/orders\n"
        "Returns: you may return items within 30 days, see https://www.shop.example/help/returns\n\n"
        "Kind regards,\nCustomer service, Shop Example B.V.\n"
        "Shop Example B.V., Herengracht 100, 1015 BS Amsterdam, KvK 12345678, VAT NL001234567B01\n"
    )
    lines: list[str] = []
    total = 0.0
    while True:
        body = (
            head + "".join(lines) + f"\nSubtotal: EUR {total:.2f}\nShipping: EUR 0.00\nTotal: EUR {total:.2f}\n" + tail
        )
        msg = EmailMessage()
        _headers(
            msg, sender="Shop Example <orders@shop.example>", subject="Your order 2024-118734 is confirmed", bulk=False
        )
        msg.set_content(body)
        raw = _raw(msg)
        if len(raw) >= size:
            return raw
        price = rng.randint(299, 8999) / 100
        quantity = rng.randint(1, 3)
        total += price * quantity
        sku = rng.randint(100000, 999999)
        lines.append(f"  {quantity} x Cotton shirt, size {rng.choice('SML')}, article {sku}   EUR {price:.2f}\n")


def _tracked(url: str, campaign: str, index: int) -> str:
    """A click-tracking redirect to ``url`` with UTM parameters, as ESPs rewrite links."""
    token = f"{(index * 2654435761) % 2**64:016x}{(index * 40503) % 2**32:08x}a9c3e1f0b7d2"
    target = f"{url}?utm_source=newsletter&utm_medium=email&utm_campaign={campaign}&utm_content=link{index}"
    return f"https://click.mail.shop.example/ls/click?upn={token}&u={target.replace('&', '%26').replace('?', '%3F')}"


def promotion(size: int = 4096) -> bytes:
    """A multipart/alternative text + HTML promotion of about ``size`` bytes."""
    items = ["Linen shirt", "Chino trousers", "Canvas sneakers", "Wool jumper", "Leather belt", "Rain jacket"]
    for count in range(1, len(items) + 1):
        text_lines = ["SPRING SALE: up to 40% off everything, this weekend only!", ""]
        html_rows = []
        for index, name in enumerate(items[:count]):
            url = _tracked(f"https://www.shop.example/p/{index + 1}", "spring", index)
            text_lines.append(f"{name}: now EUR {19.95 + index * 10:.2f} (was EUR {39.95 + index * 10:.2f}) {url}")
            html_rows.append(
                f'<tr><td style="padding:8px;font-family:Arial"><b>{name}</b><br>now &euro; {19.95 + index * 10:.2f}'
                f' <s>&euro; {39.95 + index * 10:.2f}</s><br><a href="{url}" style="color:#fff;background:#d33;'
                f'padding:6px 12px;text-decoration:none">Shop now</a></td></tr>'
            )
        text_lines += ["", "Use code SPRING24 at checkout.", "Unsubscribe: https://mail.shop.example/u/8412/a7f3c9"]
        html = (
            '<html><body style="margin:0"><table width="600" align="center" cellpadding="0" cellspacing="0">'
            '<tr><td><h1 style="font-family:Arial;color:#d33">Spring sale: up to 40% off</h1></td></tr>'
            + "".join(html_rows)
            + '<tr><td style="font-size:11px;color:#888">Use code SPRING24 at checkout. '
            '<a href="https://mail.shop.example/u/8412/a7f3c9">Unsubscribe</a></td></tr></table>'
            '<img src="https://t.mail.shop.example/o/8412.gif" width="1" height="1" alt=""></body></html>'
        )
        msg = EmailMessage()
        _headers(msg, sender="Shop Example <news@shop.example>", subject="Spring sale: up to 40% off", bulk=True)
        msg.set_content("\n".join(text_lines) + "\n")
        msg.add_alternative(html, subtype="html")
        raw = _raw(msg)
        if len(raw) >= size or count == len(items):
            return raw
    raise AssertionError("unreachable")


_CSS = (
    "body{margin:0;padding:0;-webkit-text-size-adjust:100%;-ms-text-size-adjust:100%}"
    "table,td{border-collapse:collapse;mso-table-lspace:0pt;mso-table-rspace:0pt}"
    "img{border:0;height:auto;line-height:100%;outline:none;text-decoration:none;-ms-interpolation-mode:bicubic}"
    ".button a{display:inline-block;padding:12px 24px;border-radius:4px;font-weight:bold}"
    "@media only screen and (max-width:600px){.container{width:100%!important}.column{display:block!important;"
    "width:100%!important}.hide-mobile{display:none!important}.product img{width:100%!important}}"
)
_TD = (
    'style="padding:0 12px 12px 12px;font-family:Helvetica,Arial,sans-serif;font-size:14px;line-height:20px;'
    'color:#333333"'
)
_BLURB = (
    "Made from organic cotton and finished by hand in Portugal, this piece is cut for an easy fit and "
    "softens with every wash. Free delivery from 50 euros and free returns within 30 days."
)


def _product(rng: random.Random, index: int) -> str:
    material = rng.choice(["Linen", "Cotton", "Wool", "Denim", "Canvas"])
    name = f"{material} {rng.choice(['shirt', 'jacket', 'dress', 'trousers', 'sweater'])}"
    price = rng.randint(1995, 14995) / 100
    was = price * rng.choice([1.25, 1.4, 1.5])
    page = f"https://www.shop.example/p/{100000 + index * 37}"
    image = f"https://img.shop.example/products/{100000 + index * 37}/{rng.getrandbits(64):016x}_600x600.jpg"
    links = [_tracked(page, "spring-2024-week10", index * 2 + n) for n in range(2)]
    return (
        '<table role="presentation" class="product column" width="50%" cellpadding="0" cellspacing="0" border="0" '
        'align="left" style="max-width:300px"><tr><td style="padding:12px">'
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" '
        'style="background-color:#ffffff;border:1px solid #eeeeee"><tr><td align="center" style="padding:0">'
        f'<a href="{links[0]}" target="_blank"><img src="{image}" width="276" height="276" alt="{name}" '
        'style="display:block;width:276px;max-width:100%;height:auto;border:0"></a></td></tr>'
        f'<tr><td {_TD}><span style="color:#111111;font-weight:bold;font-size:16px">{name}</span><br>'
        f'<span style="color:#777777">{_BLURB}</span></td></tr>'
        f'<tr><td {_TD}><span style="font-size:18px;font-weight:bold;color:#d0021b">&euro;&nbsp;{price:.2f}</span>'
        f'&nbsp;<span style="text-decoration:line-through;color:#999999">&euro;&nbsp;{was:.2f}</span></td></tr>'
        '<tr><td align="center" style="padding:0 12px 16px 12px"><table role="presentation" cellpadding="0" '
        'cellspacing="0" border="0" class="button"><tr><td align="center" bgcolor="#111111" '
        f'style="border-radius:4px"><a href="{links[1]}" target="_blank" style="display:inline-block;'
        "padding:12px 24px;font-family:Helvetica,Arial,sans-serif;font-size:14px;color:#ffffff;"
        'text-decoration:none;border-radius:4px">Shop now</a></td></tr></table></td></tr>'
        "</table></td></tr></table>\n"
    )


def _newsletter_html(products: int) -> str:
    rng = random.Random(7)
    nav = "".join(
        f'<td align="center" style="padding:8px">'
        f'<a href="{_tracked(f"https://www.shop.example/{s}", "nav", 9000 + i)}" '
        f'style="font-family:Arial;font-size:13px;color:#111111;text-decoration:none">{s.title()}</a></td>'
        for i, s in enumerate(["women", "men", "kids", "home", "sale", "new"])
    )
    social = "".join(
        f'<a href="{_tracked(f"https://{s}.example/shopexample", "social", 9100 + i)}"><img '
        f'src="https://img.shop.example/icons/{s}.png" width="32" height="32" alt="{s}" '
        'style="display:inline-block"></a>'
        for i, s in enumerate(["facebook", "instagram", "pinterest", "youtube"])
    )
    rows = []
    for start in range(0, products, 2):
        pair = "".join(_product(rng, start + n) for n in range(min(2, products - start)))
        rows.append(f'<tr><td style="padding:0 12px">{pair}</td></tr>\n')
        if start % 4 == 2:
            rows.append(
                f'<tr><td {_TD}><h2 style="font-size:20px">Spring edit, part {start // 4 + 1}</h2>'
                f"<p>{_BLURB} {_BLURB}</p><p>{_BLURB}</p></td></tr>\n"
            )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        'content="width=device-width,initial-scale=1"><title>Spring sale</title>'
        f'<style type="text/css">{_CSS}</style></head>'
        '<body style="margin:0;padding:0;background-color:#f4f4f4">'
        '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all">Up to 40% off the spring '
        "collection, this weekend only.</div>"
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" bgcolor="#f4f4f4">'
        '<tr><td align="center"><table role="presentation" class="container" width="600" cellpadding="0" '
        'cellspacing="0" border="0" style="width:600px;background-color:#ffffff">'
        f'<tr><td align="right" style="padding:8px 12px;font-family:Arial;font-size:11px;color:#999999">'
        f'<a href="{_tracked("https://mail.shop.example/web/8412", "webversion", 9200)}" style="color:#999999">'
        "View this e-mail in your browser</a></td></tr>"
        '<tr><td align="center" style="padding:24px"><img src="https://img.shop.example/logo.png" width="180" '
        'height="48" alt="Shop Example"></td></tr>'
        f'<tr><td><table role="presentation" width="100%"><tr>{nav}</tr></table></td></tr>'
        '<tr><td><img src="https://img.shop.example/hero/spring24.jpg" width="600" height="300" alt="Spring sale: '
        'up to 40% off" style="display:block;width:100%;height:auto"></td></tr>'
        f'<tr><td {_TD}><h1 style="font-size:28px">Spring sale: up to 40% off</h1><p>Only until Sunday: '
        "use code SPRING24 for an extra 10% off.</p></td></tr>\n"
        + "".join(rows)
        + f'<tr><td align="center" style="padding:24px">{social}</td></tr>'
        '<tr><td style="padding:24px;font-family:Arial;font-size:11px;line-height:16px;color:#999999">'
        "You receive this newsletter because you subscribed at shop.example. "
        f'<a href="{_tracked("https://mail.shop.example/prefs/8412", "footer", 9300)}">Manage your preferences</a> or '
        '<a href="https://mail.shop.example/u/8412/a7f3c9">unsubscribe</a>.<br>'
        "Shop Example B.V., Herengracht 100, 1015 BS Amsterdam</td></tr>"
        "</table></td></tr></table>"
        '<img src="https://t.mail.shop.example/o/8412/a7f3c9.gif" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0"></body></html>'
    )


def newsletter(size: int) -> bytes:
    """An HTML newsletter of about ``size`` bytes (quoted-printable, as ESPs send it)."""

    def build(products: int) -> bytes:
        msg = EmailMessage()
        _headers(
            msg, sender="Shop Example Newsletter <news@shop.example>", subject="Spring sale: up to 40% off", bulk=True
        )
        msg["X-Mailer"] = "Example ESP campaign mailer 4.2"
        msg.set_content(_newsletter_html(products), subtype="html", cte="quoted-printable")
        return _raw(msg)

    products = max(2, size // 4000)
    for _ in range(4):  # scale the product count to the size, then settle on the nearest
        raw = build(products)
        products = max(2, round(products * size / len(raw)))
    while len(raw := build(products)) > size * 1.02:
        products -= 1
    return raw


def corpus() -> list[tuple[str, bytes]]:
    return [(path.name, normalize_newlines(path.read_bytes())) for path in sorted(CORPUS.glob("*.eml"))]


# ---- timing ----------------------------------------------------------------------------------


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def time_round(prepare: Callable[[], Any], operation: Callable[[Any], Any], calls: int) -> float:
    """Seconds per call of ``operation(prepare())``, ``prepare`` outside the clock."""
    subjects = [prepare() for _ in range(calls)]
    started = time.perf_counter()
    for subject in subjects:
        operation(subject)
    return (time.perf_counter() - started) / calls


MEASURES = ("parse", "detect", "detect again", "render", "parse+detect")
KEYS = ("parse_us", "detect_us", "detect_again_us", "render_us", "parse_detect_us")


def measure(raws: list[bytes], detector: CommercialDetector, calls: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of the mean microseconds per message over ``raws``, after a warm-up
    (every operation once per message). Each round times every message ``calls`` times, each
    time on a message object of its own (``detect again``: on one message, every view cached).
    """

    def detect(message: ParsedMessage) -> None:
        detector.detect(message, mail_from=MAIL_FROM, recipients=RECIPIENTS)

    def render(message: ParsedMessage) -> None:
        message.readable_texts  # noqa: B018 - the cached property does the work

    def everything(raw: bytes) -> None:
        detect(ParsedMessage(raw))

    def timings(raw: bytes, count: int) -> dict[str, float]:
        warm = ParsedMessage(raw)
        detect(warm)
        return {
            "parse": time_round(lambda: raw, ParsedMessage, count),
            "detect": time_round(lambda: ParsedMessage(raw), detect, count),
            "detect again": time_round(lambda: warm, detect, count),
            "render": time_round(lambda: ParsedMessage(raw), render, count),
            "parse+detect": time_round(lambda: raw, everything, count),
        }

    for raw in raws:
        timings(raw, 1)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in MEASURES}
    for _ in range(rounds):
        gc.collect()
        total = dict.fromkeys(MEASURES, 0.0)
        for raw in raws:
            for name, seconds in timings(raw, calls).items():
                total[name] += seconds
        for name in MEASURES:
            samples[name].append(total[name] / len(raws))
    return {name: _median_us(values) for name, values in samples.items()}


def detector_memory() -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    detector = CommercialDetector()
    elapsed = time.perf_counter() - started
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del detector
    return {"bytes": held - before, "peak_bytes": peak - before, "construct_ms": elapsed * 1e3}


# ---- report ----------------------------------------------------------------------------------


def verdicts(raws: list[bytes], detector: CommercialDetector) -> str:
    found = [detector.detect(ParsedMessage(raw), mail_from=MAIL_FROM, recipients=RECIPIENTS) for raw in raws]
    if len(found) == 1:
        return f"{found[0].verdict} {found[0].score:g}"
    counts: dict[str, int] = {}
    for detection in found:
        counts[detection.verdict] = counts.get(detection.verdict, 0) + 1
    return " ".join(f"{v[:5]}:{n}" for v, n in sorted(counts.items()))


def _fmt(us: float) -> str:
    return f"{us:,.0f} µs" if us < 1000 else f"{us / 1000:,.2f} ms"


def print_table(results: dict[str, Any], memory: dict[str, float]) -> None:
    print(f"{'message':<18} {'size':>9} " + " ".join(f"{c:>13}" for c in MEASURES) + "  verdict")
    for kind, row in results.items():
        size = f"{row['size_bytes'] / 1024:,.0f} KB" if kind != "corpus_mean" else f"{row['size_bytes'] / 1024:,.1f} KB"
        cells = " ".join(f"{_fmt(row[key]):>{max(13, len(name))}}" for key, name in zip(KEYS, MEASURES, strict=True))
        print(f"{LABELS[kind]:<18} {size:>9} {cells}  {row['verdict']}")
    print(
        f"\ndetector memory: {memory['bytes'] / 1024:,.0f} KiB held ({memory['peak_bytes'] / 1024:,.0f} KiB peak "
        f"while building), constructed in {memory['construct_ms']:.1f} ms; per part at most {HTML_BUDGET:,} chars "
        f"of HTML and {TEXT_BUDGET:,} of text"
    )


def check_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    print("\ntargets:")
    for kind, target in TARGETS.items():
        for measure_name, key in (("detect", "detect_us"),):
            value = results[kind][key]
            met = value < target
            out[f"{kind} {measure_name}"] = {"target_us": target, "us": value, "met": met}
            print(
                f"  {LABELS[kind]:<18} {measure_name:<14} {_fmt(value):>10} < {_fmt(target):>8}: "
                f"{'met' if met else 'MISSED'}"
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--out", type=Path, default=RESULTS / "classifier.json", help="where the JSON goes")
    args = parser.parse_args()
    rounds = 1 if args.quick else 5
    # Calls per round for each message kind (the corpus: each of its messages once).
    calls = {"plain_4k": 30, "promo_4k": 30, "newsletter_200k": 2, "html_1m": 1, "corpus_mean": 1}
    if not args.quick:
        calls = {"plain_4k": 100, "promo_4k": 100, "newsletter_200k": 10, "html_1m": 2, "corpus_mean": 1}

    memory = detector_memory()
    detector = CommercialDetector()
    messages: dict[str, list[bytes]] = {
        "plain_4k": [plain_transactional(4096)],
        "promo_4k": [promotion(4096)],
        "newsletter_200k": [newsletter(200 * 1024)],
        "html_1m": [newsletter(1024 * 1024)],
        # --quick reads every fourth corpus message, to stay a few seconds.
        "corpus_mean": [raw for _, raw in corpus()][:: 4 if args.quick else 1],
    }
    results: dict[str, Any] = {}
    for kind, raws in messages.items():
        figures = measure(raws, detector, calls[kind], rounds)
        results[kind] = {
            "messages": len(raws),
            "size_bytes": statistics.mean(len(raw) for raw in raws),
            **{key: figures[name] for key, name in zip(KEYS, MEASURES, strict=True)},
            "verdict": verdicts(raws, detector),
        }
    print_table(results, memory)
    targets = check_targets(results)
    report = {
        "bench": "classifier",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "rounds": rounds,
        "calls_per_round": calls,
        "text_budget": TEXT_BUDGET,
        "html_budget": HTML_BUDGET,
        "detector_memory": memory,
        "results": results,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
