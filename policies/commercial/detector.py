"""The commercial-mail detector: scores one parsed message from the signals described in
``policies/commercial/__init__.py``; pure, synchronous, no network."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable

from policies.commercial.body import LINK_BUDGET, UTM, Body, tracked
from policies.commercial.signals import (
    COUNTER_CAP,
    COUNTER_CAP_WITH_CROSS_SELL,
    DEFAULT_WEIGHTS,
    LIST_SIGNAL,
    WORD_CAPS,
    Detection,
    DetectorTuning,
    Signal,
    Verdict,
)
from policies.commercial.words import WordLists, default_word_lists, find
from policies.message import Address, ParsedMessage

__all__ = ("CommercialDetector",)

_REPLY_SUBJECT = re.compile(
    r"^\s*(?:\[[^\]]{1,40}\]\s*)?(?:re|aw|antw|antwoord|sv|vs|r|rif|ref|odp|res|rv|réf)\s*(?:\[\d+\]|\(\d+\))?\s*:",
    re.I,
)
#: Labels some laws ask advertising to carry in the subject: "ADV:" (several US states),
#: "[Advertentie]", "Anzeige", "Werbung", "Publicité", "Publicidad".
_AD_LABEL = re.compile(
    r"^\s*(?:\[\s*)?(?:adv|advertentie|reclame|advertisement|anzeige|werbung|publicit[eé]|publicidad|pubblicit[aà])"
    r"\s*[\]:]",
    re.I,
)
_FORWARD_SUBJECT = re.compile(r"^\s*(?:fwd?|wg|tr|doorst|i|enc|rv)\s*:", re.I)
_ROLE_STRONG = re.compile(
    r"^(?:news|newsletter|newsletters|nieuws|nieuwsbrief|marketing|promo|promos|promotions?|offers?|deals?"
    r"|aanbieding(?:en)?|acties?|angebote?|werbung|campaigns?|campagne|mailing|mailings|announce|announcements"
    r"|ofertas?|promociones|boletin|infolettre|lettre|donate|donations?|fundraising|giving|doneer|spenden)"
    r"(?:[-_.+].*)?$",
    re.I,
)
#: A display name that says the sender is a mailing ("Finntack Newsletter", "ACME Nieuwsbrief").
_ROLE_NAME = re.compile(
    r"\b(?:newsletter|nieuwsbrief|marketing|promotions?|aanbiedingen|angebote|infolettre|boletin|bolet[ií]n"
    r"|deals|offers)\b",
    re.I,
)
_ROLE_WEAK = re.compile(
    r"^(?:info|hello|hallo|hola|bonjour|team|contact|service|klantenservice|shop|store|winkel|sales|verkoop|vertrieb)$",
    re.I,
)

_ESP_MAILERS = re.compile(
    r"mailchimp|mandrill|sendinblue|brevo|mailerlite|mailjet|campaign ?monitor|createsend|klaviyo|activecampaign"
    r"|constant ?contact|getresponse|hubspot|marketo|pardot|exacttarget|marketing cloud|silverpop|emarsys|laposta"
    r"|mailpoet|sendy|phplist|listmonk|mautic|moosend|omnisend|convertkit|aweber|benchmark ?email|cleverreach"
    r"|rapidmail|newsletter2go|sendpulse|acumbamail|mailrelay|flexmail|spotler|mailplus|copernica|deployteq"
    r"|newsletter|mass ?mail|bulk ?mail|e-?mail marketing|campaign",
    re.I,
)
_CAMPAIGN_HEADER = re.compile(
    r"^x-(?:campaign|mailchimp|mc-user|csa-complaints|newsletter|mailing-?id|mailjet-campaign|sib-|mailerlite"
    r"|klaviyo|hs-|hubspot|marketo|listmonk|pardot|emarsys|sfmc|et-|acumba|mlm|rpcampaign|ems-|cm-campaign)",
    re.I,
)

# Money: a currency sign or code next to a number, either order (1.234,56 EUR; €12; $9.99).
_PRICE = re.compile(
    r"(?:[€$£¥]|\b(?:eur|euro|usd|gbp|chf|sek|nok|dkk|pln)\b)\s?\d|\d(?:[\d.,\s]*\d)?\s?(?:[€$£]|\b(?:eur|euro|euros|usd|gbp|chf|,-)\b)",
)
# A percentage off, in the five languages, or a "-20%" badge.
_DISCOUNT = re.compile(
    r"\d{1,2}\s?%\s?(?:off|korting|rabatt|discount|de (?:r[eé]duction|remise|descuento)|r[eé]duction|remise|descuento"
    r"|dto|sparen|voordeel|minder|ahorro|en moins|extra)\b|(?<![\w-])-\s?\d{1,2}\s?%"
    r"|\b(?:up to|tot|bis zu|jusqu['’][aà]|hasta)\s+(?:\d{1,2}\s?%|[€$£]\s?\d+)"
    r"|\b(?:korting|rabatt|sconto|descuento|remise|r[eé]duction|discount|dto)\s+(?:\w+\s+){0,2}(?:van|von|de|del|of|di)"
    r"\s+\d{1,2}\s?%"
    r"|\d+\s?% (?:op|auf|sur|en) (?:alles|alle|tout|toute?s?|tod[oa]s?)"
    r"|\b(?:was|antes|statt|voorheen|normaal|au lieu de|instead of)\s*:?\s*(?:[€$£]\s?\d|\d+(?:[.,]\d+)?\s?(?:€|eur))",
)
# A promo code: the word, then something that looks like a code (letters and digits, upper case).
_CODE_WORDS = re.compile(r"code|coupon|gutschein|cup[oó]n|c[oó]digo|voucher")
_CODE = re.compile(
    r"(?i:code|coupon|gutschein|cup[oó]n|c[oó]digo|voucher)\s*:?\s*[\"'“]?(?=[A-Z0-9]*\d|[A-Z]{4})[A-Z0-9]{4,}\b"
)


def _sender(message: ParsedMessage) -> Address | None:
    """The first From address. A plain field is read with ``parseaddr`` (a tenth of the cost
    of the structured parser); an encoded or odd one goes through the shared parse."""
    raw = message.raw_fields.get("from")
    if raw and len(raw) == 1 and "=?" not in raw[0] and raw[0].count("@") == 1 and "," not in raw[0]:
        name, spec = email.utils.parseaddr(raw[0])
        if "@" in spec:
            return Address(name, spec)
    senders = message.addresses("From")
    return senders[0] if senders else None


#: Mailbox providers for the public: two of their users are not colleagues (a shop owner on
#: gmail.com writing to a customer on gmail.com).
_PUBLIC_MAIL = re.compile(
    r"^(?:g(?:oogle)?mail|hotmail|outlook|live|msn|yahoo|ymail|icloud|me|mac|aol|gmx|web|t-online|freenet|orange"
    r"|wanadoo|free|sfr|laposte|ziggo|kpnmail|kpnplanet|xs4all|planet|hetnet|home|chello|telenet|skynet|proton"
    r"|protonmail|pm|libero|virgilio|tiscali|telefonica|movistar|terra|mail|email|posteo|mailbox|zoho|yandex"
    r"|mail\.ru|seznam|wp|o2|onet|interia)\.[a-z.]{2,6}$"
)


def _same_organisation(domain: str, other: str) -> bool:
    """One domain is the other or a subdomain of it (mail.example.com and example.com), and
    it is not a public mailbox provider."""
    if not domain or not other or _PUBLIC_MAIL.match(domain) or _PUBLIC_MAIL.match(other):
        return False
    return domain == other or domain.endswith("." + other) or other.endswith("." + domain)


def _find_discount(text: str) -> str:
    """A discount offer, looked for only around "%" signs and currency amounts (the text may
    be long; the patterns are not cheap to try at every position)."""
    for marker in ("%", "€", "$", "£"):
        start = text.find(marker)
        tries = 0
        while start != -1 and tries < 20:
            window = text[max(0, start - 60) : start + 30]
            match = _DISCOUNT.search(window)
            if match:
                return match.group().strip()[:30]
            start = text.find(marker, start + 1)
            tries += 1
    return ""


class CommercialDetector:
    """Score one parsed message; pure, synchronous, no I/O. One instance serves every message."""

    def __init__(self, tuning: DetectorTuning | None = None, words: WordLists | None = None) -> None:
        self.tuning = tuning or DetectorTuning()
        unknown = set(self.tuning.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown signal(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **self.tuning.weights}
        self.words = words or default_word_lists()

    def detect(self, message: ParsedMessage, *, mail_from: str = "", recipients: Iterable[str] = ()) -> Detection:
        signals: list[Signal] = []
        raw_subject = message.raw_header_values("Subject")
        if raw_subject and "=?" not in raw_subject[0]:
            subject = " ".join(raw_subject[0].split())  # unfolded; decoding would change nothing
        else:
            subject = message.header("Subject") or ""
        self._header_signals(message, subject, mail_from, list(recipients), signals)
        body = Body.read(message)
        self._structure_signals(body, signals)
        self._word_signals(subject, body, signals)
        return self._decide(signals)

    # ---- scoring ----

    def _add(self, signals: list[Signal], name: str, detail: str = "", count: int = 1) -> None:
        weight = self.weights[name] * count
        if weight:
            signals.append(Signal(name, round(weight, 3), detail))

    def _decide(self, signals: list[Signal]) -> Detection:
        toward = sum(s.weight for s in signals if s.weight > 0)
        against = sum(s.weight for s in signals if s.weight < 0 and s.name not in ("delivery_report", "auto_reply"))
        absolute = sum(s.weight for s in signals if s.name in ("delivery_report", "auto_reply"))
        cap = COUNTER_CAP_WITH_CROSS_SELL if any(s.name == "cross_sell" for s in signals) else COUNTER_CAP
        score = round(toward + max(against, -cap) + absolute, 3)
        verdict: Verdict
        if score >= self.tuning.commercial_at:
            verdict = "commercial"
        elif score >= self.tuning.grey_from:
            verdict = "grey"
        else:
            verdict = "transactional"
        return Detection(score, verdict, tuple(signals))

    # ---- headers ----

    def _header_signals(
        self, message: ParsedMessage, subject: str, mail_from: str, recipients: list[str], signals: list[Signal]
    ) -> None:
        fields = message.raw_fields

        def raw(name: str) -> str:
            return " ".join(fields.get(name, ())).strip()

        list_post = raw("list-post").lower()
        discussion = bool(list_post) and list_post not in ("no", "<no>") and list_post.strip("<> ") != "no"
        if discussion:
            self._add(signals, "discussion_list", "List-Post")
        if "list-unsubscribe" in fields:
            self._add(signals, "list_unsubscribe_header")
        if "list-id" in fields:
            self._add(signals, "list_id_header")
        precedence = raw("precedence").lower()
        if precedence in ("bulk", "junk"):
            self._add(signals, "precedence_bulk", precedence)
        campaign = sorted({n for n in message.header_names if n[:2] in ("X-", "x-") and _CAMPAIGN_HEADER.match(n)})
        if campaign:
            self._add(signals, "campaign_headers", ", ".join(campaign[:3]))
        if "feedback-id" in fields:
            self._add(signals, "feedback_id")
        mailer = raw("x-mailer") + " " + raw("user-agent")
        found = _ESP_MAILERS.search(mailer)
        if found:
            self._add(signals, "esp_mailer", found.group().lower())

        sender = _sender(message)
        local = sender.normalized.rpartition("@")[0] if sender is not None else ""
        envelope_local = mail_from.lower().rpartition("@")[0]
        role = next((c + "@" for c in (local, envelope_local) if c and _ROLE_STRONG.match(c)), "")
        if not role and sender is not None and _ROLE_NAME.search(sender.display_name):
            role = f'"{sender.display_name[:40]}"'
        if role:
            self._add(signals, "role_sender", role)
        elif local and _ROLE_WEAK.match(local):
            signals.append(Signal("role_sender", round(self.weights["role_sender"] / 3, 3), local + "@"))

        report = raw("content-type").lower().lstrip().startswith("multipart/report")  # RFC 6522
        auto = raw("auto-submitted").lower()
        if report or local in ("mailer-daemon", "postmaster"):
            self._add(signals, "delivery_report", "multipart/report" if report else local)
        if auto.startswith("auto-replied") or "x-autoreply" in fields or "x-autorespond" in fields:
            self._add(signals, "auto_reply")

        if "in-reply-to" in fields or _REPLY_SUBJECT.match(subject):
            why = "In-Reply-To" if "in-reply-to" in fields else "subject"
            self._add(signals, "reply", why)
        elif _FORWARD_SUBJECT.match(subject) or "references" in fields:
            signals.append(Signal("reply", round(self.weights["reply"] / 2, 3), "forward or References"))

        if _AD_LABEL.match(subject):
            self._add(signals, "advertisement_label", subject.strip()[:20])

        # Colleagues writing to colleagues: every recipient (the envelope's when known, else
        # To/Cc without the sender's own address, where bulk mail hides behind Bcc) is in the
        # sender's organisation. A mailing role (news@, "Newsletter") is not a conversation.
        if sender is not None and not role:
            own = sender.normalized
            domains = [r.lower().rpartition("@")[2] for r in recipients if r.lower() != own] or [
                a.domain for a in message.header_recipients if a.normalized != own
            ]
            if domains and all(_same_organisation(sender.domain, d) for d in domains):
                self._add(signals, "internal", sender.domain)

    # ---- links, images, layout ----

    def _structure_signals(self, body: Body, signals: list[Signal]) -> None:
        if body.pixels:
            self._add(signals, "tracking_pixel", f"{body.pixels} image(s)")
        targets = body.link_targets
        if targets:
            utm = sum(1 for t in targets if UTM.search(t))
            if utm:
                self._add(signals, "utm_links", f"{utm} link(s)")
            sample = targets[:LINK_BUDGET]  # enough to see how a campaign builds its links
            redirected = sum(1 for t in sample if tracked(t))
            if redirected >= 3 or (redirected >= 2 and redirected * 2 >= len(sample)):
                self._add(signals, "click_tracking", f"{redirected} of {len(sample)} links")
        if (body.images >= 4 and len(targets) >= 8 and body.tables >= 2) or len(targets) >= 25:
            self._add(signals, "newsletter_layout", f"{len(targets)} links, {body.images} images")
        if body.quoted:
            self._add(signals, "quoted_text")

    # ---- words ----

    def _word_signals(self, subject: str, body: Body, signals: list[Signal]) -> None:
        text = subject.lower() + "\n" + body.lowered
        found, reference = self._find(text)
        for list_name, signal in LIST_SIGNAL.items():
            hits = found.get(list_name)
            if not hits:
                continue
            languages = sorted({lang for _, lang in hits})
            words = sorted({entry for entry, _ in hits})
            cap = WORD_CAPS.get(signal, 1)
            count = min(len(words), cap)
            self._add(signals, signal, f"{'/'.join(languages)}: {', '.join(words[:4])}", count)
        if found.get("call_to_action") and _PRICE.search(text):
            languages = sorted({lang for _, lang in found["call_to_action"]})
            self._add(signals, "price+call_to_action", "/".join(languages))
        discount = _find_discount(text)
        if discount:
            self._add(signals, "discount", discount)
        elif found.get("promotion") and _CODE_WORDS.search(text) and _CODE.search(body.text):
            self._add(signals, "discount", "promo code")
        if reference:
            self._add(signals, "reference_number", reference)

    def _find(self, text: str) -> tuple[dict[str, set[tuple[str, str]]], str]:
        return find(self.words, text)
