"""visible_recipients: mass mail must not show everyone's address to everyone.

A message whose To and Cc show many external addresses hands each recipient the others'
personal data (AVG/GDPR art. 5(1)(f) and 32; the Dutch DPA treats an open recipient list
as a data breach). The count is what a mail client shows, as
``ParsedMessage.visible_recipients`` reads it: the distinct addresses (compared by
``proxy.addresses.address_key``) of every To, Cc, Resent-To and Resent-Cc field (group
members included, ``undisclosed-recipients:;`` empty, ``To :`` with the obsolete space
before the colon included), and the addresses written in those fields' display names,
comments and bare encoded-words (``"a@x.example, b@y.example" <list@z.example>`` shows
three). Those written addresses are exposed personal data, so they count, but they are
never recipients: nothing is sent to them. Addresses in ``internal_domains`` do not count.
Bcc is never visible; From and Reply-To are not recipient lists.

Above the limit of the message's class the policy either refuses the message (``550
5.7.1``, telling the sender to use Bcc) or, with ``remedy: split``, accepts it and asks the
proxy to deliver one copy per recipient that shows only that recipient.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from policies.base import MESSAGE_CLASSES, MessageEdit, Policy, Transaction, Verdict
from policies.message import Address, ParsedMessage
from proxy.addresses import domain_key
from proxy.schema import doc

__all__ = ("RecipientCount", "VisibleRecipientsPolicy", "count_visible_recipients")


@dataclass(frozen=True, slots=True)
class RecipientCount:
    visible: int  # distinct addresses a reader sees in To, Cc, Resent-To and Resent-Cc
    external: int  # of which outside the internal domains
    in_text: int = 0  # external ones written only in display names, comments, encoded-words
    resent: bool = False  # the message has Resent-To or Resent-Cc fields
    addressed: int = 0  # distinct mailboxes of To and Cc alone (the corpus label's count)

    @property
    def internal(self) -> int:
        return self.visible - self.external


def _is_internal(address: Address, internal_globs: Iterable[str]) -> bool:
    domain = domain_key(address.domain)
    return any(fnmatch.fnmatchcase(domain, glob) for glob in internal_globs)


def count_visible_recipients(message: ParsedMessage, internal_domains: Iterable[str] = ()) -> RecipientCount:
    """Distinct addresses a reader sees, and how many are external. Blocking: a To field
    with thousands of addresses takes seconds to parse (reliability anchors C11)."""
    # domain_key keeps glob characters ("*.corp.example") and turns IDN labels into A-labels,
    # so a glob and an address compare in one spelling.
    globs = [domain_key(g) for g in internal_domains]
    addresses = message.visible_recipients
    external = [a for a in addresses if not _is_internal(a, globs)] if globs else addresses
    return RecipientCount(
        len(addresses),
        len(external),
        in_text=sum(1 for a in external if a.in_text),
        resent=bool(message.raw_header_values("Resent-To") or message.raw_header_values("Resent-Cc")),
        addressed=len(message.header_recipients),
    )


_REPLY = {
    "en": "Message shows {count} external {recipients} in {fields} (limit {limit}); "
    "put them in Bcc or send one message each",
    "nl": "Bericht toont {count} externe {ontvangers} in {velden} (maximaal {limit}); "
    "zet ze in Bcc of stuur ieder een eigen bericht",
}
#: Said when some of the counted addresses are written in names or comments: Bcc cannot help
#: with those, the sender must take them out of the text.
_IN_TEXT = {
    "en": "; {count} of them written in display names or comments, which every reader sees: remove them",
    "nl": "; {count} daarvan staan in weergavenamen of opmerkingen, die iedere lezer ziet: haal ze weg",
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

    @classmethod
    def splits(cls, options: Any) -> str | None:
        return "remedy: split" if options.remedy == "split" else None

    async def check_message(self, txn: Transaction) -> Verdict | None:
        message = txn.message
        if message is None:
            return None
        options: VisibleRecipientsPolicy.Options = self.options
        count = await asyncio.to_thread(count_visible_recipients, message, options.internal_domains)
        limit = options.max_visible_by_class.get(txn.message_class or "", options.max_visible)
        evidence: dict[str, object] = {
            "visible": count.visible,
            "external": count.external,
            "limit": limit,
            "class": txn.message_class,
        }
        if count.in_text:
            evidence["in_text"] = count.in_text
        if count.external <= limit:
            return Verdict.accept(
                f"{count.external} external {_recipients(count.external)} visible (limit {limit})", evidence=evidence
            )
        fields = "To/Cc/Resent-To/Resent-Cc" if count.resent else "To/Cc"
        reason = f"{count.external} external {_recipients(count.external)} visible in {fields}, limit {limit}"
        if count.in_text:
            reason += f" ({count.in_text} written in display names or comments)"
        if options.remedy == "split":
            return Verdict.accept(
                f"{reason}; delivering one copy per recipient",
                evidence={**evidence, "remedy": "split"},
                edit=MessageEdit(split_per_recipient=True),
            )
        return Verdict.reject(reason, self._text(count, limit), evidence=evidence)

    def _text(self, count: RecipientCount, limit: int) -> str:
        language = self.options.language
        external = count.external
        english = _REPLY["en"].format(
            count=external,
            limit=limit,
            recipients=_recipients(external),
            fields="To/Cc/Resent-To/Resent-Cc" if count.resent else "To/Cc",
        )
        dutch = _REPLY["nl"].format(
            count=external,
            limit=limit,
            ontvangers="ontvanger" if external == 1 else "ontvangers",
            velden="Aan/Cc/Resent-To/Resent-Cc" if count.resent else "Aan/Cc",
        )
        if count.in_text:
            english += _IN_TEXT["en"].format(count=count.in_text)
            dutch += _IN_TEXT["nl"].format(count=count.in_text)
        if language == "en":
            return english
        if language == "nl":
            return dutch
        return f"{english} / NL: {dutch}"
