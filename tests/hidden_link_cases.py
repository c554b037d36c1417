"""Issue 14's hidden-link evasions, each with its visible twin, and the split-verb phrasings:
one table for the policy-level tests (tests/policies/test_hidden_links.py) and the same one
sent through the running proxy (tests/test_hidden_links_relay.py)."""

from __future__ import annotations

from dataclasses import dataclass

#: The unsubscribe URL of the evasions: it says unsubscribe, so only what the reader sees of
#: it decides.
URL = "https://news.example/unsubscribe?u=1"
#: A URL that says nothing: only the words a reader sees around it decide.
PLAIN_URL = "https://news.example/l/8f3a"
LINK = f'<a href="{URL}">Unsubscribe</a>'


@dataclass(frozen=True)
class Evasion:
    id: str
    hidden: str  # the HTML body of the evasion: no visible unsubscribe link
    visible: str  # its twin, with what hides the link taken away: the link counts


def _page(body: str) -> str:
    return f"<html><body><p>Our spring collection is here.</p>{body}<p>Shop Example, Main Street 1</p></body></html>"


EVASIONS = [
    Evasion(
        "duplicate-style-attribute-first-wins",
        _page(f'<a href="{URL}" style="display:none" style="display:inline">Unsubscribe</a>'),
        _page(f'<a href="{URL}" style="display:inline" style="display:none">Unsubscribe</a>'),
    ),
    Evasion(
        "css-comment-in-declaration",
        _page(f'<div style="display:/**/none">{LINK}</div>'),
        _page(f'<div style="display:/**/block">{LINK}</div>'),
    ),
    Evasion(
        "css-escape-in-declaration",
        _page(f'<div style="display:\\6e one">{LINK}</div>'),
        _page(f'<div style="display:\\62 lock">{LINK}</div>'),
    ),
    Evasion(
        "font-size-half-pixel",
        _page(f'<p style="font-size:0.5px">{LINK}</p>'),
        _page(f'<p style="font-size:11px">{LINK}</p>'),
    ),
    Evasion(
        "font-size-calc-zero",
        _page(f'<p style="font-size:calc(0px)">{LINK}</p>'),
        _page(f'<p style="font-size:calc(6px + 6px)">{LINK}</p>'),
    ),
    Evasion(
        "font-size-relative-to-tiny-parent",
        _page(f'<div style="font-size:2px"><p style="font-size:1.5em">{LINK}</p></div>'),
        _page(f'<div style="font-size:8px"><p style="font-size:1.5em">{LINK}</p></div>'),
    ),
    Evasion(
        "opacity-near-zero",
        _page(f'<p style="opacity:0.01">{LINK}</p>'),
        _page(f'<p style="opacity:0.9">{LINK}</p>'),
    ),
    Evasion(
        "opacity-multiplies-down-the-tree",
        _page(f'<div style="opacity:0.3"><p style="opacity:0.3">{LINK}</p></div>'),
        _page(f'<div style="opacity:0.8"><p style="opacity:0.8">{LINK}</p></div>'),
    ),
    Evasion(
        "white-on-white",
        _page(f'<p style="color:#fff">Stop? <a href="{URL}" style="color:#ffffff">Unsubscribe</a></p>'),
        _page(
            f'<p style="color:#fff;background-color:#333">Stop? <a href="{URL}" style="color:#fff">Unsubscribe</a></p>'
        ),
    ),
    Evasion(
        "near-white-on-inherited-bgcolor",
        _page(
            f'<table bgcolor="#f4f4f4"><tr><td><a href="{URL}" style="color:#f6f6f6">Unsubscribe</a></td></tr></table>'
        ),
        _page(
            f'<table bgcolor="#f4f4f4"><tr><td><a href="{URL}" style="color:#999999">Unsubscribe</a></td></tr></table>'
        ),
    ),
    Evasion(
        "dark-on-dark-body-background-from-style-block",
        "<html><head><style>body{background:#111111}</style></head><body><p>News</p>"
        f'<a href="{URL}" style="color:#000">Unsubscribe</a></body></html>',
        "<html><head><style>body{background:#111111}</style></head><body><p>News</p>"
        f'<a href="{URL}" style="color:#ddd">Unsubscribe</a></body></html>',
    ),
    Evasion(
        "color-transparent",
        _page(f'<a href="{URL}" style="color:transparent">Unsubscribe</a>'),
        _page(f'<a href="{URL}" style="color:#333">Unsubscribe</a>'),
    ),
    Evasion(
        "color-alpha-near-zero",
        _page(f'<a href="{URL}" style="color:rgba(0,0,0,0.05)">Unsubscribe</a>'),
        _page(f'<a href="{URL}" style="color:rgba(0,0,0,0.9)">Unsubscribe</a>'),
    ),
    Evasion(
        "font-color-white",
        _page(f'<a href="{URL}"><font color="white">Unsubscribe</font></a>'),
        _page(f'<a href="{URL}"><font color="navy">Unsubscribe</font></a>'),
    ),
    Evasion(
        "style-block-class",
        f"<html><head><style>.legal {{ display: none }}</style></head><body>{_page(f'<div class=legal>{LINK}</div>')}",
        f"<html><head><style>.legal {{ display: block }}</style></head><body>{_page(f'<div class=legal>{LINK}</div>')}",
    ),
    Evasion(
        "style-block-id-beats-type",
        f"<style>div {{ visibility: visible }} #f {{ visibility: hidden }}</style>{_page(f'<div id=f>{LINK}</div>')}",
        f"<style>div {{ visibility: hidden }} #f {{ visibility: visible }}</style>{_page(f'<div id=f>{LINK}</div>')}",
    ),
    Evasion(
        "style-block-important-beats-inline",
        f"<style>.f {{ display: none !important }}</style>{_page(f'<div class=f style=display:block>{LINK}</div>')}",
        f"<style>.f {{ display: none }}</style>{_page(f'<div class=f style=display:block>{LINK}</div>')}",
    ),
    Evasion(
        "style-block-descendant-selector",
        f"<style>td.foot a {{ font-size: 1px }}</style>{_page(f'<table><tr><td class=foot>{LINK}</td></tr></table>')}",
        f"<style>td.foot a {{ font-size: 12px }}</style>{_page(f'<table><tr><td class=foot>{LINK}</td></tr></table>')}",
    ),
    Evasion(
        "off-screen-position",
        _page(f'<div style="position:absolute;left:-9999px">{LINK}</div>'),
        _page(f'<div style="position:absolute;left:10px">{LINK}</div>'),
    ),
    Evasion(
        "off-screen-margin",
        _page(f'<div style="margin-left:-5000px">{LINK}</div>'),
        _page(f'<div style="margin-left:20px">{LINK}</div>'),
    ),
    Evasion(
        "text-indent-negative",
        _page(f'<p style="text-indent:-9999px">{LINK}</p>'),
        _page(f'<p style="text-indent:20px">{LINK}</p>'),
    ),
    Evasion(
        "clip-path",
        _page(f'<p style="clip-path:inset(50%)">{LINK}</p>'),
        _page(f'<p style="clip-path:none">{LINK}</p>'),
    ),
    Evasion(
        "clip-rect",
        _page(f'<p style="position:absolute;clip:rect(0 0 0 0)">{LINK}</p>'),
        _page(f'<p style="position:absolute;clip:rect(0 300px 40px 0)">{LINK}</p>'),
    ),
    Evasion(
        "transform-scale-zero",
        _page(f'<p style="transform:scale(0)">{LINK}</p>'),
        _page(f'<p style="transform:scale(1)">{LINK}</p>'),
    ),
    Evasion(
        "transform-translate-off-screen",
        _page(f'<p style="transform:translateX(-9999px)">{LINK}</p>'),
        _page(f'<p style="transform:translateX(10px)">{LINK}</p>'),
    ),
    Evasion(
        "zero-size-container",
        _page(f'<div style="width:0;height:0;overflow:hidden">{LINK}</div>'),
        _page(f'<div style="width:300px;overflow:hidden">{LINK}</div>'),
    ),
    Evasion(
        "zero-size-image",
        _page(f'<a href="{URL}"><img src="https://cdn.example/u.png" alt="Unsubscribe" width="0" height="0"></a>'),
        _page(f'<a href="{URL}"><img src="https://cdn.example/u.png" alt="Unsubscribe" width="120" height="30"></a>'),
    ),
    Evasion(
        "closed-details",
        _page(f"<details><summary>Legal</summary>{LINK}</details>"),
        _page(f"<details open><summary>Legal</summary>{LINK}</details>"),
    ),
    Evasion(
        "url-says-unsubscribe-text-says-shop-now",
        _page(f'<p><a href="{URL}">Shop now</a></p>'),
        _page(f'<p><a href="{URL}">Shop now</a></p><p>No more mail from us? <a href="{URL}">Unsubscribe</a></p>'),
    ),
    Evasion(
        "url-says-unsubscribe-image-without-alt",
        _page(f'<a href="{URL}"><img src="https://cdn.example/u.png" width="120" height="30"></a>'),
        _page(f'<a href="{URL}"><img src="https://cdn.example/u.png" alt="Unsubscribe" width="120" height="30"></a>'),
    ),
    Evasion(
        "sentence-hidden-link-plain",
        _page(f'<p><span style="font-size:0">To unsubscribe</span> <a href="{PLAIN_URL}">click here</a></p>'),
        _page(f'<p><span style="font-size:12px">To unsubscribe</span> <a href="{PLAIN_URL}">click here</a></p>'),
    ),
]

#: Styles that look like hiding but leave the link visible, as mail templates use them.
VISIBLE_ANYWAY = [
    (
        "font-size-zero-wrapper-reset-by-child",  # the inline-block white-space fix of responsive templates
        _page(f'<td style="font-size:0"><div style="font-size:14px">{LINK}</div></td>'),
    ),
    (
        "visibility-visible-inside-hidden",
        _page(f'<div style="visibility:hidden"><p style="visibility:visible">{LINK}</p></div>'),
    ),
    (
        "hidden-only-on-narrow-screens",
        f"<style>@media (max-width:480px) {{ .f {{ display:none }} }}</style>{_page(f'<p class=f>{LINK}</p>')}",
    ),
    ("link-keeps-its-own-colour-inside-white-font", _page(f'<font color="white">{LINK}</font>')),
    (
        "white-text-on-a-button-background-image",
        _page(
            f'<table><tr><td background="https://cdn.example/b.png"><a href="{URL}" style="color:#fff">Unsubscribe</a></td></tr></table>'
        ),
    ),
    (
        "white-on-dark-button",
        _page(f'<a href="{URL}" style="color:#fff;background-color:#0a58ca;padding:8px">Unsubscribe</a>'),
    ),
    ("hover-rule-does-not-apply", f"<style>a:hover {{ display:none }}</style>{_page(LINK)}"),
    ("url-written-in-text", _page(f"<p>To stop these mails: {URL}</p>")),
    # opt-out wording a reader understands, on an unsubscribe URL (tests/fixtures holdout de-04)
    ("opt-out-words-on-an-unsubscribe-url", _page(f'<p><a href="{URL}">Keine Einladungen mehr erhalten</a></p>')),
    ("link-that-shows-its-url", _page(f'<p><a href="{URL}">{URL}</a></p>')),
]


@dataclass(frozen=True)
class Phrasing:
    id: str
    html: str
    found: bool


def _say(sentence: str) -> str:
    """A sentence with {here} for the link; the link's URL says nothing."""
    return _page("<p>" + sentence.format(here=f'<a href="{PLAIN_URL}">{{}}</a>') + "</p>")


SPLIT_VERBS = [
    # Dutch separable verbs: af·melden, uit·schrijven, in any order and inflection
    Phrasing("nl-meld-je-hier-af", _say("Geen nieuwsbrief meer? Meld je {here} af.").format("hier"), True),
    Phrasing("nl-af-te-melden", _say("Klik {here} om je af te melden voor de nieuwsbrief.").format("hier"), True),
    Phrasing("nl-meldt-u-zich-af", _say("Meldt u zich {here} voor onze e-mails af.").format("hier"), True),
    Phrasing("nl-schrijft-u-zich-uit", _say("Schrijft u zich {here} voor de nieuwsbrief uit.").format("hier"), True),
    Phrasing("nl-uit-te-schrijven", _say("Klik {here} om je uit te schrijven.").format("hier"), True),
    # German: ab·melden, aus·tragen, ab·bestellen; zu-infinitives
    Phrasing("de-melden-sie-sich-ab", _say("Melden Sie sich {here} vom Newsletter ab.").format("hier"), True),
    Phrasing("de-abzumelden", _say("Klicken Sie {here}, um sich vom Newsletter abzumelden.").format("hier"), True),
    Phrasing("de-tragen-sie-sich-aus", _say("Tragen Sie sich {here} aus unserem Verteiler aus.").format("hier"), True),
    Phrasing("de-auszutragen", _say("Um sich auszutragen, klicken Sie {here}.").format("hier"), True),
    Phrasing("de-bestellen-ab", _say("Bestellen Sie den Newsletter {here} ab.").format("hier"), True),
    # English, French, Spanish: the same idea where those languages split or inflect the verb
    Phrasing("en-take-yourself-off", _say("Take yourself off our mailing list {here}.").format("here"), True),
    Phrasing("en-opt-yourself-out", _say("Opt yourself out {here}.").format("here"), True),
    Phrasing("fr-desabonnez-vous", _say("Désabonnez-vous {here}.").format("ici"), True),
    Phrasing(
        "fr-retirez-de-la-liste", _say("Retirez votre adresse de notre liste de diffusion {here}.").format("ici"), True
    ),
    Phrasing("es-darte-aqui-de-baja", _say("Puedes darte {here} de baja.").format("aquí"), True),
    Phrasing("es-cancela-tu-suscripcion", _say("Cancela {here} tu suscripción.").format("aquí"), True),
    Phrasing("es-desuscribete", _say("Desuscríbete {here}.").format("aquí"), True),
    # not a way out: log out, sign up, or the words around a link that is not a "here"
    Phrasing("nl-meld-je-af-van-je-account", _say("Meld je {here} af van je account.").format("hier"), False),
    Phrasing("de-melden-sie-sich-an", _say("Melden Sie sich {here} an.").format("hier"), False),
    Phrasing("nl-schrijf-je-in", _say("Schrijf je {here} in voor de nieuwsbrief.").format("hier"), False),
    Phrasing(
        "nl-split-words-around-a-named-link",
        _say("Schrijf je in en lees {here} uit de krant.").format("ons artikel"),
        False,
    ),
]
