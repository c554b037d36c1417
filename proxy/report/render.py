"""The report and the evidence pack as JSON, CSV and HTML.

JSON is ``as_dict()`` as it is (the stable format, versioned by its ``format`` and
``version`` keys). CSV is one long table with fixed columns (``CSV_COLUMNS``), one row per
figure, so a spreadsheet or a script reads every section the same way. HTML is rendered by
Jinja2 with autoescape on (addresses, reasons and replies come from outside: a recipient
address or an upstream's reply must never become markup), with the charts drawn here as
inline SVG: the page needs nothing from the network when it is opened, archived or printed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

__all__ = ("CSV_COLUMNS", "EVIDENCE_CSV_COLUMNS", "Bar", "Chart", "render")

CSV_COLUMNS = ("section", "key", "detail", "value")
EVIDENCE_CSV_COLUMNS = (
    "time",
    "txn",
    "sender",
    "class",
    "message_id",
    "result",
    "policy",
    "basis",
    "topic",
    "record_id",
    "record_method",
    "record_effective_at",
    "record_source",
    "reply",
)

_ENV = Environment(
    loader=PackageLoader("proxy.report", "templates"),
    autoescape=select_autoescape(["html", "j2"], default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _duration(seconds: Any) -> str:
    """Seconds as a person reads them: 42 s, 12 min, 5.5 h, 3.0 d."""
    if seconds is None:
        return "–"
    value = float(seconds)
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


_ENV.filters["duration"] = _duration

PALETTE = {"delivered": "#2f7d4f", "refused": "#b3412f", "transactional": "#7d8ea3", "neutral": "#3d6ea8"}


def render(data: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    evidence = data.get("format") == "sendguard-evidence"
    if fmt == "csv":
        return _evidence_csv(data) if evidence else _report_csv(data)
    if fmt == "html":
        if evidence:
            return _ENV.get_template("evidence.html.j2").render(pack=data)
        return _ENV.get_template("report.html.j2").render(report=data, charts=report_charts(data))
    raise ValueError(f"unknown format {fmt!r}: html, json or csv")


# ---- CSV ---------------------------------------------------------------------------------------


def _rows(data: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    rows: list[tuple[str, str, str, Any]] = [
        ("period", "from", "", data["period"]["from"]),
        ("period", "to", "", data["period"]["to"]),
        ("period", "sender_domain", "", data["sender_domain"] or "*"),
        ("totals", "transactions", "", data["transactions"]),
    ]
    commercial = data["commercial"]
    for key in (
        "messages",
        "recipient_deliveries",
        "distinct_recipients",
        "recipients_refused",
        "recipient_attempts",
        "transactional_deliveries",
    ):
        rows.append(("commercial", key, "", commercial[key]))
    for day in commercial["by_day"]:
        for key in ("delivered", "refused", "transactional"):
            rows.append(("by_day", day["date"], key, day[key]))
    basis = data["basis"]
    rows += [("basis_delivered", k, "", v) for k, v in basis["delivered"].items()]
    rows += [("basis_refused", k, "", v) for k, v in basis["refused"].items()]
    rows += [("opt_in_method", k, "", v) for k, v in basis["opt_in_methods"].items()]
    rows += [("opt_in_evidence", k, "", v) for k, v in basis["opt_in_evidence"].items()]
    rows += [("refusal", r["policy"], r["reason"], r["recipients"]) for r in data["refusals"]]
    opt_outs = data["opt_outs"]
    for key in ("total", "recorded_after_48h", "followed_by_a_message", "not_honoured", "unsubscribe_requests_logged"):
        rows.append(("opt_outs", key, "", opt_outs[key]))
    rows += [("opt_outs", "lag_seconds", k, v) for k, v in opt_outs["lag_seconds"].items()]
    rows += [("opt_out_channel", k, "", v) for k, v in opt_outs["by_channel"].items()]
    rows += [("suppression_cause", k, "", v) for k, v in opt_outs["suppressions_by_cause"].items()]
    for event in opt_outs["events"]:
        following = event["next_message"] or {}
        label = f"#{event['record']} {event['subject']}"
        rows.append(("opt_out", label, "channel", event["channel"]))
        rows.append(("opt_out", label, "effective_at", event["effective_at"]))
        rows.append(("opt_out", label, "lag_seconds", event["lag_seconds"]))
        rows.append(("opt_out", label, "next_message", following.get("txn") or ""))
        rows.append(("opt_out", label, "result", following.get("result") or "no_message_since"))
    for rate in data["rates"]:
        for key in (
            "recipients_tried",
            "hard_bounces",
            "bounce_rate",
            "bounce_status",
            "commercial_delivered",
            "complaints",
            "complaint_rate",
            "complaint_status",
        ):
            rows.append(("rate", rate["sender_domain"], key, rate[key]))
    for pause in data["pauses"]:
        for key in ("paused", "set", "set_first", "until", "transactions", "first", "last", "reason"):
            rows.append(("pause", pause["source"], key, pause[key]))
    for erasure in data["erasures"]["events"]:
        for key in ("at", "events_erased", "requested"):
            rows.append(("erasure", f"#{erasure['record']}", key, erasure[key]))
    return rows


def _csv(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if value is None else _spreadsheet_safe(value) for value in row])
    return out.getvalue()


def _spreadsheet_safe(value: Any) -> Any:
    # An address or a reply starting with = + - @ would be a formula to a spreadsheet
    # (CSV injection): prefix it with a quote, as OWASP advises. Numbers stay numbers.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _report_csv(data: dict[str, Any]) -> str:
    return _csv(CSV_COLUMNS, list(_rows(data)))


def _evidence_csv(pack: dict[str, Any]) -> str:
    rows: list[tuple[Any, ...]] = []
    for message in pack["messages"]:
        record = message.get("record") or {}
        rows.append(
            (
                message["time"],
                message["txn"],
                message["sender"],
                message["class"],
                message["message_id"],
                message["result"],
                message["policy"],
                message["basis"],
                message["topic"],
                record.get("id"),
                record.get("method"),
                record.get("effective_at"),
                record.get("source"),
                message["reply"],
            )
        )
    return _csv(EVIDENCE_CSV_COLUMNS, rows)


# ---- charts ------------------------------------------------------------------------------------


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    fill: str
    title: str


@dataclass
class Chart:
    """An SVG chart already laid out: the template only draws what is here."""

    id: str
    title: str
    width: int
    height: int
    bars: list[Bar] = field(default_factory=list)
    labels: list[tuple[float, float, str, str]] = field(default_factory=list)  # x, y, anchor, text
    lines: list[tuple[float, float, float, float, str]] = field(default_factory=list)  # x1 y1 x2 y2 colour
    legend: list[tuple[str, str]] = field(default_factory=list)  # colour, name
    empty: bool = False


def report_charts(data: dict[str, Any]) -> list[Chart]:
    return [
        _daily_chart(data["commercial"]["by_day"]),
        _horizontal(
            "basis",
            "Lawful basis per commercial recipient",
            [(f"delivered: {k}", v, PALETTE["delivered"]) for k, v in data["basis"]["delivered"].items()]
            + [(f"refused: {k}", v, PALETTE["refused"]) for k, v in data["basis"]["refused"].items()],
        ),
        _horizontal(
            "refusals",
            "Refused recipients by policy",
            _by_policy(data["refusals"]),
        ),
        _rates_chart(data["rates"], data["thresholds"]),
    ]


def _by_policy(refusals: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    totals: dict[str, int] = {}
    for row in refusals:
        totals[row["policy"]] = totals.get(row["policy"], 0) + int(row["recipients"])
    return [(policy, count, PALETTE["refused"]) for policy, count in sorted(totals.items(), key=lambda kv: -kv[1])]


def _daily_chart(days: list[dict[str, Any]]) -> Chart:
    width, height, left, bottom, top = 720, 240, 48, 36, 16
    chart = Chart("daily", "Commercial recipients per day", width, height)
    chart.legend = [(PALETTE["delivered"], "delivered"), (PALETTE["refused"], "refused")]
    peak = max((d["delivered"] + d["refused"] for d in days), default=0)
    if not days or peak == 0:
        chart.empty = True
        return chart
    plot_w, plot_h = width - left - 8, height - top - bottom
    step = plot_w / len(days)
    bar_w = max(step * 0.7, 1.0)
    chart.lines.append((left, top + plot_h, left + plot_w, top + plot_h, "#555"))
    for fraction in (0.5, 1.0):
        y = top + plot_h - plot_h * fraction
        chart.lines.append((left, y, left + plot_w, y, "#ddd"))
        chart.labels.append((left - 6, y + 4, "end", f"{round(peak * fraction):,}"))
    every = max(1, len(days) // 10)
    for index, day in enumerate(days):
        x = left + index * step + (step - bar_w) / 2
        base = top + plot_h
        for key in ("delivered", "refused"):
            value = day[key]
            if value:
                h = plot_h * value / peak
                base -= h
                chart.bars.append(Bar(x, base, bar_w, h, PALETTE[key], f"{day['date']}: {value:,} {key}"))
        if index % every == 0:
            chart.labels.append((x + bar_w / 2, height - bottom + 16, "middle", day["date"][5:]))
    return chart


def _horizontal(ident: str, title: str, items: list[tuple[str, int, str]]) -> Chart:
    row, left, width = 26, 260, 720
    items = items[:12]
    chart = Chart(ident, title, width, max(row * len(items) + 12, 40))
    peak = max((v for _, v, _ in items), default=0)
    if not items or peak == 0:
        chart.empty = True
        return chart
    plot_w = width - left - 80
    for index, (label, value, colour) in enumerate(items):
        y = 6 + index * row
        w = max(plot_w * value / peak, 1.0)
        chart.bars.append(Bar(left, y, w, row - 8, colour, f"{label}: {value:,}"))
        chart.labels.append((left - 8, y + row / 2, "end", label[:40]))
        chart.labels.append((left + w + 6, y + row / 2, "start", f"{value:,}"))
    return chart


def _rates_chart(rates: list[dict[str, Any]], thresholds: dict[str, Any]) -> Chart:
    """Complaint and bounce rate per sender domain, each drawn against its own limit (the
    limit's line at the same place for both), so 'how close to the line' reads at a glance."""
    rows = [r for r in rates if r["bounce_rate"] is not None or r["complaint_rate"] is not None][:8]
    row, left, width = 24, 260, 720
    chart = Chart("rates", "Complaint and bounce rates against the limits", width, max(row * 2 * len(rows) + 24, 40))
    chart.legend = [
        (PALETTE["neutral"], "share of the limit"),
        ("#b3412f", "limit (Gmail/Yahoo 0.3% complaints, 10% bounces)"),
    ]
    if not rows:
        chart.empty = True
        return chart
    plot_w = width - left - 120
    limit_x = left + plot_w * 0.8  # the limit sits at 80% of the width: room to show a rate above it
    for index, rate in enumerate(rows):
        for offset, (kind, limit) in enumerate(
            (("complaint", thresholds["complaint_rate"]["limit"]), ("bounce", thresholds["bounce_rate"]["limit"]))
        ):
            value = rate[f"{kind}_rate"]
            y = 6 + (index * 2 + offset) * row
            label = f"{rate['sender_domain']} {kind}s"
            chart.labels.append((left - 8, y + row / 2, "end", label[:40]))
            if value is None:
                chart.labels.append((left + 4, y + row / 2, "start", "no data"))
                continue
            share = min(value / limit, 1.25)
            colour = "#b3412f" if value >= limit else PALETTE["neutral"]
            w = max((limit_x - left) * share, 1.0)
            chart.bars.append(Bar(left, y, w, row - 8, colour, f"{label}: {value:.3%} (limit {limit:.1%})"))
            chart.labels.append((left + w + 6, y + row / 2, "start", f"{value:.2%}"))
    chart.lines.append((limit_x, 0, limit_x, chart.height, "#b3412f"))
    return chart
