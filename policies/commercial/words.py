"""The word lists of the commercial-mail detector: loading (``words.yaml``, a words file,
extra entries from the config), validation, and finding entries in folded text.

Text is split into words with one ``str.translate`` and ``split`` (both in C); an entry of
several words is looked up as an n-gram, built only from words that begin some entry; entries
with a "*" (compounds: "kortings*", "*rabatt") are found with ``str.find``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from policies.unsubscribe import fold
from policies.wordfiles import load_yaml, read_yaml_file

__all__ = ("WORD_LISTS", "WordLists", "default_word_lists", "find", "load_word_lists", "tokens")

#: Word lists of ``words.yaml``, in that file's order.
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

#: Words a reference number follows ("order 100-4471", "Bestellnummer: 20458", "n° de commande").
REFERENCE_WORDS = frozenset(
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


def _word_table() -> dict[int, str]:
    """Case and accents folded (as ``fold``), and every character that is not a letter or
    digit made a space, so that splitting on white space gives the words ("op=op" and
    "op = op" are both "op op")."""
    table: dict[int, str] = {}
    for code in range(0x3000):
        char = chr(code)
        folded = fold(char)
        if not folded.isalnum():
            table[code] = " "
        elif folded != char:
            table[code] = folded
    return table


_WORDS = _word_table()


def tokens(text: str) -> list[str]:
    """The words of ``text``, folded: one ``str.translate`` and one ``split``, both in C (a
    regular expression costs ten times more)."""
    return text.translate(_WORDS).split()


@dataclass(frozen=True)
class WordLists:
    """Entries per word list, language by language, ready for look-up.

    ``phrases`` maps a tuple of folded tokens to the (list, language) pairs it belongs to;
    ``stems`` holds the single-word entries with a "*".
    """

    entries: Mapping[str, Mapping[str, frozenset[str]]]  # language -> list -> entries
    phrases: Mapping[tuple[str, ...], tuple[tuple[str, str], ...]] = field(init=False, repr=False, compare=False)
    #: Every beginning of every entry (token tuples): a longer n-gram is built only after one.
    beginnings: frozenset[tuple[str, ...]] = field(init=False, repr=False, compare=False)
    #: Every token worth a look: the first tokens of entries and the reference words.
    start_set: frozenset[str] = field(init=False, repr=False, compare=False)
    #: The "*" entries: (stem, True for "stem*" / False for "*stem", its (list, language) pairs).
    stems: tuple[tuple[str, bool, tuple[tuple[str, str], ...]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        phrases: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        stems: dict[tuple[str, bool], list[tuple[str, str]]] = {}
        for language, lists in self.entries.items():
            for name, entries in lists.items():
                for entry in entries:
                    key = (name, language)
                    folded = fold(entry.strip())
                    if folded.endswith("*") != folded.startswith("*"):  # one "*", at one end
                        stems.setdefault((folded.strip("*"), folded.endswith("*")), []).append(key)
                    elif phrase := tuple(tokens(folded)):
                        phrases.setdefault(phrase, []).append(key)
        object.__setattr__(self, "phrases", {k: tuple(v) for k, v in phrases.items()})
        object.__setattr__(self, "beginnings", frozenset(p[:n] for p in phrases for n in range(1, len(p) + 1)))
        object.__setattr__(self, "start_set", frozenset(p[0] for p in phrases) | REFERENCE_WORDS)
        object.__setattr__(self, "stems", tuple((stem, prefix, tuple(keys)) for (stem, prefix), keys in stems.items()))

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
        """Build from the structure of ``words.yaml``; ValueError names the fault."""
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
                    if "*" in stripped.strip("*") or ("*" in stripped and len(tokens(fold(stripped))) != 1):
                        raise ValueError(f"{where}: {entry!r}: a '*' belongs at the start or end of one word")
                out[str(language)][str(name)] = frozenset(e.strip() for e in entries)
        return cls(out)


def _read_words_file(path: str | Path) -> WordLists:
    return WordLists.from_mapping(read_yaml_file(path), str(path))


@functools.cache  # immutable: every config build shares the shipped lists, parsed once
def default_word_lists() -> WordLists:
    text = resources.files("policies.commercial").joinpath("words.yaml").read_text(encoding="utf-8")
    return WordLists.from_mapping(load_yaml(text), "words.yaml")


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


def find(words: WordLists, text: str) -> tuple[dict[str, set[tuple[str, str]]], str]:
    """(entry, language) pairs found per word list, and the first reference number
    ("bestelnummer 2024-88113"). Python looks only at words_in_text that start an entry or name a
    reference; entries with a "*" are found with ``str.find``."""
    words_in_text = tokens(text)
    phrases, beginnings = words.phrases, words.beginnings
    found: dict[str, set[tuple[str, str]]] = {}
    reference = ""
    count = len(words_in_text)
    wanted = words.start_set
    seen: set[tuple[str, ...]] = set()  # n-grams already recorded ("shop now" x 80)
    for index in [i for i, token in enumerate(words_in_text) if token in wanted]:
        word = words_in_text[index]
        if not reference and word in REFERENCE_WORDS:
            reference = _reference_after(words_in_text, index)
        key: tuple[str, ...] = (word,)
        size = 1
        while True:
            if key not in seen:
                seen.add(key)
                for name, language in phrases.get(key, ()):
                    found.setdefault(name, set()).add((" ".join(key), language))
            if index + size >= count:
                break
            key = (*key, words_in_text[index + size])
            size += 1
            if key not in beginnings:
                break
    for stem, is_prefix, keys in words.stems:
        start = text.find(stem)
        while start != -1:
            end = start + len(stem)
            if is_prefix:
                word_end = _word_end(text, end)
                if (start == 0 or not text[start - 1].isalnum()) and word_end > end:
                    for name, language in keys:
                        found.setdefault(name, set()).add((stem + "*", language))
            else:
                word_start = _word_start(text, start)
                if (end == len(text) or not text[end].isalnum()) and word_start < start:
                    for name, language in keys:
                        found.setdefault(name, set()).add(("*" + stem, language))
            start = text.find(stem, end)
    return found, reference
