"""The pages of the unsubscribe service, in Dutch and English: plain HTML, no script.

Every value that comes from a token, the store or the config is escaped here. The pages load
one stylesheet from the same origin (the Content-Security-Policy allows nothing else) and
post their forms back to the same origin.
"""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from proxy.stores.consent import ANY, Basis, ConsentEvent

__all__ = (
    "STYLESHEET",
    "TEXTS",
    "TopicRow",
    "confirm_page",
    "done_page",
    "message_page",
    "recipient_page",
    "text",
    "topic_name",
)

STYLESHEET = """\
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f4f5f7;
       color: #1d2330; line-height: 1.5; }
main { max-width: 54rem; margin: 2rem auto; background: #fff; padding: 2rem 2.25rem; border-radius: 8px;
       box-shadow: 0 1px 3px rgba(0,0,0,.12); }
h1 { font-size: 1.5rem; margin-top: 0; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-top: 1px solid #e3e6eb; padding-top: 1.25rem; }
nav.lang { text-align: right; font-size: .9rem; margin-bottom: .5rem; }
nav.lang a, nav.lang span { margin-left: .75rem; }
nav.lang span { font-weight: 600; }
button { font: inherit; padding: .55rem 1.2rem; border-radius: 6px; border: 1px solid #1d4ed8; background: #1d4ed8;
         color: #fff; cursor: pointer; }
button.secondary { background: #fff; color: #1d4ed8; }
button.danger { background: #b42318; border-color: #b42318; }
table { border-collapse: collapse; width: 100%; font-size: .92rem; }
th, td { text-align: left; padding: .45rem .5rem; border-bottom: 1px solid #e3e6eb; vertical-align: top; }
td form { margin: 0; }
.notice { background: #ecfdf3; border: 1px solid #abefc6; padding: .75rem 1rem; border-radius: 6px; }
.muted { color: #5b6475; font-size: .9rem; }
.evidence { color: #5b6475; font-size: .82rem; overflow-wrap: anywhere; min-width: 13rem; }
td.date { white-space: nowrap; }
footer { margin-top: 2rem; font-size: .85rem; color: #5b6475; }
"""

TEXTS: Mapping[str, Mapping[str, str]] = {
    "en": {
        "lang_name": "English",
        "all_topics": "commercial mail",
        "confirm_title": "Unsubscribe",
        "confirm_lead": "Stop receiving {topic} from {sender}?",
        "confirm_address": "This concerns {address}.",
        "confirm_button": "Unsubscribe",
        "confirm_note": "Nothing changes until you press the button.",
        "done_title": "You are unsubscribed",
        "done_text": "{address} will receive no more {topic} from {sender}. This takes effect immediately.",
        "done_repeat": "You had already unsubscribed; there is nothing more to do.",
        "to_page": "See and change what {company} keeps about you",
        "page_title": "Your data at {company}",
        "page_intro": "This page shows what {company} keeps about {address} for sending e-mail, and lets you "
        "change it (GDPR articles 15 to 21).",
        "choices_heading": "Your choices for mail from {sender}",
        "col_topic": "Topic",
        "col_status": "Status",
        "status_opt_in": "Subscribed",
        "status_soft_opt_in": "Receiving as a customer",
        "status_opted_out": "Unsubscribed",
        "status_suppressed": "Blocked (mail bounced, or a complaint)",
        "status_none": "Not subscribed",
        "button_opt_in": "Subscribe",
        "button_opt_out": "Unsubscribe",
        "no_topics": "There are no topics to choose from.",
        "withdraw_heading": "Withdraw all consent",
        "withdraw_text": "Stop all commercial mail from {sender} to {address}.",
        "withdraw_button": "Withdraw consent",
        "erase_heading": "Erase your data",
        "erase_text": "Remove {address}, the IP addresses and the other evidence {company} keeps about it "
        "(GDPR article 17). Only a coded fingerprint of the address stays, so that {company} never sends it "
        "commercial mail again.",
        "erase_button": "Erase my data",
        "erased_text": "Your data was erased on {date}. Only a coded fingerprint of the address stays, so that "
        "no commercial mail is sent to it again.",
        "done_erased": "Your data is erased.",
        "download_heading": "Download your data",
        "download_text": "Every record about this address, as a JSON file (GDPR article 20).",
        "download_link": "Download (JSON)",
        "history_heading": "What {company} keeps",
        "history_intro": "Each change is kept with its evidence, oldest first. Records about your domain "
        "(everyone at {domain}) are included.",
        "col_date": "Date",
        "col_event": "Event",
        "col_sender": "Sender",
        "col_how": "How",
        "col_evidence": "Evidence",
        "no_history": "Nothing is recorded about this address.",
        "any_sender": "any sender",
        "any_topic": "all topics",
        "done_opted_in": "You are subscribed to {topic}.",
        "done_opted_out": "You are unsubscribed from {topic}.",
        "done_withdrawn": "All consent for mail from {sender} is withdrawn.",
        "done_unchanged": "That was already on record; nothing changed.",
        "contact": "Questions about your data? Contact {contact}.",
        "privacy": "Privacy statement",
        "invalid_title": "Link not valid",
        "invalid_text": "This link is not valid. Use the link in the most recent message you received.",
        "expired_title": "Link expired",
        "expired_text": "This link is too old to show your data. Use the link in a more recent message. "
        "Unsubscribing still works with the link in any message.",
        "csrf_title": "Please try again",
        "csrf_text": "This form was open too long, or it did not come from this page. Go back, reload the page "
        "and try again.",
        "rate_title": "Too many requests",
        "rate_text": "Please wait {seconds} seconds and try again.",
        "store_title": "Temporarily unavailable",
        "store_text": "Your request cannot be handled right now. Please try again in a few minutes.",
        "bad_title": "Not understood",
        "bad_text": "This request was not understood.",
        "error_title": "Something went wrong",
        "error_text": "Your request could not be handled. Please try again later.",
        "event_opted_in": "Subscribed",
        "event_customer": "Became a customer",
        "event_opted_out": "Unsubscribed",
        "event_suppressed": "Blocked",
        "event_unsuppressed": "Unblocked",
        "method_one_click": "one click in your mail program",
        "method_link": "unsubscribe page",
        "method_preference_center": "this page",
        "method_reply": "e-mail to the unsubscribe address",
        "method_web_form": "web form",
        "method_double_opt_in": "web form with confirmation",
        "method_paper": "on paper",
        "method_api": "by the sender's system",
        "method_admin": "by an administrator",
        "method_import": "imported list",
        "method_sale": "purchase",
        "method_hard_bounce": "mail could not be delivered",
        "method_complaint": "spam complaint",
        "method_manual": "by hand",
    },
    "nl": {
        "lang_name": "Nederlands",
        "all_topics": "commerciële mail",
        "confirm_title": "Afmelden",
        "confirm_lead": "Wilt u geen {topic} meer ontvangen van {sender}?",
        "confirm_address": "Dit gaat over {address}.",
        "confirm_button": "Afmelden",
        "confirm_note": "Er verandert niets tot u op de knop drukt.",
        "done_title": "U bent afgemeld",
        "done_text": "{address} ontvangt geen {topic} meer van {sender}. Dit gaat direct in.",
        "done_repeat": "U was al afgemeld; u hoeft niets meer te doen.",
        "to_page": "Bekijk en wijzig wat {company} over u bewaart",
        "page_title": "Uw gegevens bij {company}",
        "page_intro": "Deze pagina toont wat {company} over {address} bewaart voor het versturen van e-mail, en "
        "laat u dat wijzigen (AVG artikelen 15 tot en met 21).",
        "choices_heading": "Uw keuzes voor mail van {sender}",
        "col_topic": "Onderwerp",
        "col_status": "Status",
        "status_opt_in": "Aangemeld",
        "status_soft_opt_in": "U ontvangt dit als klant",
        "status_opted_out": "Afgemeld",
        "status_suppressed": "Geblokkeerd (mail onbestelbaar, of een klacht)",
        "status_none": "Niet aangemeld",
        "button_opt_in": "Aanmelden",
        "button_opt_out": "Afmelden",
        "no_topics": "Er zijn geen onderwerpen om uit te kiezen.",
        "withdraw_heading": "Alle toestemming intrekken",
        "withdraw_text": "Stop alle commerciële mail van {sender} aan {address}.",
        "withdraw_button": "Toestemming intrekken",
        "download_heading": "Uw gegevens downloaden",
        "download_text": "Alle vastleggingen over dit adres, als JSON-bestand (AVG artikel 20).",
        "download_link": "Downloaden (JSON)",
        "erase_heading": "Uw gegevens wissen",
        "erase_text": "Verwijder {address}, de IP-adressen en het andere bewijs dat {company} erover bewaart "
        "(AVG artikel 17). Alleen een gecodeerde vingerafdruk van het adres blijft, zodat {company} er nooit "
        "meer commerciële mail aan stuurt.",
        "erase_button": "Mijn gegevens wissen",
        "erased_text": "Uw gegevens zijn gewist op {date}. Alleen een gecodeerde vingerafdruk van het adres blijft, "
        "zodat er geen commerciële mail meer aan wordt gestuurd.",
        "done_erased": "Uw gegevens zijn gewist.",
        "history_heading": "Wat {company} bewaart",
        "history_intro": "Elke wijziging wordt met het bewijs bewaard, oudste eerst. Vastleggingen over uw domein "
        "(iedereen bij {domain}) staan er ook bij.",
        "col_date": "Datum",
        "col_event": "Gebeurtenis",
        "col_sender": "Afzender",
        "col_how": "Hoe",
        "col_evidence": "Bewijs",
        "no_history": "Er is niets vastgelegd over dit adres.",
        "any_sender": "elke afzender",
        "any_topic": "alle onderwerpen",
        "done_opted_in": "U bent aangemeld voor {topic}.",
        "done_opted_out": "U bent afgemeld voor {topic}.",
        "done_withdrawn": "Alle toestemming voor mail van {sender} is ingetrokken.",
        "done_unchanged": "Dat stond al zo vastgelegd; er is niets veranderd.",
        "contact": "Vragen over uw gegevens? Neem contact op: {contact}.",
        "privacy": "Privacyverklaring",
        "invalid_title": "Link niet geldig",
        "invalid_text": "Deze link is niet geldig. Gebruik de link in het meest recente bericht dat u ontving.",
        "expired_title": "Link verlopen",
        "expired_text": "Deze link is te oud om uw gegevens te tonen. Gebruik de link in een recenter bericht. "
        "Afmelden kan nog steeds met de link in elk bericht.",
        "csrf_title": "Probeer het opnieuw",
        "csrf_text": "Dit formulier stond te lang open, of kwam niet van deze pagina. Ga terug, laad de pagina "
        "opnieuw en probeer het nog eens.",
        "rate_title": "Te veel verzoeken",
        "rate_text": "Wacht {seconds} seconden en probeer het opnieuw.",
        "store_title": "Tijdelijk niet beschikbaar",
        "store_text": "Uw verzoek kan nu niet worden verwerkt. Probeer het over een paar minuten opnieuw.",
        "bad_title": "Niet begrepen",
        "bad_text": "Dit verzoek werd niet begrepen.",
        "error_title": "Er ging iets mis",
        "error_text": "Uw verzoek kon niet worden verwerkt. Probeer het later opnieuw.",
        "event_opted_in": "Aangemeld",
        "event_customer": "Klant geworden",
        "event_opted_out": "Afgemeld",
        "event_suppressed": "Geblokkeerd",
        "event_unsuppressed": "Deblokkeerd",
        "method_one_click": "één klik in uw mailprogramma",
        "method_link": "afmeldpagina",
        "method_preference_center": "deze pagina",
        "method_reply": "e-mail naar het afmeldadres",
        "method_web_form": "webformulier",
        "method_double_opt_in": "webformulier met bevestiging",
        "method_paper": "op papier",
        "method_api": "door het systeem van de afzender",
        "method_admin": "door een beheerder",
        "method_import": "geïmporteerde lijst",
        "method_sale": "aankoop",
        "method_hard_bounce": "mail kon niet worden bezorgd",
        "method_complaint": "spamklacht",
        "method_manual": "handmatig",
    },
}

_E = html.escape


def text(lang: str, key: str, **values: str) -> str:
    """A text in ``lang`` with ``values`` filled in, all HTML-escaped."""
    template = TEXTS[lang].get(key) or TEXTS["en"][key]
    return _E(template).format(**{name: _E(value) for name, value in values.items()})


def topic_name(lang: str, topic: str, names: Mapping[str, Mapping[str, str]]) -> str:
    """How a topic is called on the page (not escaped)."""
    if topic == ANY:
        return TEXTS[lang]["all_topics"]
    return names.get(topic, {}).get(lang) or topic


@dataclass(frozen=True, slots=True)
class Layout:
    """What every page shares: language, the other languages' links, the controller."""

    lang: str
    stylesheet: str  # path of the stylesheet
    switch: Sequence[tuple[str, str]]  # (language, href) for the language links; empty: none
    company: str
    contact: str
    privacy_url: str | None


def _page(layout: Layout, title: str, body: str) -> str:
    links = []
    for language, href in layout.switch:
        name = _E(TEXTS[language]["lang_name"])
        if language == layout.lang:
            links.append(f'<span lang="{language}">{name}</span>')
        else:
            links.append(f'<a lang="{language}" hreflang="{language}" href="{_E(href)}">{name}</a>')
    nav = f'<nav class="lang">{"".join(links)}</nav>' if len(links) > 1 else ""
    footer_parts = [f"<strong>{_E(layout.company)}</strong>"] if layout.company else []
    if layout.contact:
        contact = layout.contact
        if "@" in contact and not contact.startswith(("http://", "https://", "mailto:")):
            shown = f'<a href="mailto:{_E(contact)}">{_E(contact)}</a>'
        elif contact.startswith(("https://", "http://")):
            shown = f'<a href="{_E(contact)}">{_E(contact)}</a>'
        else:
            shown = _E(contact)
        footer_parts.append(_E(TEXTS[layout.lang]["contact"]).format(contact=shown))
    if layout.privacy_url:
        footer_parts.append(f'<a href="{_E(layout.privacy_url)}">{text(layout.lang, "privacy")}</a>')
    return (
        f'<!DOCTYPE html>\n<html lang="{layout.lang}">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{title}</title>\n"
        f'<link rel="stylesheet" href="{_E(layout.stylesheet)}">\n</head>\n<body>\n<main>\n{nav}\n'
        f"<h1>{title}</h1>\n{body}\n<footer>{' · '.join(footer_parts)}</footer>\n</main>\n</body>\n</html>\n"
    )


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{_E(name)}" value="{_E(value)}">'


def confirm_page(
    layout: Layout, *, action: str, csrf: str, address: str, sender: str, topic: str, page_link: str | None
) -> str:
    lang = layout.lang
    body = (
        f'<p class="lead">{text(lang, "confirm_lead", topic=topic, sender=sender)}</p>\n'
        f"<p>{text(lang, 'confirm_address', address=address)}</p>\n"
        f'<form method="post" action="{_E(action)}">{_hidden("csrf", csrf)}{_hidden("lang", lang)}'
        f'<button type="submit" id="unsubscribe">{text(lang, "confirm_button")}</button></form>\n'
        f'<p class="muted">{text(lang, "confirm_note")}</p>\n'
    )
    if page_link:
        body += f'<p><a id="your-page" href="{_E(page_link)}">{text(lang, "to_page", company=layout.company)}</a></p>'
    return _page(layout, text(lang, "confirm_title"), body)


def done_page(layout: Layout, *, address: str, sender: str, topic: str, repeated: bool, page_link: str | None) -> str:
    lang = layout.lang
    body = f'<p class="notice" id="result">{text(lang, "done_text", address=address, topic=topic, sender=sender)}</p>'
    if repeated:
        body += f'\n<p class="muted">{text(lang, "done_repeat")}</p>'
    if page_link:
        body += f'\n<p><a id="your-page" href="{_E(page_link)}">{text(lang, "to_page", company=layout.company)}</a></p>'
    return _page(layout, text(lang, "done_title"), body)


def message_page(layout: Layout, title_key: str, text_key: str, **values: str) -> str:
    return _page(layout, text(layout.lang, title_key), f"<p>{text(layout.lang, text_key, **values)}</p>")


@dataclass(frozen=True, slots=True)
class TopicRow:
    topic: str
    name: str
    basis: Basis


_STATUS_KEYS = {
    "opt_in": "status_opt_in",
    "soft_opt_in": "status_soft_opt_in",
    "opted_out": "status_opted_out",
    "suppressed": "status_suppressed",
    "none": "status_none",
}


def _date(event: ConsentEvent) -> str:
    """Day and time on two lines (HTML), so the evidence column keeps its width."""
    return event.effective_at.strftime("%Y-%m-%d") + "<br>" + event.effective_at.strftime("%H:%M UTC")


def _evidence(event: ConsentEvent) -> str:
    items = []
    for label, value in (
        ("source", event.source),
        ("IP", event.ip),
        ("user agent", event.user_agent),
        ("text", event.text_version),
        ("confirmed", event.confirmed_at.strftime("%Y-%m-%d %H:%M UTC") if event.confirmed_at else None),
        ("order", event.relation),
        ("category", event.product_category),
        ("reason", event.reason),
        ("erased", event.erased_at.strftime("%Y-%m-%d %H:%M UTC") if event.erased_at else None),
        ("record", f"#{event.id}" if event.id is not None else None),
    ):
        if value:
            items.append(f"{_E(label)}: {_E(str(value))}")
    return "<br>".join(items)


def recipient_page(
    layout: Layout,
    *,
    address: str,
    sender: str,
    rows: Sequence[TopicRow],
    events: Sequence[ConsentEvent],
    topic_action: str,
    withdraw_action: str,
    download_link: str,
    csrf_topics: str,
    csrf_withdraw: str,
    notice: str | None,
    names: Mapping[str, Mapping[str, str]],
    erase_action: str | None = None,
    csrf_erase: str | None = None,
    erased_at: datetime | None = None,
) -> str:
    lang = layout.lang
    company = layout.company
    parts = []
    if notice:
        parts.append(f'<p class="notice" id="notice">{notice}</p>')
    parts.append(f"<p>{text(lang, 'page_intro', company=company, address=address)}</p>")

    parts.append(f"<h2>{text(lang, 'choices_heading', sender=sender)}</h2>")
    if rows:
        lines = [
            f'<table id="choices"><thead><tr><th>{text(lang, "col_topic")}</th><th>{text(lang, "col_status")}</th>'
            "<th></th></tr></thead><tbody>"
        ]
        for row in rows:
            kind = row.basis.kind
            action = "opt_in" if not row.basis.allowed and kind != "suppressed" else "opt_out"
            button_class = "" if action == "opt_in" else ' class="secondary"'
            form = (
                f'<form method="post" action="{_E(topic_action)}">{_hidden("csrf", csrf_topics)}'
                f"{_hidden('lang', lang)}{_hidden('topic', row.topic)}{_hidden('action', action)}"
                f'<button type="submit"{button_class} data-topic="{_E(row.topic)}" data-action="{action}">'
                f"{text(lang, 'button_' + action)}</button></form>"
            )
            lines.append(
                f'<tr data-topic="{_E(row.topic)}" data-status="{_E(kind)}"><td>{_E(row.name)}</td>'
                f"<td>{text(lang, _STATUS_KEYS[kind])}</td><td>{form}</td></tr>"
            )
        lines.append("</tbody></table>")
        parts.append("".join(lines))
    else:
        parts.append(f'<p class="muted">{text(lang, "no_topics")}</p>')

    parts.append(f"<h2>{text(lang, 'withdraw_heading')}</h2>")
    parts.append(f"<p>{text(lang, 'withdraw_text', sender=sender, address=address)}</p>")
    parts.append(
        f'<form method="post" action="{_E(withdraw_action)}">{_hidden("csrf", csrf_withdraw)}{_hidden("lang", lang)}'
        f'<button type="submit" class="danger" id="withdraw">{text(lang, "withdraw_button")}</button></form>'
    )

    if erase_action is not None and csrf_erase is not None:
        parts.append(f"<h2>{text(lang, 'erase_heading')}</h2>")
        if erased_at is not None:
            erased_on = erased_at.strftime("%Y-%m-%d %H:%M UTC")
            parts.append(f'<p id="erased">{text(lang, "erased_text", date=erased_on)}</p>')
        else:
            parts.append(f"<p>{text(lang, 'erase_text', company=company, address=address)}</p>")
            parts.append(
                f'<form method="post" action="{_E(erase_action)}">{_hidden("csrf", csrf_erase)}'
                f'{_hidden("lang", lang)}<button type="submit" class="danger" id="erase">'
                f"{text(lang, 'erase_button')}</button></form>"
            )

    parts.append(f"<h2>{text(lang, 'download_heading')}</h2>")
    parts.append(
        f"<p>{text(lang, 'download_text')} "
        f'<a id="download" href="{_E(download_link)}" download>{text(lang, "download_link")}</a></p>'
    )

    parts.append(f"<h2>{text(lang, 'history_heading', company=company)}</h2>")
    domain = address.rpartition("@")[2]
    parts.append(f'<p class="muted">{text(lang, "history_intro", domain="@" + domain)}</p>')
    if events:
        lines = [
            '<table id="history"><thead><tr>'
            + "".join(
                f"<th>{text(lang, key)}</th>"
                for key in ("col_date", "col_event", "col_topic", "col_sender", "col_how", "col_evidence")
            )
            + "</tr></thead><tbody>"
        ]
        for event in events:
            topic_shown = TEXTS[lang]["any_topic"] if event.topic == ANY else topic_name(lang, event.topic, names)
            sender_shown = TEXTS[lang]["any_sender"] if event.sender == ANY else event.sender
            subject = "" if event.subject_kind == "address" else f" ({event.label})"
            lines.append(
                f'<tr data-kind="{_E(event.kind)}"><td class="date">{_date(event)}</td>'
                f"<td>{text(lang, 'event_' + event.kind)}{_E(subject)}</td><td>{_E(topic_shown)}</td>"
                f"<td>{_E(sender_shown)}</td><td>{_method(lang, event.method)}</td>"
                f'<td class="evidence">{_evidence(event)}</td></tr>'
            )
        lines.append("</tbody></table>")
        parts.append("".join(lines))
    else:
        parts.append(f'<p class="muted" id="no-history">{text(lang, "no_history")}</p>')
    return _page(layout, text(lang, "page_title", company=company), "\n".join(parts))


def _method(lang: str, method: str) -> str:
    key = f"method_{method}"
    return text(lang, key) if key in TEXTS[lang] else _E(method)


def with_query(path: str, **params: str) -> str:
    return f"{path}?{urllib.parse.urlencode(params)}" if params else path
