"""What the commercial-mail detector reads of a message's body, once: the visible text (HTML
reduced with a few linear regular expressions, quoted replies left out), the links, images,
tracking pixels and tables, within bounds that keep a long message as cheap as a short one.

The full renderer of ``ParsedMessage.readable_texts`` (visibility, anchors) costs ten times
more on a newsletter; the detector does without it, and may read hidden text too, since a
campaign's hidden preheader is part of what it is.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from dataclasses import dataclass

from policies.message import ParsedMessage

__all__ = ("HTML_BUDGET", "LINK_BUDGET", "TEXT_BUDGET", "UTM", "Body", "tracked")

#: Characters of text read per message; a campaign shows what it is in its first pages and
#: its footer, and the bound keeps the cost of a long message that of a short newsletter.
TEXT_BUDGET = 16_000

#: Characters of HTML source read per part: its beginning and its end, where the footer
#: (unsubscribe, "you receive this because") of a long newsletter is.
HTML_BUDGET = 60_000
#: Distinct links examined for click tracking.
LINK_BUDGET = 30

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

_HTML_SKIP = re.compile(r"<(script|style|head|title|xml)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.I | re.S)
_HTML_QUOTE = re.compile(r"<blockquote\b.*?</blockquote\s*>", re.I | re.S)
_HTML_BREAK = re.compile(r"<(?:br|/?p|/?div|/?tr|/?h[1-6]|/?li|/?table)\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]*>")
_HREF = re.compile(r"""<a\b[^>]*?\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.I)
_TEXT_URL = re.compile(r"https?://[^\s<>\"']+", re.I)
_IMG = re.compile(r"<img\b[^>]{0,2000}>", re.I)
_TABLE = re.compile(r"<table\b", re.I)
_DIMENSION = re.compile(r"\b(width|height)\s*[=:]\s*[\"']?\s*(\d+)", re.I)
UTM = re.compile(r"[?&;]utm_(?:source|medium|campaign|content|term)=", re.I)
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


def tracked(target: str) -> bool:
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
class Body:
    """What the detector needs of the body, read once from the shared parse."""

    #: The text in lower case (accents kept: the word look-up folds them itself).
    lowered: str
    #: The text as written (case kept), for the patterns that need it (a promo code).
    text: str
    link_targets: list[str]
    images: int
    pixels: int
    tables: int
    quoted: bool

    @classmethod
    def read(cls, message: ParsedMessage) -> Body:
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
        return cls(joined.lower(), joined, list(dict.fromkeys(targets)), images, pixels, tables, quoted)


def _pixel(tag: str) -> bool:
    """An image of at most 1x1 pixels, or hidden: the open-tracking beacon."""
    sizes = {name.lower(): int(value) for name, value in _DIMENSION.findall(tag) if len(value) < 6}
    if sizes and all(v <= 1 for v in sizes.values()) and len(sizes) == 2:
        return True
    lowered = tag.lower()
    return "display:none" in lowered.replace(" ", "") and "src=" in lowered
