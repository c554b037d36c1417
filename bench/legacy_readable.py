"""The hand-written HTML tokenizer and renderer that policies/readable.py used before issue 14,
kept verbatim (its tokenizer and renderer; ``Link`` is still policies.readable's) only so that
bench/readable.py can time it side by side with its lexbor + tinycss2 successor. Nothing in
proxy/ or policies/ imports it.

What a reader sees of a text part: the visible text of HTML, and the links in it.

``ParsedMessage.readable_texts`` (policies/message.py) hands every decoded text part to
``readable_text``; the policies read the result (``ReadableText``, ``Link``) and never the
markup. Most of this module is the HTML tokenizer and renderer, kept apart from the parse of
the message because it is a reader of its own, with its own worst cases (see below).
"""

from __future__ import annotations

import contextlib
import html
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

from policies.readable import Link

__all__ = ("render_html",)

# HTML is rendered by a small tokenizer written for this purpose instead of html.parser: on
# the CPython 3.11 this project runs on, html.parser re-scans an unfinished construct to the
# end of the input each time it meets one, so a message of repeated "<!--" or "<a " takes
# time quadratic in its size (measured: 40 KB of "<a " 17 s, 1 MB of "<!--" 420 s). The
# tokenizer follows the HTML5 tokenizer where it matters for reading (comments, raw-text
# elements, quoted attribute values; an unfinished tag or comment at the end swallows the
# rest, as in a browser) and looks at every character a bounded number of times: 1 MB of
# any of those inputs renders in under a second.

# ---- the HTML tokenizer ----

_MARKUP_OPEN = re.compile(r"<[A-Za-z/!?]")
_TAG_NAME = re.compile(r"[A-Za-z][^\t\n\f\r />]*")
_TAG_SPACE = re.compile(r"[\t\n\f\r /]*")
_ATTR_NAME = re.compile(r"[^\t\n\f\r />][^\t\n\f\r />=]*")
_ATTR_EQUALS = re.compile(r"[\t\n\f\r ]*=[\t\n\f\r ]*")
_UNQUOTED_VALUE = re.compile(r"[^\t\n\f\r >]*")
_MAX_ATTRIBUTES = 64

#: Elements whose content is raw text up to their end tag (HTML5 "raw text" and "RCDATA").
_RAW_TEXT = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
_RAW_TEXT_END = {name: re.compile(rf"</{name}(?=[\t\n\f\r />]|$)", re.I) for name in _RAW_TEXT}

Token = tuple[str, str, tuple[tuple[str, str], ...]]  # (kind, name or text, attributes)


def _tokenize(source: str) -> Iterator[Token]:
    """HTML tokens: ("text", data, ()), ("start", name, attrs), ("end", name, ()) and
    ("raw", data, ()) for the content of raw-text elements."""
    n = len(source)
    pos = 0  # where to look for the next "<"
    text_from = 0  # start of the text not yet given out
    while pos < n:
        opening = _MARKUP_OPEN.search(source, pos)  # a "<" that starts nothing is text
        if opening is None:
            break
        lt = opening.start()
        nxt = source[lt + 1]
        is_tag = nxt.isalpha()
        if lt > text_from:
            yield ("text", source[text_from:lt], ())
        if source.startswith("<!--", lt):
            if source.startswith("<!-->", lt) or source.startswith("<!--->", lt):
                pos = source.index(">", lt) + 1  # abruptly closed empty comment
            else:
                close = source.find("-->", lt + 4)
                if close == -1:
                    return  # an unfinished comment runs to the end (HTML5: EOF in comment)
                pos = close + 3
        elif is_tag:
            parsed = _parse_start_tag(source, lt)
            if parsed is None:
                return  # an unfinished tag at the end is dropped with what follows
            name, attrs, pos = parsed
            yield ("start", name, attrs)
            if name in _RAW_TEXT_END:
                match = _RAW_TEXT_END[name].search(source, pos)
                end = match.start() if match else n
                if end > pos:
                    yield ("raw", source[pos:end], ())
                pos = end
            elif name == "plaintext":
                yield ("raw", source[pos:], ())
                return
        elif nxt == "/":
            close = source.find(">", lt + 2)
            if close == -1:
                return
            match = _TAG_NAME.match(source, lt + 2)
            if match:
                yield ("end", match.group().lower(), ())
            pos = close + 1  # "</>" and "</ junk>" are dropped (bogus comments)
        else:
            close = source.find(">", lt + 2)
            if close == -1:
                return
            pos = close + 1  # doctype, CDATA, conditional comments, processing instructions
        text_from = pos
    if text_from < n:
        yield ("text", source[text_from:], ())


def _parse_start_tag(source: str, lt: int) -> tuple[str, tuple[tuple[str, str], ...], int] | None:
    n = len(source)
    match = _TAG_NAME.match(source, lt + 1)
    assert match is not None  # the caller saw a letter after "<"
    name = match.group().lower()
    pos = match.end()
    attrs: list[tuple[str, str]] = []
    while True:
        space = _TAG_SPACE.match(source, pos)
        assert space is not None  # matches the empty string
        pos = space.end()
        if pos >= n:
            return None
        if source[pos] == ">":
            return name, tuple(attrs), pos + 1
        attr_match = _ATTR_NAME.match(source, pos)
        assert attr_match is not None  # source[pos] is none of the excluded characters
        attr = attr_match.group().lower()
        pos = attr_match.end()
        value = ""
        equals = _ATTR_EQUALS.match(source, pos)
        if equals:
            pos = equals.end()
            if pos >= n:
                return None
            quote = source[pos]
            if quote in "\"'":
                close = source.find(quote, pos + 1)
                if close == -1:
                    return None
                value = source[pos + 1 : close]
                pos = close + 1
            else:
                unquoted = _UNQUOTED_VALUE.match(source, pos)
                assert unquoted is not None  # matches empty
                value = unquoted.group()
                pos = unquoted.end()
        if len(attrs) < _MAX_ATTRIBUTES:
            attrs.append((attr, html.unescape(value) if "&" in value else value))


# ---- rendering ----

_VOID = frozenset(
    {
        "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr",
        "img", "input", "keygen", "link", "meta", "param", "source", "track", "wbr",
    }
)  # fmt: skip
#: Elements whose content is never shown.
_UNSHOWN = frozenset({"head", "script", "style", "title", "template", "iframe", "noembed", "noframes", "object"})
#: Elements that start and end a paragraph of the rendered text (a blank line).
_PARAGRAPH = frozenset(
    {
        "address", "article", "aside", "blockquote", "center", "dd", "details", "dialog", "dir", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hgroup",
        "hr", "li", "main", "menu", "nav", "ol", "p", "pre", "section", "table", "tbody", "thead", "tfoot", "tr", "ul",
    }
)  # fmt: skip
#: Elements that only start a new line (a table cell is part of its row's sentence).
_LINE = frozenset({"br", "td", "th", "caption"})
#: Start tags that close an open element (HTML5 "implied end tags"), and where to stop looking.
_IMPLIED_CLOSE: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "li": (frozenset({"li"}), frozenset({"ul", "ol", "table"})),
    "dt": (frozenset({"dt", "dd"}), frozenset({"dl", "table"})),
    "dd": (frozenset({"dt", "dd"}), frozenset({"dl", "table"})),
    "tr": (frozenset({"tr", "td", "th"}), frozenset({"table"})),
    "td": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "th": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "option": (frozenset({"option"}), frozenset({"select"})),
    "a": (frozenset({"a"}), frozenset()),  # anchors do not nest
}
_CLOSES_P = _PARAGRAPH - {"dd", "dt", "li", "tbody", "thead", "tfoot", "tr"}
_HEAD = frozenset({"head"})
_MAX_DEPTH = 512  # open elements kept; deeper ones are not tracked
_SEARCH_DEPTH = 64  # how far down the stack an end tag looks for its element
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\ufeff"), None)
_SPACES = re.compile(r"\s+")
_HAS_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_CSS_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)")


def _css_number(value: str | None) -> float | None:
    match = _CSS_NUMBER.match(value or "")
    return float(match.group()) if match else None


def _hides(attrs: dict[str, str]) -> bool:
    """True when an element's own attributes keep it, and all inside it, from being seen."""
    if "hidden" in attrs:
        return True
    style = attrs.get("style")
    if not style:
        return False
    declarations: dict[str, str] = {}
    for declaration in style.split(";"):
        prop, colon, value = declaration.partition(":")
        if colon:
            declarations[prop.strip().lower()] = value.lower().replace("!important", "").strip()
    if declarations.get("display") == "none" or declarations.get("visibility") in ("hidden", "collapse"):
        return True
    if declarations.get("mso-hide") == "all":  # Outlook's own way to hide
        return True
    if _css_number(declarations.get("font-size")) == 0 or _css_number(declarations.get("opacity")) == 0:
        return True
    if declarations.get("overflow") == "hidden":  # the usual way to hide a preheader
        return any(_css_number(declarations.get(p)) == 0 for p in ("height", "max-height", "width", "max-width"))
    return False


def _tiny_image(attrs: dict[str, str]) -> bool:
    """A tracking pixel: an image of at most 1 pixel across is nothing to see or click."""
    return any((size := _css_number(attrs.get(name))) is not None and size <= 1 for name in ("width", "height"))


@dataclass(slots=True)
class _OpenAnchor:
    href: str
    title: str
    start: int
    label: list[str] = field(default_factory=list)
    has_image: bool = False


class _Renderer:
    """Turns tokens into visible text and anchors, tracking which open elements hide."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.length = 0
        self.stack: list[tuple[str, bool]] = []  # (name, hides its content)
        self.hiding = 0  # entries of the stack that hide their content
        self.lost_hiding = False  # a hiding element beyond the depth limit: fail closed
        self.anchors: list[Link] = []
        self.anchor: _OpenAnchor | None = None
        self.base = ""  # <base href>: what relative links are relative to

    @property
    def hidden(self) -> bool:
        return self.hiding > 0 or self.lost_hiding

    # -- output

    def _emit(self, text: str) -> None:
        self.chunks.append(text)
        self.length += len(text)
        if self.anchor is not None:
            self.anchor.label.append(text)

    def _ends_with(self, suffix: str) -> bool:
        tail = ""
        for chunk in reversed(self.chunks):
            tail = chunk + tail
            if len(tail) >= len(suffix):
                break
        return tail.endswith(suffix)

    def _break(self, paragraph: bool) -> None:
        if self.hidden or not self.length:
            return
        if paragraph and not self._ends_with("\n\n"):
            self._emit("\n" if self._ends_with("\n") else "\n\n")
        elif not paragraph and not self._ends_with("\n"):
            self._emit("\n")

    def text(self, data: str) -> None:
        if self.hidden:
            return
        if "&" in data:
            data = html.unescape(data)
        data = _SPACES.sub(" ", data.translate(_ZERO_WIDTH))
        if data:
            self._emit(data)

    # -- elements

    def _push(self, name: str, hides: bool) -> None:
        if len(self.stack) >= _MAX_DEPTH:
            self.lost_hiding = self.lost_hiding or hides
            return
        self.stack.append((name, hides))
        self.hiding += hides

    def _pop_through(self, index: int) -> None:
        while len(self.stack) > index:
            name, hides = self.stack.pop()
            self.hiding -= hides
            if name == "a":
                self._finish_anchor()

    def _find_open(self, names: frozenset[str], stop: frozenset[str]) -> int | None:
        lowest = max(-1, len(self.stack) - 1 - _SEARCH_DEPTH)
        for index in range(len(self.stack) - 1, lowest, -1):
            name = self.stack[index][0]
            if name in names:
                return index
            if name in stop:
                return None
        return None

    def start(self, name: str, attrs: tuple[tuple[str, str], ...]) -> None:
        if name in _IMPLIED_CLOSE:
            closes, stop = _IMPLIED_CLOSE[name]
            index = self._find_open(closes, stop)
            if index is not None:
                self._pop_through(index)
        if name in _CLOSES_P and self.stack and self.stack[-1][0] == "p":
            self._pop_through(len(self.stack) - 1)
        if name == "body":  # a head never closed ends where the body starts
            index = self._find_open(_HEAD, frozenset())
            if index is not None:
                self._pop_through(index)
        attributes = dict(attrs)
        hides = name in _UNSHOWN or _hides(attributes)
        if name in _PARAGRAPH:
            self._break(True)
        elif name in _LINE:
            self._break(False)
        if name == "img":
            self._image(attributes, hides)
        if name == "base" and not self.base:
            self.base = "".join(attributes.get("href", "").split())
        if name in _VOID:
            return
        self._push(name, hides)
        if name == "a" and not self.hidden and "href" in attributes:
            self._finish_anchor()  # one left open past the depth limit
            self.anchor = _OpenAnchor(attributes["href"], attributes.get("title", ""), self.length)

    def end(self, name: str) -> None:
        if name in ("body", "html"):
            return  # content after </body> is still shown
        if name == "br":  # HTML5 reads </br> as <br>
            self._break(False)
            return
        index = self._find_open(frozenset({name}), frozenset())
        if index is not None:
            self._pop_through(index)
        if name in _PARAGRAPH:
            self._break(True)
        elif name in _LINE:
            self._break(False)

    def _image(self, attrs: dict[str, str], hides: bool) -> None:
        if self.hidden or hides or self.anchor is None or _tiny_image(attrs):
            return
        alt = " ".join(v for v in (attrs.get("alt", ""), attrs.get("title", "")) if v)
        self.anchor.label.append(f" {alt} ")
        self.anchor.has_image = True

    def _finish_anchor(self) -> None:
        anchor, self.anchor = self.anchor, None
        if anchor is None:
            return
        text = "".join(anchor.label)
        if not text.strip() and not anchor.has_image:
            return  # an anchor with nothing in it cannot be seen or clicked
        target = "".join(anchor.href.split())  # URL parsers drop tabs and newlines
        if self.base and not _HAS_SCHEME.match(target):
            with contextlib.suppress(ValueError):  # a malformed base or href stays as written
                target = urllib.parse.urljoin(self.base, target)
        label = _SPACES.sub(" ", f"{text} {anchor.title}").strip()
        self.anchors.append(Link("anchor", target, label, anchor.start, max(anchor.start, self.length)))

    def finish(self) -> tuple[str, list[Link]]:
        self._pop_through(0)
        self._finish_anchor()
        return "".join(self.chunks), self.anchors


def render_html(source: str) -> tuple[str, list[Link]]:
    """The text a reader sees in an HTML document, and the anchors with visible content.

    Left out: comments, ``<head>``, ``<script>``, ``<style>``, ``<title>``, ``<template>``
    and everything inside an element hidden by ``hidden``, ``display:none``,
    ``visibility:hidden``, ``font-size:0``, ``opacity:0``, ``mso-hide:all`` or a zero
    height or width with ``overflow:hidden``. CSS classes are not resolved.
    """
    renderer = _Renderer()
    for kind, value, attrs in _tokenize(source):
        if kind == "text":
            renderer.text(value)
        elif kind == "start":
            renderer.start(value, attrs)
        elif kind == "end":
            renderer.end(value)
        elif renderer.stack and renderer.stack[-1][0] in ("textarea", "xmp", "plaintext"):  # raw text, shown
            renderer.text(value)
    return renderer.finish()
