"""The CSS that decides whether a reader sees a piece of HTML: declarations, style sheets and
the few computed values policies/readable.py needs (display, visibility, opacity, font size,
colours, position, clipping, transforms, sizes).

Parsing is tinycss2's (a maintained CSS Syntax Level 3 parser): comments, escapes
(``display:\\6e one``), ``!important`` and broken declarations are read as a browser reads
them, which a hand-split on ";" and ":" got wrong. Selector matching is lexbor's, through
selectolax, in readable.py; this module only says which rules are worth matching and in what
order they win (specificity, then source order).

Every value here errs the same way: what cannot be read is ignored, as a browser ignores an
invalid declaration, and the element keeps what it inherits.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import tinycss2
import tinycss2.color3

__all__ = (
    "MAX_RULES",
    "MAX_SHEET_CHARS",
    "Declaration",
    "Rule",
    "Sheet",
    "color",
    "length_px",
    "parse_declarations",
    "parse_sheet",
    "split_arguments",
)

#: The properties that can hide text or move it out of sight; every other declaration is
#: dropped when it is read, so a rule that sets only padding or fonts is never matched.
RELEVANT = frozenset(
    {
        "display", "visibility", "opacity", "font-size", "color", "background", "background-color",
        "background-image", "position", "left", "top", "right", "bottom", "text-indent", "clip", "clip-path",
        "transform", "width", "height", "max-width", "max-height", "overflow", "overflow-x", "overflow-y",
        "mso-hide", "margin", "margin-left", "margin-top",
    }
)  # fmt: skip

#: Characters of <style> text parsed per document; a newsletter's style sheet is 5-30 KB.
MAX_SHEET_CHARS = 100_000
#: Selectors (after dropping rules without a relevant declaration) kept per document.
MAX_RULES = 1_000
#: A selector longer than this is not matched (lexbor's matching of a compound selector is
#: linear in its length times the elements; mail templates never come near it).
MAX_SELECTOR_CHARS = 300

Tokens = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Declaration:
    name: str
    value: Tokens  # component values, white space and comments left out
    important: bool


@dataclass(frozen=True, slots=True)
class Rule:
    selector: str
    specificity: tuple[int, int, int]
    order: int
    declarations: tuple[Declaration, ...]
    #: Classes (".x") and ids ("#x") the selector names, lower case: each compound of a
    #: selector must match some element, so a rule that names one the document never
    #: mentions cannot match.
    requires: frozenset[str] = frozenset()
    #: Combinators (descendant, >, +, ~): matching costs up to the tree's depth for each.
    combinators: int = 0


@dataclass(frozen=True, slots=True)
class Sheet:
    rules: tuple[Rule, ...]
    complete: bool  # False: a budget cut some rules off, so some hiding may go unseen


def _significant(tokens: Iterable[Any]) -> Tokens:
    return tuple(t for t in tokens if t.type not in ("whitespace", "comment"))


def parse_declarations(text: str | Sequence[Any]) -> dict[str, Declaration]:
    """The relevant declarations of a style attribute or rule body (text, or a rule's tokens),
    as the cascade leaves them: a later one wins over an earlier one unless the earlier is
    ``!important``."""
    out: dict[str, Declaration] = {}
    for item in tinycss2.parse_blocks_contents(text, skip_comments=True, skip_whitespace=True):
        if item.type != "declaration":
            continue
        name = item.lower_name
        if name not in RELEVANT:
            continue
        earlier = out.get(name)
        if earlier is not None and earlier.important and not item.important:
            continue
        out[name] = Declaration(name, _significant(item.value), bool(item.important))
    return out


_IDS = re.compile(r"#[\w\-]")
_CLASSES = re.compile(r"\.[\w\-]|\[|:(?!:)[\w\-]")
_TYPES = re.compile(r"(?:^|[\s>+~(,])([A-Za-z][\w\-]*)")
_DYNAMIC = re.compile(r":(?:hover|focus|active|visited|target|focus-within|focus-visible)\b", re.I)


def _specificity(selector: str) -> tuple[int, int, int]:
    """Close enough to Selectors Level 3 for the cascade: ids, then classes, attributes and
    pseudo-classes, then type names."""
    return (len(_IDS.findall(selector)), len(_CLASSES.findall(selector)), len(_TYPES.findall(selector)))


def _split_selectors(prelude: str) -> list[str]:
    """A selector list split at its top-level commas."""
    parts: list[str] = []
    depth = 0
    start = 0
    for index, char in enumerate(prelude):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(prelude[start:index])
            start = index + 1
    parts.append(prelude[start:])
    return [p.strip() for p in parts if p.strip()]


def _media_applies(prelude: Sequence[Any]) -> bool:
    """A desktop or webmail screen: media types all and screen, no feature queries. A rule
    that applies only at some widths leaves the content visible at the others."""
    text = tinycss2.serialize(prelude).strip().lower()
    if not text:
        return True
    if "(" in text:
        return False
    return all(part.strip().removeprefix("only ").strip() in ("all", "screen") for part in text.split(","))


_REQUIRED = re.compile(r"([.#])(-?[A-Za-z_][\w\-]*)")
_COMBINATOR = re.compile(r"\s*[>+~]\s*|\s+")


def _requires(selector: str) -> frozenset[str]:
    """The classes and ids a selector names (see Rule.requires); none for one with :not(),
    other functional pseudo-classes, attribute selectors or escapes, which it may not need."""
    if "(" in selector or "[" in selector or "\\" in selector:
        return frozenset()
    return frozenset(kind + name.lower() for kind, name in _REQUIRED.findall(selector))


@functools.lru_cache(maxsize=32)
def parse_sheet(texts: tuple[str, ...]) -> Sheet:
    """The rules of the document's <style> elements that can hide something, in order.

    Cached by the style text: the copies of one campaign carry the same style sheet, and
    tinycss2's tokenizer (pure Python) is the dearest part of reading a styled newsletter.
    The result is immutable, so threads may share it."""
    rules: list[Rule] = []
    complete = True
    budget = MAX_SHEET_CHARS
    order = 0
    for text in texts:
        if len(text) > budget:
            text = text[:budget]
            complete = False
        budget -= len(text)
        pending: deque[Any] = deque(tinycss2.parse_stylesheet(text, skip_comments=True, skip_whitespace=True))
        while pending:
            item = pending.popleft()
            if item.type == "at-rule":
                if item.lower_at_keyword == "media" and item.content is not None and _media_applies(item.prelude):
                    nested = tinycss2.parse_rule_list(item.content, skip_comments=True, skip_whitespace=True)
                    pending.extendleft(reversed(nested))
                continue
            if item.type != "qualified-rule":
                continue
            declarations = parse_declarations(item.content)
            if not declarations:
                continue
            for selector in _split_selectors(tinycss2.serialize(item.prelude)):
                if _DYNAMIC.search(selector) or "::" in selector:
                    continue  # applies on interaction only, or to generated content
                if len(selector) > MAX_SELECTOR_CHARS or len(rules) >= MAX_RULES:
                    complete = False
                    continue
                rules.append(
                    Rule(
                        selector,
                        _specificity(selector),
                        order,
                        tuple(declarations.values()),
                        _requires(selector),
                        len(_COMBINATOR.findall(selector.strip())),
                    )
                )
                order += 1
        if budget <= 0:
            break
    return Sheet(tuple(rules), complete)


# ---- values ----------------------------------------------------------------------------------

#: CSS absolute font-size keywords in pixels (CSS Fonts 4, medium = 16px).
_FONT_KEYWORDS = {
    "xx-small": 9.0, "x-small": 10.0, "small": 13.0, "medium": 16.0, "large": 18.0, "x-large": 24.0,
    "xx-large": 32.0, "xxx-large": 48.0,
}  # fmt: skip
_UNITS = {"px": 1.0, "pt": 4 / 3, "pc": 16.0, "in": 96.0, "cm": 96 / 2.54, "mm": 96 / 25.4, "q": 96 / 101.6}
_MAX_CALC_DEPTH = 8


def length_px(value: Tokens, em: float, percent_of: float | None = None) -> float | None:
    """A length in pixels: px, pt, em, rem, ex, ch, %, keywords (font size), calc(), min(),
    max(), clamp(). None when it cannot be known (unknown units, var(), viewport units)."""
    if len(value) != 1:
        return None
    token = value[0]
    if token.type == "ident":
        name = token.lower_value
        if name in _FONT_KEYWORDS:
            return _FONT_KEYWORDS[name]
        if name == "smaller":
            return em / 1.2
        if name == "larger":
            return em * 1.2
        return None
    return _component_px(token, em, percent_of, 0)


def _component_px(token: Any, em: float, percent_of: float | None, depth: int) -> float | None:
    if token.type == "number":
        return float(token.value)  # a bare number: 0, or a factor inside calc()
    if token.type == "percentage":
        return None if percent_of is None else percent_of * float(token.value) / 100
    if token.type == "dimension":
        unit = token.lower_unit
        number = float(token.value)
        if unit in _UNITS:
            return number * _UNITS[unit]
        if unit == "em":
            return number * em
        if unit == "rem":
            return number * 16.0
        if unit in ("ex", "ch"):
            return number * em / 2
        return None
    if token.type == "function" and depth < _MAX_CALC_DEPTH:
        name = token.lower_name
        if name == "calc":
            return _calc(_significant(token.arguments), em, percent_of, depth + 1)
        if name in ("min", "max", "clamp"):
            values = [_calc(arg, em, percent_of, depth + 1) for arg in split_arguments(token.arguments)]
            if not values or any(v is None for v in values):
                return None
            known = [v for v in values if v is not None]
            if name == "min":
                return min(known)
            if name == "max":
                return max(known)
            if len(known) == 3:
                return max(known[0], min(known[1], known[2]))
        return None
    if token.type == "() block" and depth < _MAX_CALC_DEPTH:
        return _calc(_significant(token.content), em, percent_of, depth + 1)
    return None


def split_arguments(arguments: Sequence[Any]) -> list[Tokens]:
    out: list[list[Any]] = [[]]
    for token in arguments:
        if token.type == "literal" and token.value == ",":
            out.append([])
        elif token.type not in ("whitespace", "comment"):
            out[-1].append(token)
    return [tuple(part) for part in out]


def _calc(tokens: Tokens, em: float, percent_of: float | None, depth: int) -> float | None:
    """A calc() sum of products, left to right; None when any term cannot be known."""
    total = 0.0
    sign = 1.0
    product: float | None = None
    operator = ""
    for token in tokens:
        if token.type == "literal" and token.value in "+-*/":
            if token.value in "+-" and product is not None:
                total += sign * product
                sign = 1.0 if token.value == "+" else -1.0
                product = None
                operator = ""
            else:
                operator = token.value
            continue
        value = _component_px(token, em, percent_of, depth)
        if value is None:
            return None
        if product is None:
            product = value
        elif operator == "*":
            product *= value
        elif operator == "/":
            if value == 0:
                return None
            product /= value
        else:
            return None
        operator = ""
    if product is None:
        return None
    return total + sign * product


RGBA = tuple[float, float, float, float]


def color(value: Tokens, current: RGBA) -> RGBA | None:
    """A colour (CSS Color 3: names, #hex, rgb(), hsl(), transparent, currentColor)."""
    if len(value) != 1:
        return None
    try:
        parsed = tinycss2.color3.parse_color(value[0])
    except Exception:
        return None
    if parsed is None:
        return None
    if parsed == "currentColor":
        return current
    return (float(parsed.red), float(parsed.green), float(parsed.blue), float(parsed.alpha))


def attribute_color(text: str) -> RGBA | None:
    """The colour of a bgcolor or <font color> attribute: a name or hex, "#" optional."""
    text = text.strip()
    if not text:
        return None
    for candidate in (text, "#" + text):
        try:
            parsed = tinycss2.color3.parse_color(candidate)
        except Exception:
            return None
        if parsed is not None and parsed != "currentColor":
            return (float(parsed.red), float(parsed.green), float(parsed.blue), float(parsed.alpha))
    return None


def _luminance(rgba: RGBA) -> float:
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b, _ = rgba
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def over(top: RGBA, below: RGBA) -> RGBA:
    """``top`` painted over an opaque ``below``."""
    alpha = top[3]
    return (
        top[0] * alpha + below[0] * (1 - alpha),
        top[1] * alpha + below[1] * (1 - alpha),
        top[2] * alpha + below[2] * (1 - alpha),
        1.0,
    )


def contrast(a: RGBA, b: RGBA) -> float:
    """WCAG 2 contrast ratio of two opaque colours: 1 (the same) to 21 (black on white)."""
    la, lb = _luminance(a), _luminance(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def has_image(value: Tokens) -> bool:
    """A background value with an image or gradient: the colour behind the text is unknown."""
    for token in value:
        if token.type == "url":
            return True
        if token.type == "function" and (token.lower_name == "url" or "gradient" in token.lower_name):
            return True
        if token.type == "function" and token.lower_name == "image-set":
            return True
    return False


def background_color(value: Tokens, current: RGBA) -> RGBA | None:
    """The colour in a ``background`` shorthand, if it names one."""
    for token in value:
        if token.type in ("ident", "hash", "function"):
            found = color((token,), current)
            if found is not None:
                return found
    return None
