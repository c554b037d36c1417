"""Keeping erased addresses out of reports.

The audit log keeps what it recorded for its own retention (``audit.keep``): it is the
operator's append-only record of what was decided, and is not rewritten. A report built from it
after an erasure must not bring the address back, so every address in a report (in a reply, a
detail, a subject) is checked against the store's tombstones: the keyed hash of an address
that was erased is one of them, and such an address is written as ``[erased]``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from proxy.stores.consent_events import ERASED_PREFIX, ConsentInputError, erasure_subject, parse_subject

__all__ = ("ERASED_TEXT", "Redactor", "tombstone_of")

ERASED_TEXT = "[erased]"

# Wide on purpose: anything shaped like an address is tested (a miss would show the address,
# a wrong hit only costs an HMAC).
_ADDRESS = re.compile(r"[^\s<>\"'(),;:\[\]@]+@[^\s<>\"'(),;:\[\]@]+")


@functools.lru_cache(maxsize=65536)
def tombstone_of(key: bytes, address: str) -> str | None:
    """The tombstone subject an erasure of ``address`` wrote (None: not an address)."""
    try:
        subject = parse_subject(address.strip().rstrip("."))
    except ConsentInputError:
        return None
    return erasure_subject(key, subject.value) if subject.kind == "address" else None


class Redactor:
    """Replaces erased addresses in a report's data (dicts, lists, strings)."""

    def __init__(self, key: bytes | None, tombstones: Iterable[str]) -> None:
        self.key = key
        self.tombstones = {t for t in tombstones if t.startswith(ERASED_PREFIX)}

    @property
    def active(self) -> bool:
        return self.key is not None and bool(self.tombstones)

    def erased(self, address: str) -> bool:
        if self.key is None:
            return False
        return tombstone_of(self.key, address.lower()) in self.tombstones

    def text(self, value: str) -> str:
        if "@" not in value:
            return value
        return _ADDRESS.sub(lambda m: ERASED_TEXT if self.erased(m.group(0)) else m.group(0), value)

    def scrub(self, value: Any) -> Any:
        if not self.active:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value
