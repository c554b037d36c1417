"""Recognise commercial mail by what it says and how it is built, and say why.

The law (Telecommunicatiewet art. 11.7, ePrivacy art. 13) asks consent and a way out for
mail sent "voor commerciële, ideële of charitatieve doeleinden": promotions, newsletters,
one-to-one sales outreach to companies, fundraising and ideological campaigning, whatever
program wrote the message and whether or not it carries list headers. This module scores
one parsed message from explainable signals and never looks anything up on the network:

* **promotion**: offers, discounts, prices next to a call to action, deadlines, cross-selling
  ("you may also like"), event and webinar invitations;
* **fundraising** and **ideological**: donation appeals, membership recruitment, petitions;
* **outreach**: B2B acquisition ("would you be open to a 15-minute call", demos, trials);
* **bulk_mail**: how campaigns are built: list and campaign headers, ESP mailers, tracking
  pixels, click-tracking redirects, UTM parameters, a web-version link, unsubscribe and
  subscription wording, newsletter layouts, role senders (``news@``, ``nieuwsbrief@``);

and the counter-signals of mail that is not commercial:

* **transactional**: orders, invoices, payments, shipping, bookings, account and security
  mail, with their reference numbers; delivery reports and auto-replies;
* **conversation**: replies (``In-Reply-To``, ``Re:``/``Antw:``/``AW:``), quoted text, mail
  between colleagues of one domain;
* **discussion_list**: a list that accepts posts from its members (``List-Post``).

Each signal has a weight (configurable); the score is their sum. Counter-signals are capped
so that they lower the score but cannot hide advertising: a receipt that also advertises
stays commercial (its advertising needs consent), a receipt alone does not. Words come from
``commercial_words.yaml`` (nl, en, de, fr, es), extendable by the admin.

The cost is one pass over the folded visible text (bounded), a dictionary look-up per word
n-gram, and a few linear regular expressions: no network, no model.
"""

from __future__ import annotations

import email.utils
import html
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from policies.message import Address, ParsedMessage
from policies.unsubscribe import fold

__all__ = (
    "DEFAULT_WEIGHTS",
    "SIGNAL_GROUPS",
    "CommercialDetector",
    "Detection",
    "DetectorTuning",
    "Signal",
    "WordLists",
    "load_word_lists",
)

Verdict = Literal["commercial", "grey", "transactional"]

#: Word lists of ``commercial_words.yaml``, in that file's order.
WORD_LISTS = (
    "promotion",
    "call_to_action",
    "deadline",
    "cross_sell",
    "event",
    "fundraising",
    "ideological",
    "outreach",
    "web_version",
    "unsubscribe",
    "subscription",
    "transactional",
    "account",
)

#: Each signal's group: the groups are what the metric counts and what a refusal names.
SIGNAL_GROUPS: Mapping[str, str] = {
    "promotion_words": "promotion",
    "discount": "promotion",
    "price+call_to_action": "promotion",
    "call_to_action": "promotion",
    "deadline": "promotion",
    "cross_sell": "promotion",
    "event_invitation": "promotion",
    "advertisement_label": "promotion",
    "fundraising": "fundraising",
    "ideological": "ideological",
    "outreach": "outreach",
    "list_unsubscribe_header": "bulk_mail",
    "list_id_header": "bulk_mail",
    "precedence_bulk": "bulk_mail",
    "campaign_headers": "bulk_mail",
    "esp_mailer": "bulk_mail",
    "feedback_id": "bulk_mail",
    "tracking_pixel": "bulk_mail",
    "click_tracking": "bulk_mail",
    "utm_links": "bulk_mail",
    "newsletter_layout": "bulk_mail",
    "web_version": "bulk_mail",
    "unsubscribe_wording": "bulk_mail",
    "subscription_footer": "bulk_mail",
    "role_sender": "bulk_mail",
    "transactional_words": "transactional",
    "account_words": "transactional",
    "reference_number": "transactional",
    "delivery_report": "transactional",
    "auto_reply": "transactional",
    "reply": "conversation",
    "quoted_text": "conversation",
    "internal": "conversation",
    "discussion_list": "discussion_list",
}

#: The groups that make mail commercial, and those that speak against it.
COMMERCIAL_GROUPS = ("promotion", "fundraising", "ideological", "outreach", "bulk_mail")
COUNTER_GROUPS = ("transactional", "conversation", "discussion_list")

#: Weight of each signal. For word signals it is the weight of each distinct entry found,
#: up to ``WORD_CAPS`` entries.
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "promotion_words": 1.0,
    "discount": 2.0,
    "price+call_to_action": 2.0,
    "call_to_action": 0.75,
    "deadline": 1.0,
    "cross_sell": 2.5,
    "event_invitation": 0.75,
    "advertisement_label": 4.0,
    "fundraising": 1.5,
    "ideological": 1.25,
    "outreach": 1.25,
    "list_unsubscribe_header": 2.0,
    "list_id_header": 0.5,
    "precedence_bulk": 1.5,
    "campaign_headers": 2.0,
    "esp_mailer": 2.0,
    "feedback_id": 0.5,
    "tracking_pixel": 1.0,
    "click_tracking": 1.0,
    "utm_links": 1.0,
    "newsletter_layout": 1.0,
    "web_version": 2.0,
    "unsubscribe_wording": 2.0,
    "subscription_footer": 1.5,
    "role_sender": 2.0,
    "transactional_words": -1.0,
    "account_words": -1.0,
    "reference_number": -1.5,
    "delivery_report": -8.0,
    "auto_reply": -6.0,
    "reply": -3.0,
    "quoted_text": -1.0,
    "internal": -2.5,
    "discussion_list": -4.0,
}

#: How many distinct entries of a word signal count.
WORD_CAPS: Mapping[str, int] = {
    "promotion_words": 4,
    "call_to_action": 3,
    "deadline": 2,
    "cross_sell": 2,
    "event_invitation": 3,
    "fundraising": 3,
    "ideological": 3,
    "outreach": 4,
    "transactional_words": 4,
    "account_words": 3,
}

#: Word list -> the signal it feeds (web_version, unsubscribe and subscription count once).
_LIST_SIGNAL = {
    "promotion": "promotion_words",
    "call_to_action": "call_to_action",
    "deadline": "deadline",
    "cross_sell": "cross_sell",
    "event": "event_invitation",
    "fundraising": "fundraising",
    "ideological": "ideological",
    "outreach": "outreach",
    "web_version": "web_version",
    "unsubscribe": "unsubscribe_wording",
    "subscription": "subscription_footer",
    "transactional": "transactional_words",
    "account": "account_words",
}

#: The whole of the counter-signals may lower the score by at most this much, so that a
#: receipt cannot carry unlimited advertising; a delivery report or auto-reply is exempt.
COUNTER_CAP = 6.0
#: With cross-selling in it ("you may also like"), a receipt's own wording lowers the score by
#: at most this much: the advertising in a receipt needs consent (commercial-mail.md).
COUNTER_CAP_WITH_CROSS_SELL = 3.0

#: Characters of text read per message; a campaign shows what it is in its first pages and
#: its footer, and the bound keeps the cost of a long message that of a short newsletter.
TEXT_BUDGET = 24_000

#: Characters of HTML source read per part: its beginning and its end, where the footer
#: (unsubscribe, "you receive this because") of a long newsletter is.
HTML_BUDGET = 60_000
#: Distinct links examined for click tracking.
LINK_BUDGET = 30

_MAX_NGRAM = 6


# ---- word lists ------------------------------------------------------------------------------

#: Every character that is not a letter or digit becomes a space: splitting the folded text
#: on white space then gives its words ("op=op" and "op = op" are both "op op"). One
#: ``str.translate`` and one ``split``, both in C: a regular expression costs ten times more.
_SEPARATORS = {code: " " for code in range(0x3000) if not chr(code).isalnum()}


def _tokens(folded: str) -> list[str]:
    return folded.translate(_SEPARATORS).split()


@dataclass(frozen=True)
class WordLists:
    """Entries per word list, language by language, ready for look-up.

    ``phrases`` maps a tuple of folded tokens to the (list, language) pairs it belongs to;
    ``prefixes`` and ``suffixes`` hold the single-word entries with a "*".
    """

    entries: Mapping[str, Mapping[str, frozenset[str]]]  # language -> list -> entries
    phrases: Mapping[tuple[str, ...], tuple[tuple[str, str], ...]] = field(init=False, repr=False, compare=False)
    prefixes: Mapping[int, Mapping[str, tuple[tuple[str, str], ...]]] = field(init=False, repr=False, compare=False)
    suffixes: Mapping[int, Mapping[str, tuple[tuple[str, str], ...]]] = field(init=False, repr=False, compare=False)
    #: First token of each phrase -> the longest phrase it starts (in tokens).
    starts: Mapping[str, int] = field(init=False, repr=False, compare=False)
    #: Every beginning of every entry (token tuples): a longer n-gram is built only after one.
    beginnings: frozenset[tuple[str, ...]] = field(init=False, repr=False, compare=False)
    #: Every token worth a look: the first tokens of entries and the reference words.
    start_set: frozenset[str] = field(init=False, repr=False, compare=False)
    #: The "*" entries: (stem, True for "stem*" / False for "*stem", its (list, language) pairs).
    stems: tuple[tuple[str, bool, tuple[tuple[str, str], ...]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        phrases: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        prefixes: dict[int, dict[str, list[tuple[str, str]]]] = {}
        suffixes: dict[int, dict[str, list[tuple[str, str]]]] = {}
        for language, lists in self.entries.items():
            for name, entries in lists.items():
                for entry in entries:
                    key = (name, language)
                    folded = fold(entry.strip())
                    if folded.endswith("*") and not folded.startswith("*"):
                        stem = folded.rstrip("*")
                        prefixes.setdefault(len(stem), {}).setdefault(stem, []).append(key)
                    elif folded.startswith("*") and not folded.endswith("*"):
                        stem = folded.lstrip("*")
                        suffixes.setdefault(len(stem), {}).setdefault(stem, []).append(key)
                    else:
                        tokens = tuple(_tokens(folded))
                        if tokens:
                            phrases.setdefault(tokens[:_MAX_NGRAM], []).append(key)
        object.__setattr__(self, "phrases", {k: tuple(v) for k, v in phrases.items()})
        starts: dict[str, int] = {}
        for phrase in phrases:
            starts[phrase[0]] = max(starts.get(phrase[0], 0), len(phrase))
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "beginnings", frozenset(p[:n] for p in phrases for n in range(1, len(p) + 1)))
        object.__setattr__(self, "start_set", frozenset(starts) | _REFERENCE_WORDS)
        stems = [(stem, True, tuple(keys)) for d in prefixes.values() for stem, keys in d.items()]
        stems += [(stem, False, tuple(keys)) for d in suffixes.values() for stem, keys in d.items()]
        object.__setattr__(self, "stems", tuple(stems))
        object.__setattr__(self, "prefixes", {n: {s: tuple(v) for s, v in d.items()} for n, d in prefixes.items()})
        object.__setattr__(self, "suffixes", {n: {s: tuple(v) for s, v in d.items()} for n, d in suffixes.items()})

    def merged(self, other: WordLists) -> WordLists:
        languages = set(self.entries) | set(other.entries)
        out: dict[str, dict[str, frozenset[str]]] = {}
        for language in languages:
            mine, theirs = self.entries.get(language, {}), other.entries.get(language, {})
            out[language] = {
                name: mine.get(name, frozenset()) | theirs.get(name, frozenset()) for name in set(mine) | set(theirs)
            }
        return WordLists(out)

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> WordLists:
        """Build from the structure of ``commercial_words.yaml``; ValueError names the fault."""
        if not isinstance(data, Mapping) or set(data) - {"languages"}:
            raise ValueError(f"{source}: expected a mapping with the single key 'languages'")
        languages = data.get("languages") or {}
        if not isinstance(languages, Mapping):
            raise ValueError(f"{source}: 'languages' must map a language code to its word lists")
        out: dict[str, dict[str, frozenset[str]]] = {}
        for language, lists in languages.items():
            if not isinstance(lists, Mapping):
                raise ValueError(f"{source}: languages.{language} must map list names to word lists")
            out[str(language)] = {}
            for name, entries in lists.items():
                where = f"{source}: languages.{language}.{name}"
                if name not in WORD_LISTS:
                    raise ValueError(f"{where}: unknown list; known: {', '.join(WORD_LISTS)}")
                if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip("* ") for e in entries):
                    raise ValueError(f"{where}: expected a list of non-empty words")
                for entry in entries:
                    stripped = entry.strip()
                    if "*" in stripped.strip("*") or ("*" in stripped and len(_tokens(fold(stripped))) != 1):
                        raise ValueError(f"{where}: {entry!r}: a '*' belongs at the start or end of one word")
                out[str(language)][str(name)] = frozenset(e.strip() for e in entries)
        return cls(out)


def _read_words_file(path: str | Path) -> WordLists:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the words file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"words file {path} is not valid YAML: {exc}") from None
    return WordLists.from_mapping(data, str(path))


def default_word_lists() -> WordLists:
    text = resources.files("policies").joinpath("commercial_words.yaml").read_text(encoding="utf-8")
    return WordLists.from_mapping(yaml.safe_load(text), "commercial_words.yaml")


def load_word_lists(
    words_file: str | None = None, extra_words: Mapping[str, Mapping[str, Sequence[str]]] | None = None
) -> WordLists:
    """The shipped lists, plus a words file, plus extra entries (language -> list -> entries)."""
    lists = default_word_lists()
    if words_file:
        lists = lists.merged(_read_words_file(words_file))
    if extra_words:
        extra = {"languages": {lang: {name: list(words) for name, words in by_list.items()}
                               for lang, by_list in extra_words.items()}}  # fmt: skip
        lists = lists.merged(WordLists.from_mapping(extra, "extra_words"))
    return lists


# ---- the result ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signal:
    """One reason, with its weight and what was found (words, counts, header names)."""

    name: str
    weight: float
    detail: str = ""

    @property
    def group(self) -> str:
        return SIGNAL_GROUPS.get(self.name, "other")

    def describe(self) -> str:
        return f"{self.name} ({self.detail})" if self.detail else self.name


@dataclass(frozen=True, slots=True)
class Detection:
    score: float
    verdict: Verdict
    signals: tuple[Signal, ...]

    @property
    def groups(self) -> dict[str, float]:
        """Score per signal group, rounded for reading."""
        out: dict[str, float] = {}
        for signal in self.signals:
            out[signal.group] = round(out.get(signal.group, 0.0) + signal.weight, 2)
        return out

    @property
    def decided_by(self) -> str:
        """The group that weighs most in the direction of the verdict ("none" without signals)."""
        groups = self.groups
        if self.verdict == "transactional":
            against = {g: v for g, v in groups.items() if g in COUNTER_GROUPS and v < 0}
            return min(against, key=lambda g: against[g]) if against else "weak_signals"
        toward = {g: v for g, v in groups.items() if g in COMMERCIAL_GROUPS and v > 0}
        return max(toward, key=lambda g: toward[g]) if toward else "none"

    def explain(self, limit: int = 4) -> str:
        """The strongest reasons toward the verdict, for a reply text."""
        toward = [s for s in self.signals if (s.weight > 0) == (self.verdict != "transactional")]
        toward.sort(key=lambda s: abs(s.weight), reverse=True)
        return ", ".join(s.describe() for s in toward[:limit])

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 2),
            "verdict": self.verdict,
            "decided_by": self.decided_by,
            "signals": [s.describe() for s in sorted(self.signals, key=lambda s: -abs(s.weight))],
            "groups": self.groups,
        }


@dataclass(frozen=True)
class DetectorTuning:
    """The numbers an admin may change (``classes.detector`` in the config)."""

    commercial_at: float = 4.0
    grey_from: float = 2.5
    weights: Mapping[str, float] = field(default_factory=dict)


# ---- structure: headers, links, images -------------------------------------------------------

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
#: "On Mon, Jan 1, 2024, Ann <a@b> wrote:" and its translations; the Outlook header block.
_QUOTE_INTRO = re.compile(
    r"^(?:on\b.{0,200}\bwrote|op\b.{0,200}\bschreef|am\b.{0,200}\bschrieb|le\b.{0,200}\ba écrit"
    r"|el\b.{0,200}\bescribió|il\b.{0,200}\bha scritto)\s*:\s*$"
    r"|^-{2,}\s*(?:original message|oorspronkelijk bericht|ursprüngliche nachricht|message d'origine"
    r"|mensaje original|messaggio originale)\s*-{2,}"
    r"|^(?:from|van|von|de|da)\s*:.{1,200}\n(?:sent|verzonden|gesendet|envoyé|enviado|inviato)\s*:",
    re.I | re.M,
)
#: Words one of which every _QUOTE_INTRO match contains: the expression runs only then.
_QUOTE_CUES = (
    "wrote", "schreef", "schrieb", "écrit", "escribió", "scritto", "original", "oorspronkelijk", "ursprüngliche",
    "origine", "sent:", "verzonden:", "gesendet:", "envoyé", "enviado:", "inviato:",
)  # fmt: skip
_QUOTED_LINE = re.compile(r"^[ \t]*>.*$", re.M)

_ROLE_STRONG = re.compile(
    r"^(?:news|newsletter|newsletters|nieuws|nieuwsbrief|marketing|promo|promos|promotions?|offers?|deals?|sales?"
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

_HTML_SKIP = re.compile(r"<(script|style|head|title|xml)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.I | re.S)
_HTML_QUOTE = re.compile(r"<blockquote\b.*?</blockquote\s*>", re.I | re.S)
_HTML_BREAK = re.compile(r"<(?:br|/?p|/?div|/?tr|/?h[1-6]|/?li|/?table)\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]*>")
_HREF = re.compile(r"""<a\b[^>]*?\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.I)
_TEXT_URL = re.compile(r"https?://[^\s<>\"']+", re.I)
_IMG = re.compile(r"<img\b[^>]{0,2000}>", re.I)
_TABLE = re.compile(r"<table\b", re.I)
_DIMENSION = re.compile(r"\b(width|height)\s*[=:]\s*[\"']?\s*(\d+)", re.I)
_UTM = re.compile(r"[?&;]utm_(?:source|medium|campaign|content|term)=", re.I)
_TRACKING_PATH = re.compile(
    r"/(?:ls/click|wf/click|click|clicks|track|tracking|trk|redirect|redir|r|c|l|t|e|ct|link|links|cl|mk/cl)/"
    r"|/(?:click|track|trk|redirect)\?|[?&](?:url|redirect|redirect_url|target|goto|u)=https?",
    re.I,
)
_TRACKING_HOST = re.compile(r"^(?:click|clicks|track|tracking|trk|links?|email|e|em|t|l|r|go|mailtrack|ct)\.", re.I)
#: Click-tracking hosts of the large ESPs (matched inside the host name).
_TRACKING_SERVICES = (
    "list-manage.com", "sendgrid.net", "mailchi.mp", "mjt.lu", "sendibt", "sendibm", "klclick", "hubspotlinks",
    "hs-sites", "exct.net", "ctrk.", "rs6.net", "createsend", "mlsend.com", "mailerlite.com", "cmail",
    "awstrack.me", "mailgun", "links.m.", "click.e.",
)  # fmt: skip
_OPAQUE = re.compile(r"[A-Za-z0-9_\-]{32,}")

# Money: a currency sign or code next to a number, either order (1.234,56 EUR; €12; $9.99).
_PRICE = re.compile(
    r"(?:[€$£¥]|\b(?:eur|euro|usd|gbp|chf|sek|nok|dkk|pln)\b)\s?\d|\d(?:[\d.,\s]*\d)?\s?(?:[€$£]|\b(?:eur|euro|euros|usd|gbp|chf|,-)\b)",
)
# A percentage off, in the five languages, or a "-20%" badge.
_DISCOUNT = re.compile(
    r"\d{1,2}\s?%\s?(?:off|korting|rabatt|discount|de (?:reduction|remise|descuento)|reduction|remise|descuento"
    r"|dto|sparen|voordeel|minder|ahorro|en moins|extra)\b|(?<![\w-])-\s?\d{1,2}\s?%"
    r"|\b(?:up to|tot|bis zu|jusqu'a|hasta)\s+(?:\d{1,2}\s?%|[€$£]\s?\d+)"
    r"|\b(?:korting|rabatt|sconto|descuento|remise|reduction|discount|dto)\s+(?:\w+\s+){0,2}(?:van|von|de|del|of|di)"
    r"\s+\d{1,2}\s?%"
    r"|\d+\s?% (?:op|auf|sur|en) (?:alles|alle|tout|toute?s?|tod[oa]s?)"
    r"|\b(?:was|antes|statt|voorheen|normaal|au lieu de|instead of)\s*:?\s*(?:[€$£]\s?\d|\d+(?:[.,]\d+)?\s?(?:€|eur))",
)
# A promo code: the word, then something that looks like a code (letters and digits, upper case).
_CODE_WORDS = re.compile(r"code|coupon|gutschein|cupon|codigo|voucher")
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


def _same_organisation(domain: str, other: str) -> bool:
    """One domain is the other or a subdomain of it (mail.example.com and example.com)."""
    return (
        bool(domain)
        and bool(other)
        and (domain == other or domain.endswith("." + other) or other.endswith("." + domain))
    )


# ---- the detector ----------------------------------------------------------------------------


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
        body = _Body.read(message)
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
                a.domain for a in message.visible_recipients if a.normalized != own
            ]
            if domains and all(_same_organisation(sender.domain, d) for d in domains):
                self._add(signals, "internal", sender.domain)

    # ---- links, images, layout ----

    def _structure_signals(self, body: _Body, signals: list[Signal]) -> None:
        if body.pixels:
            self._add(signals, "tracking_pixel", f"{body.pixels} image(s)")
        targets = body.link_targets
        if targets:
            utm = sum(1 for t in targets if _UTM.search(t))
            if utm:
                self._add(signals, "utm_links", f"{utm} link(s)")
            sample = targets[:LINK_BUDGET]  # enough to see how a campaign builds its links
            tracked = sum(1 for t in sample if _tracked(t))
            if tracked >= 3 or (tracked >= 2 and tracked * 2 >= len(sample)):
                self._add(signals, "click_tracking", f"{tracked} of {len(sample)} links")
        if (body.images >= 4 and len(targets) >= 8 and body.tables >= 2) or len(targets) >= 25:
            self._add(signals, "newsletter_layout", f"{len(targets)} links, {body.images} images")
        if body.quoted:
            self._add(signals, "quoted_text")

    # ---- words ----

    def _word_signals(self, subject: str, body: _Body, signals: list[Signal]) -> None:
        text = fold(subject) + "\n" + body.folded
        found, reference = self._find(text)
        for list_name, signal in _LIST_SIGNAL.items():
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
        elif found.get("promotion") and _CODE_WORDS.search(text) and _CODE.search(body.text_sample):
            self._add(signals, "discount", "promo code")
        if reference:
            self._add(signals, "reference_number", reference)

    def _find(self, folded: str) -> tuple[dict[str, set[tuple[str, str]]], str]:
        """(entry, language) pairs found per word list, and the first reference number
        ("bestelnummer 2024-88113"). Python looks only at tokens that start an entry or name a
        reference; entries with a "*" are found with ``str.find``."""
        tokens = _tokens(folded)
        phrases, beginnings = self.words.phrases, self.words.beginnings
        found: dict[str, set[tuple[str, str]]] = {}
        reference = ""
        count = len(tokens)
        wanted = self.words.start_set
        seen: set[tuple[str, ...]] = set()  # n-grams already recorded ("shop now" x 80)
        for index in [i for i, token in enumerate(tokens) if token in wanted]:
            word = tokens[index]
            if not reference and word in _REFERENCE_WORDS:
                reference = _reference_after(tokens, index)
            key: tuple[str, ...] = (word,)
            size = 1
            while True:
                if key not in seen:
                    seen.add(key)
                    for name, language in phrases.get(key, ()):
                        found.setdefault(name, set()).add((" ".join(key), language))
                if index + size >= count:
                    break
                key = (*key, tokens[index + size])
                size += 1
                if key not in beginnings:
                    break
        for stem, is_prefix, keys in self.words.stems:
            start = folded.find(stem)
            while start != -1:
                end = start + len(stem)
                if is_prefix:
                    word_end = _word_end(folded, end)
                    if (start == 0 or not folded[start - 1].isalnum()) and word_end > end:
                        for name, language in keys:
                            found.setdefault(name, set()).add((stem + "*", language))
                else:
                    word_start = _word_start(folded, start)
                    if (end == len(folded) or not folded[end].isalnum()) and word_start < start:
                        for name, language in keys:
                            found.setdefault(name, set()).add(("*" + stem, language))
                start = folded.find(stem, end)
        return found, reference


#: Words a reference number follows ("order 100-4471", "Bestellnummer: 20458", "n° de commande").
_REFERENCE_WORDS = frozenset(
    """order orderid ordernummer bestel bestelling bestelnummer factuur factuurnummer invoice rechnung
    rechnungsnummer bestellnummer auftragsnummer facture commande factura pedido booking boeking boekingsnummer
    buchung buchungsnummer reservation reservering reserveringsnummer reservierung reserva localizador ticket
    ticketnummer tracking zending sendungsnummer colis envio case dossier referentie reference referenz referencia
    klantnummer kundennummer customer""".split()  # noqa: SIM905 - a word list reads better as text
)
_REFERENCE_FILLERS = frozenset("number nummer nr no num numero n id code ref reference de del of van #".split())  # noqa: SIM905


def _word_end(text: str, index: int) -> int:
    while index < len(text) and text[index].isalnum():
        index += 1
    return index


def _word_start(text: str, index: int) -> int:
    while index > 0 and text[index - 1].isalnum():
        index -= 1
    return index


def _reference_after(tokens: list[str], index: int) -> str:
    """The reference number within three tokens after ``tokens[index]``, or ""."""
    for offset in range(1, 4):
        if index + offset >= len(tokens):
            return ""
        token = tokens[index + offset]
        if len(token) >= 4 and any(c.isdigit() for c in token):
            return f"{tokens[index]} {token}"[:40]
        if token not in _REFERENCE_FILLERS:
            return ""
    return ""


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


def _tracked(target: str) -> bool:
    if not target[:8].lower().startswith(("http://", "https://")):
        return False
    try:
        parts = urllib.parse.urlsplit(target)
        host = (parts.hostname or "").lower()
    except ValueError:
        return False
    if any(service in host for service in _TRACKING_SERVICES) or _TRACKING_HOST.match(host):
        return True
    return bool(_TRACKING_PATH.search(parts.path + ("?" + parts.query if parts.query else ""))) or bool(
        _OPAQUE.search(parts.path)
    )


@dataclass
class _Body:
    """What the detector needs of the body, read once from the shared parse."""

    folded: str
    text_sample: str
    link_targets: list[str]
    images: int
    pixels: int
    tables: int
    quoted: bool

    @classmethod
    def read(cls, message: ParsedMessage) -> _Body:
        """Text and structure of the readable parts. HTML is reduced to text with a few linear
        regular expressions rather than the full renderer of ``ParsedMessage.readable_texts``
        (ten times the cost on a newsletter): a detector may read hidden text too, since
        hidden preheaders and filler are part of what a campaign is."""
        pieces: list[str] = []
        budget = TEXT_BUDGET
        targets: list[str] = []
        quoted = False
        images = pixels = tables = 0
        for part in message.text_parts:
            if budget <= 0:
                break
            if part.content_type == "text/html":
                source = part.text
                if len(source) > HTML_BUDGET:
                    source = source[: HTML_BUDGET * 3 // 4] + "\n" + source[-HTML_BUDGET // 4 :]
                tables += len(_TABLE.findall(source))
                for number, tag in enumerate(_IMG.findall(source)):
                    images += 1
                    if number < 2 * LINK_BUDGET and _pixel(tag):  # beacons sit at the start or the end
                        pixels += 1
                for number, match in enumerate(_HREF.finditer(source)):
                    if number >= 2 * LINK_BUDGET:
                        break
                    href = match.group(1) or match.group(2) or match.group(3) or ""
                    targets.append(html.unescape(href) if "&" in href else href)
                source = _HTML_SKIP.sub(" ", source)
                if "<blockquote" in source.lower():
                    source, removed = _HTML_QUOTE.subn("\n", source)
                    quoted = quoted or removed > 0
                text = _HTML_TAG.sub(" ", _HTML_BREAK.sub("\n", source)).replace("&nbsp;", " ")
                if "&" in text:  # html.unescape calls back into Python for every entity
                    text = html.unescape(text)
            else:
                text = (
                    part.text
                    if len(part.text) <= TEXT_BUDGET
                    else part.text[: TEXT_BUDGET * 3 // 4] + "\n" + part.text[-TEXT_BUDGET // 4 :]
                )
                targets.extend(m.group().rstrip(".,;:!?)'") for m in _TEXT_URL.finditer(text))
                if ">" in text:
                    lines = len(_QUOTED_LINE.findall(text))
                    if lines:
                        text = _QUOTED_LINE.sub("", text)
                        quoted = quoted or lines >= 2
            lowered = text.lower()
            intro = _QUOTE_INTRO.search(text) if any(cue in lowered for cue in _QUOTE_CUES) else None
            if intro is not None:
                quoted = True
                text = text[: intro.start()]
            text = text[:budget]
            budget -= len(text)
            pieces.append(text)
        joined = "\n".join(pieces)
        return cls(fold(joined), joined[:TEXT_BUDGET], list(dict.fromkeys(targets)), images, pixels, tables, quoted)


def _pixel(tag: str) -> bool:
    """An image of at most 1x1 pixels, or hidden: the open-tracking beacon."""
    sizes = {name.lower(): int(value) for name, value in _DIMENSION.findall(tag) if len(value) < 6}
    if sizes and all(v <= 1 for v in sizes.values()) and len(sizes) == 2:
        return True
    lowered = tag.lower()
    return "display:none" in lowered.replace(" ", "") and "src=" in lowered
