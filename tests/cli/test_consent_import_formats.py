"""``sendguard consent import --format``: the exports of Mailchimp, Brevo and Laposta as the tools
write them (tests/fixtures/exports/), into SQLite and the real PostgreSQL.

Each case names a fixture, the command's options, the summary it must print, and what the
store then holds for each address (kind, method, times, IP). The names, phone numbers and
postal addresses in the exports must not reach the store.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.consent import EXIT_BAD_INPUT, EXIT_OK
from proxy.stores.consent_formats import ImportOptions, ImportReader
from tests.cli.test_consent_cli import cli, config_file, write_config

__all__ = ("config_file",)  # the fixture, parametrised over both backends

ROOT = Path(__file__).resolve().parents[2]
EXPORTS = ROOT / "tests" / "fixtures" / "exports"


@dataclass(frozen=True)
class Case:
    fixture: str
    args: tuple[str, ...]
    summary: str
    expected: dict[str, dict[str, Any]]  # address -> fields of its one event
    absent: tuple[str, ...] = field(default=())  # text that must not reach the store


CASES = [
    Case(
        "mailchimp_subscribed.csv",
        ("--format", "mailchimp", "--topic", "newsletter", "--sender", "shop.example"),
        "3 row(s): opted_in 3",
        {
            "anna.jansen@example.nl": {
                "event": "opted_in", "method": "double_opt_in", "at": "2024-01-15T09:12:44Z",
                "confirmed_at": "2024-01-15T09:14:02Z", "ip": "198.51.100.23", "topic": "newsletter",
                "sender": "shop.example", "source": "mailchimp export mailchimp_subscribed.csv",
                "note": "Mailchimp LEID 182736451",
            },
            "piet@example.org": {"event": "opted_in", "method": "web_form", "at": "2023-11-02T18:40:00Z"},
            # No OPTIN_TIME: added to Mailchimp by hand; the default method is import.
            "imported.contact@example.com": {"event": "opted_in", "method": "import", "at": "2024-03-01T08:00:00Z"},
        },
        absent=("Jansen", "Keizersgracht", "+31 20", "Europe/Amsterdam", "a1b2c3d4e5"),
    ),
    Case(
        "mailchimp_unsubscribed.csv",
        ("--format", "mailchimp"),
        "2 row(s): opted_out 2",
        {
            "klaas.bakker@example.nl": {
                "event": "opted_out", "method": "import", "at": "2024-04-02T07:31:09Z",
                "reason": "I no longer want to receive these emails", "note": "Mailchimp campaign: Voorjaarsactie 2024",
            },
            "sofie@example.be": {"event": "opted_out", "reason": "Other Te veel mails", "at": "2024-05-20T19:02:45Z"},
        },
        absent=("Bakker", "Peeters"),
    ),
    Case(
        "mailchimp_cleaned.csv",
        ("--format", "mailchimp", "--source", "Mailchimp audience 'Klanten', export 2024-06"),
        "1 row(s): suppressed 1",
        {
            "oud.adres@example.net": {
                "event": "suppressed", "method": "import", "at": "2024-06-01T06:00:00Z",
                "source": "Mailchimp audience 'Klanten', export 2024-06",
            },
        },
    ),
    Case(
        "brevo_contacts.csv",
        ("--format", "brevo", "--topic", "newsletter"),
        "4 row(s): opted_in 3, opted_out 1",
        {
            "joost@example.nl": {
                "event": "opted_in", "method": "double_opt_in", "at": "2024-02-10T14:03:11Z",
                "confirmed_at": "2024-02-10T14:03:11Z", "note": "Brevo contact 11",
            },
            "emma@example.org": {"event": "opted_in", "method": "web_form", "at": "2023-12-24T08:15:00Z"},
            "lars@example.de": {"event": "opted_out", "method": "import", "at": "2024-03-15T16:45:30Z"},
            # Day-first time, as Brevo writes it for a Dutch account; no opt-in flag: import.
            "handmatig@example.com": {"event": "opted_in", "method": "import", "at": "2024-03-15T10:00:00Z"},
        },
        absent=("Smit", "Visser", "Müller", "+31612345678"),
    ),
    Case(
        "brevo_contacts.csv",
        ("--format", "brevo", "--method", "paper", "--map", "SMS=ignore"),
        "4 row(s): opted_in 3, opted_out 1",
        {"handmatig@example.com": {"event": "opted_in", "method": "paper"}},
    ),
    Case(
        "laposta_export.csv",
        ("--format", "laposta"),
        "4 row(s): opted_in 2, opted_out 1, suppressed 1",
        {
            "fleur@example.nl": {
                "event": "opted_in", "method": "web_form", "at": "2024-04-01T11:22:33Z", "ip": "198.51.100.77",
                "source": "https://winkel.example.nl/nieuwsbrief", "note": "Laposta member abc123def4",
            },
            "daan@example.nl": {"event": "opted_out", "at": "2024-05-05T05:05:05Z"},
            "weg@example.nl": {"event": "suppressed", "at": "2024-02-02T02:02:02Z"},
            # Not confirmed: recorded as a pending double opt-in, which allows nothing yet.
            "twijfel@example.nl": {"event": "opted_in", "method": "double_opt_in", "confirmed_at": None},
        },
        absent=("Fleur", "de Boer", "Mulder"),
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.fixture}{'+' if '--map' in c.args else ''}")
async def test_an_export_imports_as_the_tool_wrote_it(case: Case, config_file: Path, tmp_path: Path) -> None:
    source = EXPORTS / case.fixture
    code, out, err = await cli(config_file, "import", str(source), "--dry-run", *case.args)
    assert (code, err) == (EXIT_OK, ""), err
    assert out.splitlines()[1].strip() == case.summary
    assert (await cli(config_file, "count"))[1].strip() == "0"

    code, out, err = await cli(config_file, "import", str(source), *case.args)
    assert (code, err) == (EXIT_OK, ""), err
    assert out.splitlines()[1].strip() == case.summary
    for address, fields in case.expected.items():
        _, out, _ = await cli(config_file, "show", address, "--json")
        (event,) = json.loads(out)["events"]
        for name, value in fields.items():
            assert event.get(name) == value, (address, name, event)
    _, dump, _ = await cli(config_file, "export", "--format", "jsonl")
    for text in case.absent:
        assert text not in dump


async def test_the_twijfel_pending_opt_in_allows_nothing(config_file: Path) -> None:
    await cli(config_file, "import", str(EXPORTS / "laposta_export.csv"), "--format", "laposta")
    _, out, _ = await cli(config_file, "show", "twijfel@example.nl", "--json")
    assert json.loads(out)["basis"]["allowed"] is False
    _, out, _ = await cli(config_file, "show", "fleur@example.nl", "--json")
    assert json.loads(out)["basis"]["allowed"] is True


@dataclass(frozen=True)
class Refusal:
    name: str
    text: str
    args: tuple[str, ...]
    messages: tuple[str, ...]


REFUSALS = [
    Refusal(
        "mailchimp-as-generic",
        (EXPORTS / "mailchimp_subscribed.csv").read_text(encoding="utf-8"),
        (),
        ("unknown column(s): email address", "looks like a mailchimp export: add --format mailchimp"),
    ),
    Refusal(
        "brevo-as-generic",
        (EXPORTS / "brevo_contacts.csv").read_text(encoding="utf-8"),
        (),
        ("looks like a brevo export: add --format brevo",),
    ),
    Refusal(
        "brevo-with-the-wrong-delimiter",
        (EXPORTS / "brevo_contacts.csv").read_text(encoding="utf-8"),
        ("--format", "brevo", "--delimiter", ","),
        ("a Brevo export has an EMAIL column",),
    ),
    Refusal(
        "bad-rows-by-line",
        "E-mail;Aangemeld;Soort\nann@example.org;2024-01-01;opted_in\nnot-an-address;2024-01-01;opted_in\n"
        "bob@example.org;someday;opted_in\ncat@example.org;2024-01-01;maybe\n",
        ("--map", "E-mail=address", "--map", "Aangemeld=at", "--map", "Soort=event", "--method", "web_form"),
        ("line 3:", "is not an address", "line 4:", "not a time", "line 5:", "event must be one of"),
    ),
    Refusal(
        "map-names-a-missing-column",
        "address,event\nann@example.org,opted_in\n",
        ("--map", "Email=address"),
        ("--map names column(s) the file does not have: email",),
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.name)
async def test_a_file_it_cannot_read_is_refused_whole(refusal: Refusal, config_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text(refusal.text, encoding="utf-8")
    for dry in (("--dry-run",), ()):
        code, _, err = await cli(config_file, "import", str(source), *dry, *refusal.args)
        assert code == EXIT_BAD_INPUT
        assert "nothing was imported" in err
        for message in refusal.messages:
            assert message in err, err
    assert (await cli(config_file, "count"))[1].strip() == "0"


async def test_the_summary_lists_the_first_problems_and_counts_the_rest(tmp_path: Path) -> None:
    lines = ["address,event,method"] + [f"user{i}@example.org,opted_in,web_form" for i in range(100)]
    lines += [f"broken{i},opted_in,web_form" for i in range(30)]
    reader = ImportReader(io.StringIO("\n".join(lines) + "\n"), ImportOptions())
    reader.read_all()
    summary = reader.summary()
    assert summary[0] == "130 row(s): opted_in 100, error 30"
    assert summary[1] == "30 problem(s) (the first 20 below):"
    assert len(summary) == 22 and summary[2].startswith("  line 102: ")


def _generic_file(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("address,event,at,topic,method,source,ip\n")
        for i in range(rows):
            handle.write(f"user{i}@example{i % 97}.org,opted_in,2024-05-01T10:00:00Z,news,web_form,form,192.0.2.7\n")


async def test_a_long_import_reports_progress_on_stderr(config_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.csv"
    _generic_file(source, 60_000)
    code, out, err = await cli(config_file, "import", str(source))
    assert code == EXIT_OK, err
    progress = [line for line in err.splitlines() if "rows read" in line]
    assert progress[:2] == [line for line in progress[:2] if line.strip().startswith("... ")]
    assert "25,000 rows read" in progress[0] and "50,000 rows read" in progress[1]
    assert out.splitlines() == ["imported 60,000 event(s) from " + str(source), "  60,000 row(s): opted_in 60,000"]
    assert (await cli(config_file, "count"))[1].strip() == "60000"
    code, out, err = await cli(config_file, "import", str(source), "--dry-run", "--quiet")
    assert (code, err) == (EXIT_OK, "")


def test_standard_input_with_a_tab_delimiter_from_a_subprocess(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"path": str(tmp_path / "consent.db")})
    text = "address\tevent\tmethod\nann@example.org\topted_in\tweb_form\n"
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli.consent", "import", "--config", str(config), "--delimiter", "tab", "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.splitlines()[0] == "imported 1 event(s) from -"
    with sqlite3.connect(tmp_path / "consent.db") as db:
        assert db.execute("SELECT subject, method FROM consent_events").fetchall() == [("ann@example.org", "web_form")]
