"""visible_recipients: mass mail must not show everyone's address to everyone.

A message whose To and Cc show many external addresses hands each recipient the others'
personal data (AVG/GDPR art. 5(1)(f) and 32; the Dutch DPA treats an open recipient list
as a data breach). The count is the number of distinct addr-specs over every To and Cc
field (group members included, ``undisclosed-recipients:;`` empty, case ignored), as
``ParsedMessage.visible_recipients`` parses them; addresses in ``internal_domains`` do not
count. Bcc is never visible; Resent-*, From and Reply-To are not recipient lists.

Above the limit of the message's class the policy either refuses the message (``550
5.7.1``, telling the sender to use Bcc) or, with ``remedy: split``, accepts it and asks the
proxy to deliver one copy per recipient that shows only that recipient.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from policies.base import MESSAGE_CLASSES, MessageEdit, Policy, Transaction, Verdict
from policies.message import Address, ParsedMessage
from proxy.schema import doc

__all__ = ("RecipientCount", "VisibleRecipientsPolicy", "count_visible_recipients")


@dataclass(frozen=True, slots=True)
class RecipientCount:
    visible: int  # distinct addresses in To and Cc
    external: int  # of which outside the internal domains

    @property
    def internal(self) -> int:
        return self.visible - self.external


def _ascii_domain(domain: str) -> str:
    """A domain in its ASCII (IDNA) form, label by label, so both spellings compare equal;
    glob characters and labels IDNA refuses are kept as they are."""
    labels = []
    for label in domain.strip().rstrip(".").lower().split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(label.encode("idna").decode("ascii"))
        except UnicodeError:
            labels.append(label)
    return ".".join(labels)


def _is_internal(address: Address, internal_globs: Iterable[str]) -> bool:
    domain = _ascii_domain(address.domain)
    return any(fnmatch.fnmatchcase(domain, glob) for glob in internal_globs)


def count_visible_recipients(message: ParsedMessage, internal_domains: Iterable[str] = ()) -> RecipientCount:
    """Distinct To/Cc addresses, and how many are external. Blocking: a To field with
    thousands of addresses takes seconds to parse (reliability anchors C11)."""
    globs = [_ascii_domain(g) for g in internal_domains]
    addresses = message.visible_recipients
    external = sum(1 for a in addresses if not _is_internal(a, globs)) if globs else len(addresses)
    return RecipientCount(len(addresses), external)


_REPLY = {
    "en": "Message shows {count} external {recipients} in To/Cc (limit {limit}); "
    "put them in Bcc or send one message each",
    "nl": "Bericht toont {count} externe {ontvangers} in Aan/Cc (maximaal {limit}); "
    "zet ze in Bcc of stuur ieder een eigen bericht",
}


def _recipients(count: int) -> str:
    return "recipient" if count == 1 else "recipients"


class VisibleRecipientsPolicy(Policy):
    name = "visible_recipients"
    description = "no mass mail that shows every external recipient in To/Cc (AVG/GDPR); Bcc or one copy each"
    default_classes = MESSAGE_CLASSES

    @dataclass(frozen=True)
    class Options:
        max_visible: int = doc("most external addresses To and Cc may show together", default=10)
        max_visible_by_class: dict[str, int] = doc(
            "a different limit per message class, e.g. {commercial: 1}", default_factory=dict
        )
        internal_domains: tuple[str, ...] = doc(
            "domains whose addresses do not count (globs: example.com, *.example.com)", default=()
        )
        remedy: Literal["reject", "split"] = doc(
            "above the limit: reject (550, use Bcc) or split (deliver one copy per recipient)", default="reject"
        )
        language: Literal["en", "nl", "both"] = doc("language of the reply text", default="both")

        def __post_init__(self) -> None:
            if self.max_visible < 0:
                raise ValueError("max_visible must not be negative")
            for message_class, limit in self.max_visible_by_class.items():
                if message_class not in MESSAGE_CLASSES:
                    raise ValueError(
                        f"max_visible_by_class: unknown class {message_class!r}; known: {', '.join(MESSAGE_CLASSES)}"
                    )
                if limit < 0:
                    raise ValueError(f"max_visible_by_class.{message_class} must not be negative")
            for glob in self.internal_domains:
                if not glob.strip() or "@" in glob:
                    raise ValueError(f"internal_domains: {glob!r} is not a domain glob (e.g. example.com)")

    async def check_message(self, txn: Transaction) -> Verdict | None:
        message = txn.message
        if message is None:
            return None
        options: VisibleRecipientsPolicy.Options = self.options
        count = await asyncio.to_thread(count_visible_recipients, message, options.internal_domains)
        limit = options.max_visible_by_class.get(txn.message_class or "", options.max_visible)
        evidence = {
            "visible": count.visible,
            "external": count.external,
            "limit": limit,
            "class": txn.message_class,
        }
        if count.external <= limit:
            return Verdict.accept(
                f"{count.external} external {_recipients(count.external)} visible (limit {limit})", evidence=evidence
            )
        reason = f"{count.external} external {_recipients(count.external)} visible in To/Cc, limit {limit}"
        if options.remedy == "split":
            return Verdict.accept(
                f"{reason}; delivering one copy per recipient",
                evidence={**evidence, "remedy": "split"},
                edit=MessageEdit(split_per_recipient=True),
            )
        return Verdict.reject(reason, self._text(count.external, limit), evidence=evidence)

    def _text(self, count: int, limit: int) -> str:
        language = self.options.language
        english = _REPLY["en"].format(count=count, limit=limit, recipients=_recipients(count))
        dutch = _REPLY["nl"].format(count=count, limit=limit, ontvangers="ontvanger" if count == 1 else "ontvangers")
        if language == "en":
            return english
        if language == "nl":
            return dutch
        return f"{english} / NL: {dutch}"
