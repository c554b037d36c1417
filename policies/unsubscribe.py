"""unsubscribe: every commercial message carries a working way out.

The Dutch Telecommunicatiewet (art. 11.7) wants a free, easy way to object in every
commercial message; Gmail and Yahoo demand RFC 8058 one-click unsubscribe from bulk senders
and a visible link in the body. Three things are checked, and the options say which are
required:

* ``body``: a visible unsubscribe link in the text a reader sees (text/plain or text/html,
  not in attached messages, not in HTML a client does not show: hidden by CSS, or the
  text/plain alternative of a displayed HTML part; see policies/readable.py): an anchor, a
  URL or mailto written in text, or an e-mail address explicitly given for unsubscribing,
  that what the reader sees marks as an opt-out: the link text, the sentence around it
  (split verbs too: "meld je hier af"), or the URL when it is written out. An unsubscribe
  URL behind other words ("Shop now") does not count: the reader cannot tell it is the way
  out. The words come from ``unsubscribe_words.yaml`` (English, Dutch, German, French,
  Spanish), extendable.
* ``header``: ``List-Unsubscribe`` (RFC 2369) with at least one ``https:`` or ``mailto:``
  URI in angle brackets. An ``http:`` URI is a URI but does not count: the unsubscribe
  token would travel in clear text, and RFC 8058 and the Gmail/Yahoo rules ask for https.
* ``one_click``: RFC 8058 section 3.1: an ``https:`` URI in ``List-Unsubscribe`` and a
  single ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. (RFC 8058 also wants a DKIM
  signature covering both fields; sendguard signs after the policies, so that is the
  signer's part.)

Why one module of about 700 lines: the body check is half of it (the vocabulary, and finding
and judging opt-out links in what a reader sees), written for this policy: its findings are
the policy's evidence and reply (the commercial detector borrows only ``fold``). The text it
reads is rendered in policies/readable.py; the headers are added by policies/list_unsubscribe.py.
"""

from __future__ import annotations

import asyncio
import bisect
import fnmatch
import functools
import re
import unicodedata
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from policies.base import Action, Policy, PolicyError, Transaction, Verdict
from policies.list_unsubscribe import footer_edit, message_topic
from policies.message import Link, ParsedMessage
from policies.wordfiles import load_yaml, read_yaml_file
from proxy.schema import doc
from proxy.stores.consent import normalize_topic

__all__ = (
    "ONE_CLICK_VALUE",
    "LinkFinding",
    "ListUnsubscribe",
    "UnsubscribePolicy",
    "Vocabulary",
    "find_unsubscribe_links",
    "fold",
    "inspect_list_unsubscribe",
    "load_vocabulary",
)

#: RFC 8058 section 3.1: the one key/value pair List-Unsubscribe-Post must hold.
ONE_CLICK_VALUE = "List-Unsubscribe=One-Click"

# ---- folding: case and accents ignored, positions kept ---------------------------------------


def _fold_table() -> dict[int, str]:
    """Code point -> one lower-case character without accents, for the scripts below U+3000.

    Each character maps to exactly one character, so a position in folded text is the same
    position in the original (the link positions of ``ReadableText`` stay valid).
    """
    table: dict[int, str] = {}
    for code in range(0x3000):
        char = chr(code)
        base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)).lower()
        if base == char:
            continue
        if len(base) == 1:
            table[code] = base
        elif len(char.lower()) == 1 and char.lower() != char:
            table[code] = char.lower()
    for quote in "\u2018\u2019\u02bc\u0060\u00b4":  # typographic apostrophes: "don’t" = "don't"
        table[ord(quote)] = "'"
    return table


_FOLD = _fold_table()


def fold(text: str) -> str:
    """Lower case, accents removed, same length as ``text``."""
    return text.translate(_FOLD)


# ---- vocabulary ------------------------------------------------------------------------------

_WORD_CATEGORIES = ("keywords", "ambiguous", "weak", "mail_context", "login_context", "here")
#: The categories whose entries may be split phrases ("meld* … af").
_SPLIT_CATEGORIES = ("keywords", "ambiguous", "weak")
#: Words a split phrase may have between its parts (the link's own "hier" among them).
SPLIT_GAP = 8
_SPLIT = re.compile(r"\s*(?:…|\.\.\.)\s*")
_TOKEN_CATEGORIES = ("strong", "ambiguous", "weak", "weak_mailto", "login")
#: RFC 2369's own field name mentions "unsubscribe"; quoting a header is not a way out.
_FIELD_NAMES = re.compile(r"list-unsubscribe(?:-post)?", re.I)


def _word_pattern(entry: str) -> str:
    entry = fold(entry.strip())
    prefix = not entry.startswith("*")
    suffix = not entry.endswith("*")
    words = entry.strip("*").split()
    body = r"[\s\-_]+".join(re.escape(word) for word in words)
    return (r"(?<!\w)" if prefix else "") + body + (r"(?!\w)" if suffix else "")


def _factored(alternatives: list[str]) -> str:
    """The alternatives as one pattern, the word-start look-behind they share tested once per
    position instead of once per alternative: the same matches, a fraction of the work on a
    long text (the engine tries alternatives one by one at every position)."""
    lead = r"(?<!\w)"
    anchored = [a[len(lead) :] for a in alternatives if a.startswith(lead)]
    free = [a for a in alternatives if not a.startswith(lead)]
    parts = ([f"{lead}(?:{'|'.join(anchored)})"] if anchored else []) + free
    return "|".join(parts)


def _split_pattern(entry: str) -> str:
    """A phrase whose parts may stand apart: "meld* … af" finds "meld je hier af", and, for
    two parts, the other order too ("af te melden"), at most SPLIT_GAP words between them.
    A "*" lets a part be inflected or compounded ("meld*" is meld, meldt, melden)."""
    parts = [p for p in _SPLIT.split(fold(entry.strip())) if p.strip("* ")]
    regexes = []
    for part in parts:
        words = part.strip("*").split()
        body = r"[\s\-_]+".join(re.escape(word) for word in words)
        regexes.append(
            (r"\w*" if part.startswith("*") else r"(?<!\w)") + body + (r"\w*" if part.endswith("*") else r"(?!\w)")
        )
    gap = rf"(?:\W+\w+){{0,{SPLIT_GAP}}}?\W+"
    orders = [regexes, regexes[::-1]] if len(regexes) == 2 else [regexes]
    return "|".join("(?:" + gap.join(order) + ")" for order in orders)


def _is_split(entry: str) -> bool:
    return bool(_SPLIT.search(entry))


@dataclass(frozen=True)
class Vocabulary:
    """The word lists, merged over all languages (an English footer in a Dutch mail counts)."""

    words: Mapping[str, frozenset[str]]
    url_tokens: Mapping[str, frozenset[str]]
    patterns: Mapping[str, re.Pattern[str] | None] = field(init=False, repr=False, compare=False)
    #: Split phrases ("meld* … af") per category, read only around a link whose whole text
    #: is a "here" word: elsewhere the gap would let them find words of unrelated sentences.
    split_patterns: Mapping[str, re.Pattern[str] | None] = field(init=False, repr=False, compare=False)
    #: The whole of a link text that only points: "hier", "here", "ici", "aquí", "click here".
    here: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        patterns: dict[str, re.Pattern[str] | None] = {}
        split_patterns: dict[str, re.Pattern[str] | None] = {}
        for category in _WORD_CATEGORIES:
            entries = sorted(self.words.get(category, frozenset()), key=len, reverse=True)
            alternatives = [_word_pattern(e) for e in entries if e.strip("* ") and not _is_split(e)]
            patterns[category] = re.compile(_factored(alternatives)) if alternatives else None
            split = [_split_pattern(e) for e in entries if _is_split(e)]
            split_patterns[category] = re.compile("|".join(split)) if split else None
        here = [_word_pattern(e) for e in self.words.get("here", frozenset()) if e.strip("* ")]
        object.__setattr__(self, "patterns", patterns)
        object.__setattr__(self, "split_patterns", split_patterns)
        object.__setattr__(self, "here", re.compile(r"\W*(?:" + "|".join(here) + r")\W*") if here else None)

    def merged(self, other: Vocabulary) -> Vocabulary:
        return Vocabulary(
            {c: self.words.get(c, frozenset()) | other.words.get(c, frozenset()) for c in _WORD_CATEGORIES},
            {c: self.url_tokens.get(c, frozenset()) | other.url_tokens.get(c, frozenset()) for c in _TOKEN_CATEGORIES},
        )

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> Vocabulary:
        """Build from the structure of ``unsubscribe_words.yaml``; ValueError names the fault."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping with 'languages' and/or 'url_tokens'")
        unknown = set(data) - {"languages", "url_tokens"}
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        words: dict[str, set[str]] = {c: set() for c in _WORD_CATEGORIES}
        languages = data.get("languages") or {}
        if not isinstance(languages, Mapping):
            raise ValueError(f"{source}: 'languages' must map a language code to its lists")
        for language, lists in languages.items():
            if not isinstance(lists, Mapping):
                raise ValueError(f"{source}: languages.{language} must map list names to word lists")
            for category, entries in lists.items():
                if category not in _WORD_CATEGORIES:
                    raise ValueError(
                        f"{source}: languages.{language}.{category}: unknown list; known: {', '.join(_WORD_CATEGORIES)}"
                    )
                words[category].update(_strings(entries, f"{source}: languages.{language}.{category}"))
        tokens: dict[str, set[str]] = {c: set() for c in _TOKEN_CATEGORIES}
        url_tokens = data.get("url_tokens") or {}
        if not isinstance(url_tokens, Mapping):
            raise ValueError(f"{source}: 'url_tokens' must map token kinds to lists")
        for category, entries in url_tokens.items():
            if category not in _TOKEN_CATEGORIES:
                raise ValueError(
                    f"{source}: url_tokens.{category}: unknown list; known: {', '.join(_TOKEN_CATEGORIES)}"
                )
            tokens[category].update(fold(t) for t in _strings(entries, f"{source}: url_tokens.{category}"))
        return cls(
            {c: frozenset(v) for c, v in words.items()},
            {c: frozenset(v) for c, v in tokens.items()},
        )


def _strings(entries: Any, where: str) -> list[str]:
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip("* ") for e in entries):
        raise ValueError(f"{where}: expected a list of non-empty words")
    return [e.strip() for e in entries]


def read_words_file(path: str | Path) -> Vocabulary:
    """A vocabulary from a YAML file in the format of ``unsubscribe_words.yaml``."""
    return Vocabulary.from_mapping(read_yaml_file(path), str(path))


@functools.cache  # immutable: every config build shares the shipped lists, parsed once
def default_vocabulary() -> Vocabulary:
    text = resources.files("policies").joinpath("unsubscribe_words.yaml").read_text(encoding="utf-8")
    return Vocabulary.from_mapping(load_yaml(text), "unsubscribe_words.yaml")


def load_vocabulary(
    words_file: str | None = None, extra_words: Mapping[str, Sequence[str]] | None = None
) -> Vocabulary:
    """The shipped words, plus a words file, plus extra keywords per language."""
    vocabulary = default_vocabulary()
    if words_file:
        vocabulary = vocabulary.merged(read_words_file(words_file))
    if extra_words:
        extra = {"languages": {lang: {"keywords": list(words)} for lang, words in extra_words.items()}}
        vocabulary = vocabulary.merged(Vocabulary.from_mapping(extra, "extra_words"))
    return vocabulary


# ---- the body: a visible unsubscribe link ----------------------------------------------------

#: The end of a sentence, or a paragraph break: a blank line (quoted: a line of only ">";
#: HTML blocks render as one). CJK full stops need no space after them.
_SENTENCE_END = re.compile(r"[.!?]+(?=[\s\"')\]]|$)|[\u3002\uff01\uff1f]|\n[ \t\r>]*\n")
SENTENCE_BEFORE = 300  # characters of a sentence looked at before a link
SENTENCE_AFTER = 150  # and after it, on the same line ("Click here to unsubscribe")
CONTEXT_WINDOW = 200  # how far mail or login words may be from an ambiguous link


@dataclass(frozen=True, slots=True)
class LinkFinding:
    """An unsubscribe link found in the body, and why it counts."""

    target: str
    kind: str  # anchor, url or address
    content_type: str
    strength: int  # 5 the link itself says so, 4 ambiguous word in mail context, 3 its sentence, 2 weak words
    reason: str


class _Occurrences:
    """Where each word category occurs in one folded text, for range questions."""

    def __init__(self, folded: str, vocabulary: Vocabulary) -> None:
        self.spans: dict[str, tuple[list[int], list[int]]] = {}
        for category, pattern in vocabulary.patterns.items():
            starts: list[int] = []
            ends: list[int] = []
            if pattern is not None and category != "here":  # "here" is only ever a whole link text
                for match in pattern.finditer(folded):
                    starts.append(match.start())
                    ends.append(match.end())
            self.spans[category] = (starts, ends)

    def within(self, category: str, start: int, end: int) -> bool:
        """A match of the category lies entirely inside [start, end)."""
        starts, ends = self.spans[category]
        index = bisect.bisect_left(starts, start)
        # Matches do not overlap, so the first one starting inside is the one that may fit.
        return index < len(starts) and ends[index] <= end

    def distance(self, category: str, start: int, end: int, limit: int) -> int | None:
        """Characters between [start, end) and the nearest match, or None beyond ``limit``."""
        starts, ends = self.spans[category]
        best: int | None = None
        index = bisect.bisect_left(starts, start)
        if index < len(starts):
            best = max(0, starts[index] - end)
        if index > 0:
            before = max(0, start - ends[index - 1])
            best = before if best is None else min(best, before)
        return best if best is not None and best <= limit else None


def _matches(vocabulary: Vocabulary, category: str, folded: str) -> bool:
    pattern = vocabulary.patterns[category]
    return pattern is not None and pattern.search(folded) is not None


def _url_tokens(vocabulary: Vocabulary, category: str, folded_url: str) -> bool:
    return any(token in folded_url for token in vocabulary.url_tokens.get(category, ()))


@dataclass(frozen=True, slots=True)
class _Text:
    """One readable text, folded, with its word occurrences and sentence boundaries."""

    folded: str
    occurrences: _Occurrences
    boundary_starts: list[int]
    boundary_ends: list[int]

    def sentence(self, start: int, end: int, previous_end: int, next_start: int) -> tuple[int, int]:
        """The sentence around a link at [start, end): back to the last sentence end (at most
        SENTENCE_BEFORE characters), forward to the next one but not past the end of the line
        (at most SENTENCE_AFTER characters); never reaching into the neighbouring links.

        A link that stands alone in its sentence (a "click here" or a button below a line of
        text) is read with the sentence before it, as a reader reads it."""
        floor = max(0, start - SENTENCE_BEFORE, previous_end)
        left = floor
        index = bisect.bisect_right(self.boundary_ends, start) - 1
        if index >= 0:
            left = max(left, self.boundary_ends[index])
        right = min(len(self.folded), end + SENTENCE_AFTER, next_start)
        after = bisect.bisect_left(self.boundary_starts, end)
        if after < len(self.boundary_starts):
            right = min(right, self.boundary_starts[after])
        line_end = self.folded.find("\n", end, right)
        right = right if line_end == -1 else line_end
        if (
            index >= 0
            and left > floor
            and not self.folded[left:start].strip()
            and not self.folded[end:right].strip(" .!?:|>\t\r\n")
        ):
            left = max(floor, self.boundary_ends[index - 1] if index > 0 else 0)
        return left, right


def _actionable(url: str) -> bool:
    """An http(s) URL with a host, or a mailto: with an address: something a reader can use."""
    if url.startswith("mailto:"):
        return _mailto_ok(url)
    if not url.startswith(("http://", "https://")):
        return False
    try:
        return bool(urllib.parse.urlsplit(url).hostname)
    except ValueError:
        return False


def _judge(link: Link, text: _Text, sentence: tuple[int, int], vocabulary: Vocabulary) -> tuple[int, str] | None:
    """How strongly a link is an unsubscribe link (see LinkFinding.strength), or None."""
    target = link.target
    lowered = target.lower()
    if link.kind == "address":
        lowered = "mailto:" + lowered
    elif link.kind == "url" and lowered.startswith("www."):
        lowered = "http://" + lowered
    if not _actionable(lowered):
        return None
    is_mailto = lowered.startswith("mailto:")
    try:
        url = fold(urllib.parse.unquote(lowered))
    except Exception:
        url = fold(lowered)
    url = _FIELD_NAMES.sub(" ", url)
    label = _FIELD_NAMES.sub(" ", fold(link.label))
    left, right = sentence
    occurrences = text.occurrences
    # What the reader sees of the target: a URL or address written in the text is seen
    # whole; of an anchor only its text is, so an unsubscribe URL behind "Shop now" proves
    # nothing to the reader, who must be able to tell that the link is the way out.
    seen_url = url if link.kind in ("url", "address") else label
    split = _split_words(vocabulary, text, link, label, sentence)

    if _url_tokens(vocabulary, "strong", seen_url):
        return 5, "its URL, which the reader sees, is an unsubscribe URL"
    if _matches(vocabulary, "keywords", label):
        return 5, "its text says unsubscribe"
    if occurrences.within("keywords", left, right) or "keywords" in split:
        return 3, "its sentence says unsubscribe"

    ambiguous = (
        _matches(vocabulary, "ambiguous", label)
        or _url_tokens(vocabulary, "ambiguous", seen_url)
        or occurrences.within("ambiguous", left, right)
        or "ambiguous" in split
    )
    if ambiguous and not _url_tokens(vocabulary, "login", url):
        # "afmelden"/"abmelden" also mean "log out": the nearer context decides.
        mail = occurrences.distance("mail_context", link.start, link.end, CONTEXT_WINDOW)
        login = occurrences.distance("login_context", link.start, link.end, CONTEXT_WINDOW)
        if _matches(vocabulary, "login_context", label):
            login = 0
        if _matches(vocabulary, "mail_context", label):
            mail = 0
        if login is None or (mail is not None and mail <= login):
            return 4, "an opt-out word that can also mean log out, in a mail context"

    weak = _matches(vocabulary, "weak", label) or occurrences.within("weak", left, right) or "weak" in split
    if weak:
        unsubscribe_like = (
            _url_tokens(vocabulary, "strong", url)
            or _url_tokens(vocabulary, "weak", url)
            or _url_tokens(vocabulary, "ambiguous", url)
            or (is_mailto and _url_tokens(vocabulary, "weak_mailto", url))
        )
        if unsubscribe_like:
            return 2, "opt-out wording with a removal URL"
    return None


def _split_words(
    vocabulary: Vocabulary, text: _Text, link: Link, label: str, sentence: tuple[int, int]
) -> frozenset[str]:
    """The categories whose split phrases ("meld je hier af", "af te melden") the sentence
    holds, for a link whose whole text is a "here" word; empty for any other link."""
    if not label or vocabulary.here is None or not vocabulary.here.fullmatch(label):
        return frozenset()
    left, right = sentence
    around = text.folded[left:right]
    return frozenset(
        category
        for category in _SPLIT_CATEGORIES
        if (pattern := vocabulary.split_patterns.get(category)) is not None and pattern.search(around)
    )


def find_unsubscribe_links(
    message: ParsedMessage, vocabulary: Vocabulary, *, first_only: bool = False
) -> list[LinkFinding]:
    """Unsubscribe links in what a reader sees, strongest first (document order among equals).
    Blocking (CPU): run it in a thread. With ``first_only`` the search stops at the first
    link that says so itself."""
    findings: list[LinkFinding] = []
    for readable in message.readable_texts:
        links = readable.links
        if not links or not readable.displayed:
            continue  # an alternative the client does not show is no way out for the reader
        if not readable.complete:
            continue  # HTML read only in part: hiding may have gone unseen, so nothing in it counts
        folded = _FIELD_NAMES.sub(lambda m: " " * len(m.group()), fold(readable.text))
        # A colon carries its sentence over a blank line ("Unsubscribe:", blank, the URL).
        boundaries = [
            m
            for m in _SENTENCE_END.finditer(folded)
            if m.group()[0] != "\n" or not folded[max(0, m.start() - 16) : m.start()].rstrip().endswith(":")
        ]
        text = _Text(
            folded, _Occurrences(folded, vocabulary), [m.start() for m in boundaries], [m.end() for m in boundaries]
        )
        for index, link in enumerate(links):
            previous_end = links[index - 1].end if index else 0
            next_start = links[index + 1].start if index + 1 < len(links) else len(folded)
            sentence = text.sentence(link.start, link.end, min(previous_end, link.start), max(next_start, link.end))
            judged = _judge(link, text, sentence, vocabulary)
            if judged is None:
                continue
            strength, reason = judged
            findings.append(LinkFinding(link.target, link.kind, readable.content_type, strength, reason))
            if first_only and strength == 5:
                return findings
    findings.sort(key=lambda f: -f.strength)
    return findings


# ---- the header: List-Unsubscribe and RFC 8058 -----------------------------------------------

_BRACKETED = re.compile(r"<([^<>]*)>")


@dataclass(frozen=True)
class ListUnsubscribe:
    """What the List-Unsubscribe and List-Unsubscribe-Post fields offer."""

    present: bool  # a non-empty List-Unsubscribe field
    uris: tuple[str, ...]  # every URI in angle brackets, in order (RFC 2369 section 2)
    https: tuple[str, ...]
    mailto: tuple[str, ...]
    http: tuple[str, ...]  # http: URIs: seen, but not accepted
    unbracketed: bool  # URI-like text outside angle brackets
    post_values: tuple[str, ...]  # each List-Unsubscribe-Post field, unfolded

    @property
    def valid(self) -> bool:
        """At least one https: or mailto: URI in angle brackets."""
        return bool(self.https or self.mailto)

    @property
    def one_click_problems(self) -> list[str]:
        problems: list[str] = []
        if not self.https:
            problems.append("no_https_uri")
        if not self.post_values:
            problems.append("no_post_header")
        elif len(self.post_values) > 1:
            problems.append("post_header_repeated")
        elif self.post_values[0] != ONE_CLICK_VALUE:
            problems.append("post_value")
        return problems

    @property
    def one_click(self) -> bool:
        return not self.one_click_problems


def _https_ok(uri: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(uri)
        return parts.scheme.lower() == "https" and bool(parts.hostname)
    except ValueError:
        return False


def _mailto_ok(uri: str) -> bool:
    if not uri.lower().startswith("mailto:"):
        return False
    address = urllib.parse.unquote(uri[len("mailto:") :].split("?", 1)[0])
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain and "." in domain)


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n", "", value)  # RFC 5322 2.2.3: unfolding removes the line breaks only


def inspect_list_unsubscribe(message: ParsedMessage) -> ListUnsubscribe:
    raw_values = [_unfold(v) for v in message.raw_header_values("List-Unsubscribe")]
    uris: list[str] = []
    unbracketed = False
    for value in raw_values:
        found = _BRACKETED.findall(value)
        # RFC 2369 section 2: white space inside the brackets is to be ignored.
        uris.extend(u for u in ("".join(f.split()) for f in found) if u)
        outside = _BRACKETED.sub(" ", value).lower()
        unbracketed = unbracketed or "http" in outside or "mailto:" in outside
    https = tuple(u for u in uris if _https_ok(u))
    mailto = tuple(u for u in uris if _mailto_ok(u))
    http = tuple(u for u in uris if u.lower().startswith("http:"))
    posts = tuple(" ".join(_unfold(v).split()) for v in message.raw_header_values("List-Unsubscribe-Post"))
    return ListUnsubscribe(
        present=any(v.strip() for v in raw_values),
        uris=tuple(uris),
        https=https,
        mailto=mailto,
        http=http,
        unbracketed=unbracketed,
        post_values=tuple(p for p in posts if p),
    )


# ---- the policy ------------------------------------------------------------------------------

Requirement = Literal["body", "header", "one_click"]
_ORDER: tuple[Requirement, ...] = ("body", "header", "one_click")
_MAX_EVIDENCE_URL = 200

# What is missing and how to fix it, in English and Dutch. Replies are ASCII (RFC 5321 4.2)
# and short: with every item in both languages the line stays under 512 octets (4.5.3.1.5).
_ITEMS: dict[str, tuple[str, str]] = {
    "body": (
        "add a visible unsubscribe link to the text",
        "zet een zichtbare afmeldlink in de tekst",
    ),
    "header_absent": (
        "add List-Unsubscribe: <https://...>",
        "voeg List-Unsubscribe: <https://...> toe",
    ),
    "header_invalid": (
        "List-Unsubscribe needs an https: or mailto: URI in <>",
        "List-Unsubscribe moet een https:- of mailto:-URI tussen <> hebben",
    ),
    "header_http_only": (
        "List-Unsubscribe has http: only, use https:",
        "List-Unsubscribe heeft alleen http:, gebruik https:",
    ),
    "header_unbracketed": (
        "put the List-Unsubscribe URI in angle brackets: <https://...>",
        "zet de List-Unsubscribe-URI tussen punthaken: <https://...>",
    ),
    "header_needs_https": (
        "List-Unsubscribe needs an https: URI in <>",
        "List-Unsubscribe moet een https:-URI tussen <> hebben",
    ),
    "no_https_uri": (
        "one-click needs an https: URI in List-Unsubscribe",
        "one-click vereist een https:-URI in List-Unsubscribe",
    ),
    "no_post_header": (
        "add List-Unsubscribe-Post: List-Unsubscribe=One-Click (RFC 8058)",
        "voeg List-Unsubscribe-Post: List-Unsubscribe=One-Click toe",
    ),
    "post_value": (
        "List-Unsubscribe-Post must be exactly List-Unsubscribe=One-Click (RFC 8058)",
        "List-Unsubscribe-Post moet precies List-Unsubscribe=One-Click zijn",
    ),
    "post_header_repeated": (
        "give List-Unsubscribe-Post once (RFC 8058)",
        "geef List-Unsubscribe-Post maar een keer",
    ),
}
_LEAD = ("Commercial mail needs an unsubscribe option: ", "Commerciele mail moet een afmeldoptie hebben: ")


class UnsubscribePolicy(Policy):
    name = "unsubscribe"
    description = "commercial mail offers a way out: visible unsubscribe link, List-Unsubscribe, RFC 8058 one-click"
    default_classes = ("commercial",)

    @dataclass(frozen=True)
    class Options:
        require: tuple[Literal["body", "header", "one_click"], ...] = doc(
            "what every message must have: body (visible link), header (List-Unsubscribe), one_click (RFC 8058)",
            default=("body",),
        )
        one_click_senders: tuple[str, ...] = doc(
            "From domains (globs, e.g. news.example.com, *.example.com) that must also send RFC 8058 one-click "
            "headers: the bulk senders of Gmail's and Yahoo's rules",
            default=(),
        )
        extra_words: dict[str, tuple[str, ...]] = doc(
            "more unsubscribe keywords per language code, e.g. {nl: [uitschrijflink]}", default_factory=dict
        )
        words_file: str | None = doc(
            "YAML file in the format of policies/unsubscribe_words.yaml whose lists are added", default=None
        )
        language: Literal["en", "nl", "both"] = doc("language of the reply text", default="both")
        remedy: Literal["reject", "add_footer"] = doc(
            "a message without a visible unsubscribe link: reject it, or add_footer: sendguard adds each "
            "recipient's own link in a footer (needs the unsubscribe: section)",
            default="reject",
        )
        topic_header: str | None = doc(
            "header naming the topic the footer link unsubscribes from (the consent policy's)",
            default="X-Sendguard-Topic",
        )
        default_topic: str = doc("topic of a message that names none; * means all topics", default="*")

        def __post_init__(self) -> None:
            object.__setattr__(self, "default_topic", normalize_topic(self.default_topic))
            if len(set(self.require)) != len(self.require):
                raise ValueError("require lists a requirement twice")
            for glob in self.one_click_senders:
                if not glob.strip() or "@" in glob:
                    raise ValueError(f"one_click_senders: {glob!r} is not a domain glob (e.g. news.example.com)")
            # Fail at config load, with the file's own message, not at the first message.
            load_vocabulary(self.words_file, self.extra_words)

    def __init__(self, options: Any, resources: Mapping[str, Any] | None = None) -> None:
        super().__init__(options, resources)
        self.vocabulary = load_vocabulary(options.words_file, options.extra_words)

    async def check_message(self, txn: Transaction) -> Verdict | None:
        message = txn.message
        if message is None:
            return None
        added = self.resources.get("headers_added", {}).get(txn.message_class, frozenset())
        verdict = await asyncio.to_thread(self.judge, message, "list-unsubscribe" in added)
        if verdict.action is not Action.REJECT or self.options.remedy != "add_footer":
            return verdict
        evidence = verdict.evidence
        missing = [r for r in evidence["required"] if not (evidence["body_link"] if r == "body" else evidence[r])]
        if missing != ["body"]:
            return verdict  # a footer adds a body link only; a missing header stays the sender's to fix
        service = self.resources.get("unsubscribe")
        if service is None:
            raise PolicyError("remedy add_footer needs the unsubscribe: section of the config")
        topic = message_topic(txn, self.options.topic_header, self.options.default_topic)
        edit = await asyncio.to_thread(footer_edit, service, txn, topic)
        if edit is None:
            return verdict  # no text part can carry the link: refused as before
        return Verdict.accept(
            "no visible unsubscribe link: sendguard adds each recipient's own in a footer",
            evidence={**evidence, "remedy": "add_footer", "topic": topic},
            edit=edit,
        )

    @classmethod
    def personal_edits(cls, options: Any) -> bool:
        return bool(options.remedy == "add_footer")  # each recipient's own footer link

    @classmethod
    def instruction_headers(cls, options: Any) -> tuple[str, ...]:
        if options.remedy == "add_footer" and options.topic_header:
            return (options.topic_header,)
        return ()

    def judge(self, message: ParsedMessage, one_click_added: bool = False) -> Verdict:
        """The verdict for one message. Blocking (parses HTML): the check runs it in a thread.

        ``one_click_added``: sendguard's own list_unsubscribe policy gives this message
        recipient-specific one-click headers before relaying, so header and one-click are met."""
        options: UnsubscribePolicy.Options = self.options
        required: set[str] = set(options.require)
        bulk_sender = self._is_one_click_sender(message)
        if bulk_sender:
            required |= {"header", "one_click"}
        header = inspect_list_unsubscribe(message)
        findings = find_unsubscribe_links(message, self.vocabulary, first_only=True)
        link = findings[0] if findings else None
        have = {
            "body": link is not None,
            "header": header.valid or one_click_added,
            "one_click": header.one_click or one_click_added,
        }

        evidence: dict[str, Any] = {
            "required": [r for r in _ORDER if r in required],
            "body_link": link.target[:_MAX_EVIDENCE_URL] if link else None,
            "header": header.valid,
            "one_click": header.one_click,
        }
        if link:
            evidence["body_link_reason"] = link.reason
        if header.present:
            evidence["header_uris"] = [u[:_MAX_EVIDENCE_URL] for u in header.uris[:5]]
        if not header.one_click:
            evidence["one_click_problems"] = header.one_click_problems
        if bulk_sender:
            evidence["one_click_sender"] = True
        if one_click_added:
            evidence["one_click_added_by_sendguard"] = True

        missing = [r for r in _ORDER if r in required and not have[r]]
        if not missing:
            found = ", ".join(r for r in _ORDER if have[r]) or "nothing required"
            return Verdict.accept(f"unsubscribe ok ({found})", evidence=evidence)
        items = self._items(missing, header)
        return Verdict.reject(
            "missing: " + "; ".join(_ITEMS[i][0] for i in items),
            self._text(items),
            evidence=evidence,
        )

    def _is_one_click_sender(self, message: ParsedMessage) -> bool:
        globs = [g.lower().strip() for g in self.options.one_click_senders]
        if not globs:
            return False
        return any(fnmatch.fnmatchcase(address.domain, glob) for address in message.addresses("From") for glob in globs)

    @staticmethod
    def _items(missing: Sequence[str], header: ListUnsubscribe) -> list[str]:
        """What to tell the sender, one item per fix, without saying the same thing twice."""
        items = ["body"] if "body" in missing else []
        problems = header.one_click_problems if "one_click" in missing else []
        header_unmet = "header" in missing
        needs_https = "no_https_uri" in problems
        if not header.present and (header_unmet or needs_https):
            items.append("header_absent")
        elif header_unmet and header.http:
            items.append("header_http_only")
        elif header_unmet and header.unbracketed:
            items.append("header_unbracketed")
        elif header_unmet:
            items.append("header_needs_https" if needs_https else "header_invalid")  # https satisfies both
        elif needs_https:
            items.append("no_https_uri")
        items.extend(p for p in problems if p != "no_https_uri")
        return items

    def _text(self, items: list[str]) -> str:
        english = _LEAD[0] + "; ".join(_ITEMS[i][0] for i in items)
        dutch = _LEAD[1] + "; ".join(_ITEMS[i][1] for i in items)
        language = self.options.language
        if language == "en":
            return english
        if language == "nl":
            return dutch
        return f"{english} / NL: {dutch}"
