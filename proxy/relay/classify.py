"""Decide whether a transaction is commercial or transactional.

Order of precedence, most specific first:

1. the class header (``X-Sendguard-Class`` by default). ``commercial`` is believed from
   anyone, since it only adds checks; ``transactional`` only from trusted networks, users
   or listeners, since it removes them;
2. the first class rule that matches;
3. the configured default.

``from_envelope`` answers at MAIL time when rules that need only the envelope decide;
``from_message`` gives the final class after DATA.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass

from policies.base import Transaction
from policies.message import ParsedMessage
from proxy.config.settings import ClassesConfig, ClassRule

__all__ = ("Classification", "Classifier")


@dataclass(frozen=True, slots=True)
class Classification:
    message_class: str
    reason: str


def _glob_any(value: str, patterns: tuple[str, ...]) -> bool:
    lowered = value.lower()
    return any(fnmatch.fnmatchcase(lowered, p.lower()) for p in patterns)


class Classifier:
    def __init__(self, config: ClassesConfig) -> None:
        self.config = config
        self._matchers = [
            {name.lower(): re.compile(pattern, re.I) for name, pattern in rule.header_matches.items()}
            for rule in config.rules
        ]

    def from_envelope(self, txn: Transaction) -> Classification | None:
        """The class if envelope-only rules decide it; None when a header rule comes first."""
        for index, rule in enumerate(self.config.rules):
            if not rule.envelope_only:
                return None
            if self._envelope_matches(rule, txn):
                return Classification(rule.message_class, f"rule {index}")
        return Classification(self.config.default, "default")

    def from_message(self, txn: Transaction, message: ParsedMessage) -> Classification:
        header = self.config.header
        stated = (message.header(header.name) or "").strip().lower()
        if stated == "commercial":
            return Classification("commercial", f"{header.name} header")
        if stated == "transactional" and self._header_trusted(txn):
            return Classification("transactional", f"{header.name} header")
        for index, rule in enumerate(self.config.rules):
            if self._envelope_matches(rule, txn) and self._message_matches(index, rule, message):
                return Classification(rule.message_class, f"rule {index}")
        return Classification(self.config.default, "default")

    def _header_trusted(self, txn: Transaction) -> bool:
        header = self.config.header
        if txn.listener in header.trusted_listeners:
            return True
        if txn.auth_user and txn.auth_user in header.trusted_users:
            return True
        try:
            client = ipaddress.ip_address(txn.client_ip)
        except ValueError:
            return False
        return any(client in network for network in header.trusted_networks)

    @staticmethod
    def _envelope_matches(rule: ClassRule, txn: Transaction) -> bool:
        if rule.listeners and txn.listener not in rule.listeners:
            return False
        if rule.auth_users and (txn.auth_user or "") not in rule.auth_users:
            return False
        return not (rule.mail_from and not _glob_any(txn.mail_from, rule.mail_from))

    def _message_matches(self, index: int, rule: ClassRule, message: ParsedMessage) -> bool:
        if rule.header_from:
            senders = message.addresses("From")
            if not any(_glob_any(a.addr_spec, rule.header_from) for a in senders):
                return False
        if rule.headers_present and not any(message.has_header(name) for name in rule.headers_present):
            return False
        for name, pattern in self._matchers[index].items():
            if not any(pattern.search(value) for value in message.header_values(name)):
                return False
        return True
