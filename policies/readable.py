"""What a reader sees of a text part: the visible text of HTML, and the links in it.

``ParsedMessage.readable_texts`` (policies/message.py) hands every decoded text part to
``readable_text``; the policies read the result (``ReadableText``, ``Link``) and never the
markup.

HTML is parsed by lexbor (through selectolax), an HTML5 parser: the tree is the one a browser,
and so a webmail, builds (duplicate attributes, misnested and unclosed tags, foster-parented
table content), which a hand-written tokenizer only approximated. Visibility is judged on
that tree with the CSS that applies to each element: its ``style`` attribute, the rules of
the document's ``<style>`` blocks matched by lexbor's selector engine, presentational
attributes (``bgcolor``, ``<font color>``, ``hidden``) and the browser's defaults (a link is
blue), read with tinycss2 (policies/htmlstyle.py). Text counts as seen only when nothing
hides it: not ``display:none``, collapsed or closed (``<details>``), clipped, scaled away,
moved off-screen, fainter than ``MIN_OPACITY``, smaller than ``MIN_FONT_PX``, or the colour
of what is behind it (``MIN_CONTRAST``).

Work is bounded: nesting deeper than ``MAX_DEPTH`` is cut before parsing (lexbor's tree
builder, like every HTML5 one, checks the open elements for each block start tag, which is
quadratic in the depth), at most ``MAX_NODES`` nodes are rendered, and style rules are
matched against the document only up to ``MATCH_BUDGET`` rule-element pairs. When a bound
cuts anything off, or the parser fails, the result says so (``ReadableText.complete``): what
was cut is not in the text, and a policy that needs proof of visibility does not trust it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from selectolax.lexbor import LexborHTMLParser, LexborNode, SelectolaxError

from policies import htmlstyle
from policies.htmlstyle import RGBA, Declaration

__all__ = (
    "MAX_DEPTH",
    "MAX_READABLE_CHARS",
    "MIN_CONTRAST",
    "MIN_FONT_PX",
    "MIN_OPACITY",
    "Link",
    "ReadableText",
    "find_text_links",
    "readable_text",
    "render_html",
)


@dataclass(frozen=True, slots=True)
class Link:
    """Something a reader can follow: an HTML anchor with visible content, or a URL or a bare
    e-mail address written in the text.

    ``target`` is the href, URL or address as written (entities resolved, white space
    removed); ``label`` is what the reader sees of an anchor (its visible text and the alt
    text of a visible image in it; not its title, a tooltip the reader has to hover for) and
    empty for a link written as text; ``start`` and ``end``
    locate the link in the text of its ``ReadableText``.
    """

    kind: str  # "anchor", "url" or "address"
    target: str
    label: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ReadableText:
    """One text part as a reader sees it, with the links in it.

    For text/html, ``text`` is the rendered visible text: no markup, comments, head, script
    or style, and nothing inside hidden elements; block elements become line breaks (a
    blank line ends a paragraph). For text/plain it is the decoded text itself.
    ``repaired`` marks a second reading of a part that declared one transfer encoding but
    was sent quoted-printable (``=3D"http...`` left in the markup). ``displayed`` is False
    for an alternative a mail client does not show (the text/plain of a multipart/alternative
    whose HTML it shows). ``complete`` is False when the HTML could not be read in full
    (see the module's bounds): hidden content may then have gone unrecognised.
    """

    content_type: str
    text: str
    links: tuple[Link, ...] = field(default=())
    repaired: bool = False
    displayed: bool = True
    complete: bool = True


#: Text parts longer than this are read at their head and tail only (the unsubscribe
#: footer is at the end); bounds the work on a 25 MB single-part message.
MAX_READABLE_CHARS = 4_000_000


def readable_text(content_type: str, text: str, *, repaired: bool = False, displayed: bool = True) -> ReadableText:
    """One decoded text part as a reader sees it: rendered when it is HTML, with its links."""
    if len(text) > MAX_READABLE_CHARS:
        half = MAX_READABLE_CHARS // 2
        text = text[:half] + "\n\n" + text[-half:]
    if content_type == "text/html":
        rendered = render(text)
        visible, anchors = rendered.text, rendered.links
        covered = [(link.start, link.end) for link in anchors]
        written = [
            link for link in find_text_links(visible) if not any(s <= link.start < e for s, e in covered)
        ]  # a URL that is itself an anchor's text is that anchor
        links = sorted([*anchors, *written], key=lambda link: link.start)
        return ReadableText(content_type, visible, tuple(links), repaired, displayed, rendered.complete)
    return ReadableText(content_type, text, tuple(find_text_links(text)), repaired, displayed)


# URLs as mail readers auto-link them; the look-behind keeps "xhttp://" and "a.www." out.
_TEXT_URL = re.compile(r"(?<![\w@.\-])(?:https?://|mailto:|www\.)[^\s<>\"'`{}|\\^\[\]]+", re.I)
# ASCII only: a CJK character glued to an address must not become part of its local part.
# The look-behind lets a match start only where a run of address characters starts, which
# keeps the scan linear on long runs without "@".
_TEXT_ADDRESS = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
_URL_TRAILING = ".,;:!?)'=*"


def find_text_links(text: str) -> list[Link]:
    """URLs (http, https, mailto, www.) and bare e-mail addresses written in ``text``."""
    links: list[Link] = []
    for match in _TEXT_URL.finditer(text):
        url = match.group().rstrip(_URL_TRAILING)
        lowered = url.lower()
        if lowered in ("mailto:", "www.") or lowered.endswith("://"):
            continue
        links.append(Link("url", url, "", match.start(), match.start() + len(url)))
    url_spans = [(link.start, link.end) for link in links]
    span_index = 0
    for match in _TEXT_ADDRESS.finditer(text):
        start = match.start()
        while span_index < len(url_spans) and url_spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(url_spans) and url_spans[span_index][0] <= start:
            continue  # part of a URL (mailto:a@b, http://user@host)
        address = match.group().strip(".")
        links.append(Link("address", address, "", start, start + len(address)))
    links.sort(key=lambda link: link.start)
    return links


# ---- the bounds ----

#: Elements open at once, counted before parsing; deeper content is cut off. Chromium's own
#: HTML parser stops nesting at 512 as well (kMaximumHTMLParserDOMTreeDepth).
MAX_DEPTH = 512
#: How far down the open elements an end tag looks for its start, in that count.
_SEARCH_DEPTH = 64
#: Distinct tag names, and distinct attribute names, read per part.
MAX_NAMES = 1_000
#: Nodes (elements, text) rendered per part; a 4 MB newsletter has about 100 000.
MAX_NODES = 400_000
#: Steps of selector matching per part: a rule costs the elements, times the depth for each
#: combinator (lexbor walks the document per selector, and up the ancestors per combinator),
#: plus a fixed RULE_COST. About 0.1 s on the machine of bench/results/readable.json.
MATCH_BUDGET = 40_000_000
RULE_COST = 1_000

# ---- what counts as seen ----

#: Text smaller than this many CSS pixels is not read (a footer is 10-12 px; 4 px is a smudge).
MIN_FONT_PX = 6.0
#: Text whose opacity (its own times its ancestors') is below this is not read.
MIN_OPACITY = 0.2
#: Text whose WCAG contrast ratio with what is behind it is below this is not read:
#: white on white is 1.0, white on the usual #f4f4f4 page 1.1, #999 on white 2.8.
MIN_CONTRAST = 1.25
#: Moved this many pixels or more off its place (position, margin, text-indent, translate).
OFF_SCREEN_PX = 1000.0
#: A box this small or smaller, with overflow hidden, shows nothing; so does an image.
TINY_PX = 2.0
#: A transform that scales below this shows nothing readable.
MIN_SCALE = 0.2

_VOID = frozenset(
    {
        "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr",
        "img", "input", "keygen", "link", "meta", "param", "source", "track", "wbr",
    }
)  # fmt: skip
#: Start tags that never nest in themselves (HTML5 closes the open one): not depth.
_SIBLING_CLOSED = frozenset(
    {"p", "li", "dt", "dd", "option", "optgroup", "tr", "td", "th", "tbody", "thead", "tfoot", "rb", "rt", "rp"}
)
#: Elements whose content is never shown (noscript: mail clients run no scripts, but lexbor
#: reads its content as raw text, so nothing in it could be judged).
_UNSHOWN = frozenset(
    {"head", "script", "style", "title", "template", "iframe", "noembed", "noframes", "object", "noscript"}
)
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
#: Elements whose width and height attributes size them.
_SIZED = frozenset({"img", "table", "td", "th", "div", "iframe"})
#: Properties that place, clip or scale a box: only an element with one of them is checked.
_GEOMETRY = frozenset(
    {
        "position", "margin", "margin-left", "margin-top", "text-indent", "transform", "clip", "clip-path",
        "overflow", "overflow-x", "overflow-y",
    }
)  # fmt: skip
#: Properties that change the colour behind the text.
_BACKGROUND = frozenset({"background", "background-color", "background-image"})
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\ufeff"), None)
_SPACES = re.compile(r"\s+")
_HAS_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9\-]*)")
#: Something that may be an attribute name (it also finds "x=" in text: an overestimate).
_ATTR_NAME = re.compile(r"[\s\"'/]([^\s\"'/=<>]+)[\t\n\f\r ]*=")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)")

_BLACK: RGBA = (0.0, 0.0, 0.0, 1.0)
_WHITE: RGBA = (1.0, 1.0, 1.0, 1.0)
_LINK_BLUE: RGBA = (0.0, 0.0, 0xEE / 255, 1.0)  # the browsers' default for a:link


@dataclass(frozen=True, slots=True)
class _Shape:
    """The source as it will be parsed, and what the pre-parse count found in it."""

    source: str
    cut: bool  # cut short at a bound
    elements: int  # start tags
    depth: int  # the deepest nesting seen (an overestimate)


def _cap_nesting(source: str) -> _Shape:
    """The source cut where lexbor's work would stop being linear, and whether it was cut.

    Where more than MAX_DEPTH elements would be open, by a linear estimate of the tree
    builder's stack: a start tag opens one (void elements and the ones a sibling closes do
    not), an end tag closes through the nearest open one of its name within _SEARCH_DEPTH; it
    overestimates where HTML5 closes elements implicitly, which only cuts a hostile document
    a little earlier. And where more than MAX_NAMES distinct tag or attribute names have been
    seen: lexbor looks new names up in a list (measured: 100 000 distinct attribute names
    take 4 s, distinct tag names 3.6 s); a template uses a few dozen."""
    cut = len(source)
    attributes = _ATTR_NAME.findall(source)  # in C; walked one by one only when too many
    if len({name.lower() for name in attributes}) > MAX_NAMES:
        seen: set[str] = set()
        for match in _ATTR_NAME.finditer(source):
            seen.add(match.group(1).lower())
            if len(seen) > MAX_NAMES:
                cut = match.start()
                break
    tags = _TAG.findall(source, 0, cut)
    stop = len(tags)  # the index of the tag where the source is cut
    if len({name.lower() for _, name in tags}) > MAX_NAMES:
        seen = set()
        for index, (_, name) in enumerate(tags):
            seen.add(name.lower())
            if len(seen) > MAX_NAMES:
                stop = index
                break
    stack: list[str] = []
    deepest = 0
    uncounted = _VOID | _SIBLING_CLOSED
    for index in range(stop):
        closing, name = tags[index]
        name = name.lower()
        if closing:
            if stack and stack[-1] == name:
                stack.pop()  # the usual case: it closes the innermost
                continue
            for open_index in range(len(stack) - 2, max(-1, len(stack) - 1 - _SEARCH_DEPTH), -1):
                if stack[open_index] == name:
                    del stack[open_index:]
                    break
        elif name not in uncounted:
            stack.append(name)
            deepest = max(deepest, len(stack))
            if len(stack) > MAX_DEPTH:
                stop = index
                break
    elements = sum(1 for closing, _ in tags[:stop] if not closing)
    if stop < len(tags):
        cut = next(m.start() for i, m in enumerate(_TAG.finditer(source, 0, cut)) if i == stop)
    if cut < len(source):
        return _Shape(source[:cut], True, elements, deepest)
    return _Shape(source, False, elements, deepest)


_CLASS_OR_ID = re.compile(r"""[\s"'/](class|id)[\t\n\f\r ]*=[\t\n\f\r ]*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.I)


def _names_in(source: str) -> frozenset[str]:
    """Every class (".name") and id ("#name") written in the document, lower case: a superset
    of what its elements carry (it also finds them in text), so no rule is skipped wrongly."""
    names: set[str] = set()
    for kind, double, single, bare in _CLASS_OR_ID.findall(source):
        prefix = "." if kind.lower() == "class" else "#"
        names.update(prefix + word for word in (double or single or bare).lower().split())
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class Rendered:
    """The visible text of an HTML document, its visible anchors, and whether every part of
    the document was read (False: a bound cut something off, or the parser failed)."""

    text: str
    links: list[Link]
    complete: bool


@dataclass(frozen=True, slots=True)
class _Style:
    """What an element passes on to its content: the inherited values, and the backdrop."""

    color: RGBA
    backdrop: RGBA | None  # the opaque colour behind the element; None behind an image
    font_px: float
    opacity: float
    invisible: bool  # visibility:hidden or collapse (inherited; a child may say visible)
    legible: bool  # its own text can be read (size, colour against the backdrop)


_ROOT_STYLE = _Style(_BLACK, _WHITE, 16.0, 1.0, False, True)

Cascade = dict[str, tuple[tuple[int, int, tuple[int, int, int], int], Declaration]]


def _first_px(value: tuple[object, ...] | None, em: float) -> float | None:
    if not value:
        return None
    return htmlstyle.length_px(value[:1], em)


def _attr_px(attrs: dict[str, str | None], name: str) -> float | None:
    match = _NUMBER.match(attrs.get(name) or "")
    return float(match.group()) if match else None


class _Renderer:
    """Walks lexbor's tree in document order, judging each element's style."""

    def __init__(self, tree: LexborHTMLParser, source: str, complete: bool) -> None:
        self.tree = tree
        self.source = source
        self.complete = complete
        self.chunks: list[str] = []
        self.length = 0
        self.anchors: list[Link] = []
        self.anchor: _OpenAnchor | None = None
        self.base = ""
        self.inline_cache: dict[str, dict[str, Declaration]] = {}
        self.matched: dict[int, list[htmlstyle.Rule]] = {}
        self.colors: dict[tuple[int, RGBA], tuple[tuple[object, ...], RGBA | None]] = {}

    # -- style sheets

    def match_rules(self, elements: int, depth: int) -> None:
        texts = [node.text(deep=True) for node in self.tree.css("style")]
        if not any(t.strip() for t in texts):
            return
        sheet = htmlstyle.parse_sheet(tuple(texts))
        self.complete = self.complete and sheet.complete
        present = _names_in(self.source)
        spent = 0
        for rule in sheet.rules:
            if not rule.requires <= present:
                continue  # its subject needs a class or id that no element has: it matches nothing
            spent += elements * (1 + rule.combinators * depth) + RULE_COST
            if spent > MATCH_BUDGET:
                self.complete = False
                return
            try:
                nodes = self.tree.css(rule.selector)
            except SelectolaxError:
                nodes = []  # a selector lexbor cannot read (vendor syntax): it matches nothing
            for node in nodes:
                self.matched.setdefault(node.mem_id, []).append(rule)

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
        if not self.length:
            return
        if paragraph and not self._ends_with("\n\n"):
            self._emit("\n" if self._ends_with("\n") else "\n\n")
        elif not paragraph and not self._ends_with("\n"):
            self._emit("\n")

    def _text(self, data: str) -> None:
        data = _SPACES.sub(" ", data.translate(_ZERO_WIDTH))
        if data:
            self._emit(data)

    # -- the cascade

    def _color(self, value: tuple[object, ...], current: RGBA) -> RGBA | None:
        """htmlstyle.color, remembered per declaration value (a template repeats a few)."""
        key = (id(value), current)
        found = self.colors.get(key)
        if found is None or found[0] is not value:
            found = (value, htmlstyle.color(value, current))
            self.colors[key] = found
        return found[1]

    def _cascade(self, node: LexborNode, tag: str, attrs: dict[str, str | None]) -> Cascade:
        """Each relevant property's winning declaration: presentational attributes, then the
        style sheet by specificity and order, then the style attribute; !important first."""
        out: Cascade = {}

        def put(key: tuple[int, int, tuple[int, int, int], int], declaration: Declaration) -> None:
            current = out.get(declaration.name)
            if current is None or key >= current[0]:
                out[declaration.name] = (key, declaration)

        for declaration in _presentational(tag, attrs):  # lowest: any author style overrides them
            if declaration is not None:
                put((0, 0, (0, 0, 0), 0), declaration)
        for rule in self.matched.get(node.mem_id, ()):
            for declaration in rule.declarations:
                put((int(declaration.important), 1, rule.specificity, rule.order), declaration)
        style = attrs.get("style")
        if style:
            declarations = self.inline_cache.get(style)
            if declarations is None:
                try:
                    declarations = htmlstyle.parse_declarations(style)
                except Exception:
                    declarations = {}
                self.inline_cache[style] = declarations
            for declaration in declarations.values():
                put((int(declaration.important), 2, (0, 0, 0), 0), declaration)
        return out

    def style(self, node: LexborNode, tag: str, attrs: dict[str, str | None], parent: _Style) -> _Style | None:
        """The element's style, or None when it hides itself and all it holds."""
        cascade = self._cascade(node, tag, attrs) if (attrs or node.mem_id in self.matched) else {}
        link = tag == "a" and "href" in attrs
        if not cascade and not link:
            return parent  # nothing of its own: it shows its content as its parent does
        props = cascade.keys()

        def value(name: str) -> tuple[object, ...] | None:
            found = cascade.get(name)
            return found[1].value if found else None

        def ident(name: str) -> str:
            found = value(name)
            if found and len(found) == 1 and getattr(found[0], "type", "") == "ident":
                return str(found[0].lower_value)  # type: ignore[attr-defined]
            return ""

        if ident("display") == "none" or ident("mso-hide") == "all":
            return None
        font_value = value("font-size")
        font_px = parent.font_px
        if font_value is not None:
            computed = htmlstyle.length_px(font_value, parent.font_px, parent.font_px)
            if computed is not None and computed >= 0:
                font_px = computed
        opacity = parent.opacity
        opacity_value = value("opacity")
        if opacity_value and len(opacity_value) == 1:
            token = opacity_value[0]
            kind = getattr(token, "type", "")
            if kind == "number":
                opacity *= min(1.0, max(0.0, float(token.value)))  # type: ignore[attr-defined]
            elif kind == "percentage":
                opacity *= min(1.0, max(0.0, float(token.value) / 100))  # type: ignore[attr-defined]
        if opacity < MIN_OPACITY:
            return None
        if props & _GEOMETRY and (_moved_away(value, ident, font_px) or _clipped(value, ident, font_px)):
            return None
        visibility = ident("visibility")
        invisible = parent.invisible if not visibility else visibility in ("hidden", "collapse")

        color = _LINK_BLUE if link else parent.color
        color_value = value("color")
        if color_value is not None:
            color = self._color(color_value, parent.color) or color
        backdrop = parent.backdrop
        image = value("background-image")
        background = value("background")
        if not props & _BACKGROUND:
            pass
        elif (image and htmlstyle.has_image(image)) or (background and htmlstyle.has_image(background)):
            backdrop = None
        else:
            paint: RGBA | None = None
            if background is not None:
                paint = htmlstyle.background_color(background, color)
            background_color = value("background-color")
            if background_color is not None and (
                "background-color" not in cascade
                or background is None
                or (cascade["background-color"][0] >= cascade["background"][0])
            ):
                paint = self._color(background_color, color) or paint
            if paint is not None and paint[3] > 0:
                if backdrop is not None:
                    backdrop = htmlstyle.over(paint, backdrop)
                elif paint[3] >= 1:
                    backdrop = paint
        if (color, backdrop, font_px, invisible) == (parent.color, parent.backdrop, parent.font_px, parent.invisible):
            legible = parent.legible
        else:
            legible = not invisible and font_px >= MIN_FONT_PX and _readable_on(color, backdrop)
        return _Style(color, backdrop, font_px, opacity, invisible, legible)

    # -- the walk

    def walk(self) -> None:
        root = self.tree.root
        if root is None:
            return
        base = self.tree.css_first("base[href]")
        if base is not None:
            self.base = "".join((base.attributes.get("href") or "").split())
        budget = MAX_NODES
        # (node, parent style, closing): closing entries finish an element after its content.
        stack: list[tuple[LexborNode, _Style, bool]] = [(root, _ROOT_STYLE, False)]
        while stack:
            node, parent, closing = stack.pop()
            tag = node.tag or ""
            if closing:
                self._close(node, tag)
                continue
            budget -= 1
            if budget < 0:
                self.complete = False
                return
            if tag == "-text":
                if parent.legible:
                    self._text(node.text_content or "")
                continue
            if tag.startswith("-") or tag in _UNSHOWN:
                continue  # comments, doctype; never shown elements
            attrs = node.attributes
            style = self.style(node, tag, attrs, parent)
            if style is None:
                continue
            if tag in _PARAGRAPH:
                self._break(True)
            elif tag in _LINE:
                self._break(False)
            if tag == "img":
                self._image(attrs, style)
            if tag in _VOID:
                continue
            if tag == "a" and self.anchor is None and attrs.get("href") is not None:
                self.anchor = _OpenAnchor(attrs.get("href") or "", self.length, node.mem_id)
            stack.append((node, style, True))
            children = list(node.iter(include_text=True))
            if tag == "details" and "open" not in attrs:
                # A closed <details> shows its first <summary> child only.
                summary = next((c for c in children if c.tag == "summary"), None)
                children = [summary] if summary is not None else []
            stack.extend((child, style, False) for child in reversed(children))

    def _close(self, node: LexborNode, tag: str) -> None:
        if self.anchor is not None and self.anchor.node == node.mem_id:
            self._finish_anchor()
        if tag in _PARAGRAPH:
            self._break(True)
        elif tag in _LINE:
            self._break(False)

    def _image(self, attrs: dict[str, str | None], style: _Style) -> None:
        if self.anchor is None or style.invisible:
            return
        if any((size := _attr_px(attrs, name)) is not None and size <= TINY_PX for name in ("width", "height")):
            return  # a tracking pixel is nothing to see or click
        alt = attrs.get("alt") or ""
        self.anchor.label.append(f" {alt} ")
        self.anchor.has_image = True

    def _finish_anchor(self) -> None:
        anchor, self.anchor = self.anchor, None
        if anchor is None:
            return
        text = "".join(anchor.label)
        if not text.strip() and not anchor.has_image:
            return  # an anchor with nothing visible in it cannot be seen or clicked
        target = "".join(anchor.href.split())  # URL parsers drop tabs and newlines
        if self.base and not _HAS_SCHEME.match(target):
            with contextlib.suppress(ValueError):  # a malformed base or href stays as written
                target = urllib.parse.urljoin(self.base, target)
        label = _SPACES.sub(" ", text).strip()
        self.anchors.append(Link("anchor", target, label, anchor.start, max(anchor.start, self.length)))

    def finish(self) -> Rendered:
        self._finish_anchor()
        return Rendered("".join(self.chunks), self.anchors, self.complete)


@dataclass(slots=True)
class _OpenAnchor:
    href: str
    start: int
    node: int
    label: list[str] = field(default_factory=list)
    has_image: bool = False


def _presentational(tag: str, attrs: dict[str, str | None]) -> Iterator[Declaration | None]:
    """HTML attributes that act as author style of the lowest precedence (HTML, Rendering)."""
    if "hidden" in attrs:
        yield _declaration("display:none")
    bgcolor = attrs.get("bgcolor")
    if bgcolor:
        yield _attribute_color("background-color", bgcolor)
    if attrs.get("background"):  # <td background="...">: an image behind the text
        yield _declaration("background-image:url(x)")
    if tag == "font" and attrs.get("color"):
        yield _attribute_color("color", attrs.get("color") or "")
    if tag in _SIZED:
        for name in ("width", "height"):
            size = _attr_px(attrs, name)
            if size is not None and not (attrs.get(name) or "").strip().endswith("%"):
                yield _declaration(f"{name}:{size}px")


@functools.lru_cache(maxsize=256)
def _declaration(text: str) -> Declaration | None:
    """One declaration from its text; the same few attribute values repeat through a template."""
    found = htmlstyle.parse_declarations(text)
    return next(iter(found.values())) if found else None


@functools.lru_cache(maxsize=256)
def _attribute_color(name: str, text: str) -> Declaration | None:
    paint = htmlstyle.attribute_color(text)
    if paint is None:
        return None
    r, g, b, _ = paint  # an attribute colour is a name or #rrggbb: opaque
    return _declaration(f"{name}:#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")


@functools.lru_cache(maxsize=1024)
def _readable_on(color: RGBA, backdrop: RGBA | None) -> bool:
    if color[3] < MIN_OPACITY:
        return False  # transparent text
    if backdrop is None:
        return True  # an image behind it: whatever its colour, it may be readable
    return htmlstyle.contrast(htmlstyle.over(color, backdrop), backdrop) >= MIN_CONTRAST


def _moved_away(value: Callable[[str], tuple[object, ...] | None], ident: Callable[[str], str], em: float) -> bool:
    """Positioned, pushed or indented off the screen, or scaled to nothing."""
    if ident("position") in ("absolute", "fixed", "relative"):
        for side in ("left", "top", "right", "bottom"):
            px = _first_px(value(side), em)
            if px is not None and px <= -OFF_SCREEN_PX:
                return True
    offsets = [value("margin-left"), value("margin-top"), value("text-indent")]
    margin = value("margin")
    if margin:
        offsets += [margin[:1], margin[3:4] or margin[1:2]]  # top, left
    for offset in offsets:
        px = _first_px(offset, em)
        if px is not None and px <= -OFF_SCREEN_PX:
            return True
    return _transform_hides(value("transform"), em)


def _transform_hides(transform: tuple[object, ...] | None, em: float) -> bool:
    for function in transform or ():
        if getattr(function, "type", "") != "function":
            continue
        name: str = function.lower_name  # type: ignore[attr-defined]
        numbers: list[float | None] = []
        for argument in htmlstyle.split_arguments(function.arguments):  # type: ignore[attr-defined]
            numbers.extend(_transform_number(token, em) for token in argument)
        known = [n for n in numbers if n is not None]
        if name.startswith("scale") and any(abs(n) < MIN_SCALE for n in known):
            return True
        if name == "matrix" and len(known) == 6:
            a, b, c, d, e, f = known
            if (a * a + b * b) ** 0.5 < MIN_SCALE or (c * c + d * d) ** 0.5 < MIN_SCALE:
                return True
            if e <= -OFF_SCREEN_PX or f <= -OFF_SCREEN_PX:
                return True
        if name.startswith("translate") and any(n <= -OFF_SCREEN_PX for n in known):
            return True
    return False


def _transform_number(token: object, em: float) -> float | None:
    kind = getattr(token, "type", "")
    if kind == "percentage":
        return float(token.value) / 100  # type: ignore[attr-defined]
    if kind == "number":
        return float(token.value)  # type: ignore[attr-defined]
    return htmlstyle.length_px((token,), em)


def _clipped(value: Callable[[str], tuple[object, ...] | None], ident: Callable[[str], str], em: float) -> bool:
    """Clipped away (clip-path, clip: rect()) or a box too small to show, its overflow hidden."""
    if value("clip-path") and ident("clip-path") != "none":
        return True
    clip = value("clip")
    if clip and getattr(clip[0], "type", "") == "function" and clip[0].lower_name == "rect":  # type: ignore[attr-defined]
        edges = [
            htmlstyle.length_px(tuple(argument), em)
            for argument in htmlstyle.split_arguments(clip[0].arguments)  # type: ignore[attr-defined]
        ]
        if len(edges) == 1:  # rect(0 0 0 0): white space separated
            edges = [
                htmlstyle.length_px((token,), em)
                for token in clip[0].arguments  # type: ignore[attr-defined]
                if getattr(token, "type", "") not in ("whitespace", "comment")
            ]
        if len(edges) == 4 and None not in edges:
            top, right, bottom, left = (e or 0.0 for e in edges)
            if right - left <= TINY_PX or bottom - top <= TINY_PX:
                return True
    if any(ident(name) in ("hidden", "clip") for name in ("overflow", "overflow-x", "overflow-y")):
        for name in ("width", "max-width", "height", "max-height"):
            px = _first_px(value(name), em)
            if px is not None and px <= TINY_PX:
                return True
    return False


def render(source: str) -> Rendered:
    """The text a reader sees in an HTML document, its visible anchors, and whether the
    whole document was read. Never raises: a document that cannot be read renders as
    nothing, marked incomplete."""
    try:
        shape = _cap_nesting(source)
        tree = LexborHTMLParser(shape.source)
        renderer = _Renderer(tree, shape.source, not shape.cut)
        renderer.match_rules(shape.elements, shape.depth)
        renderer.walk()
        return renderer.finish()
    except Exception:  # a policy must get an answer; an unread document proves nothing visible
        return Rendered("", [], False)


def render_html(source: str) -> tuple[str, list[Link]]:
    """The text a reader sees in an HTML document, and the anchors with visible content."""
    rendered = render(source)
    return rendered.text, rendered.links
