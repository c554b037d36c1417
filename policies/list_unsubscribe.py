"""list_unsubscribe: every commercial message gets its recipient's own RFC 8058 one-click headers.

For each recipient the policy asks for::

    List-Unsubscribe: <https://unsubscribe.example.com/u/TOKEN>, <mailto:unsubscribe@…?subject=unsubscribe%20TOKEN>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

The https URI comes first: Gmail uses the first URI (Mautic #13407 reordered for this), and
RFC 8058 section 3.1 requires an https URI for one-click. The TOKEN names that recipient, the
sender (the From domain) and the topic, sealed (proxy/unsubscribe/tokens.py), so each
recipient needs a copy of their own: the verdict carries ``MessageEdit(per_recipient=…)``,
and the proxy then delivers one copy per recipient, each in its own upstream transaction, and
DKIM-signs each copy after these fields are added, so the signature covers them (RFC 8058
section 4; a relay that adds them after signing breaks one-click).

How the copies' outcomes reach the client (proxy/smtp.py ``_deliver_copies``): the client
still sees one reply for its one DATA.

* every copy refused: the client gets the refusal (4xx when any copy was refused only
  temporarily), so it keeps the message and retries as usual;
* some copies delivered: the client gets ``250`` (a 4xx would make it send the delivered
  copies again), and the refused recipients are reported to the envelope sender in a DSN
  (RFC 3464), never to a null sender.

Options:

* ``existing_header``: ``keep`` (default) leaves a message that already has a
  List-Unsubscribe alone (the sender runs its own list manager); ``replace`` removes the
  sender's List-Unsubscribe and List-Unsubscribe-Post and adds sendguard's. (Not called
  ``mode``: that key is every policy's enforce/monitor switch.)
* ``topic_header`` (default ``X-Sendguard-Topic``, the header the consent policy reads) and
  ``default_topic``: the topic the token names, so an opt-out covers that topic only. The
  header is an instruction to sendguard and is removed before relaying.

Needs ``resources["unsubscribe"]``: the ``UnsubscribeService`` opened from the config's
``unsubscribe:`` section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from policies.base import MessageEdit, Policy, PolicyError, Transaction, Verdict
from policies.consent import message_sender
from proxy.schema import doc
from proxy.stores.consent import ConsentInputError, normalize_topic, parse_subject

__all__ = ("ListUnsubscribePolicy", "footer_edit", "message_sender", "message_topic")

_FIELDS = ("List-Unsubscribe", "List-Unsubscribe-Post")


def message_topic(txn: Transaction, header: str | None, default: str) -> str:
    """The topic named by ``header`` when it names exactly one valid topic, else ``default``.
    (The consent policy refuses a message naming several or an invalid one; this policy only
    labels the link.)"""
    if header is None or txn.message is None:
        return default
    values = {v.strip().lower() for v in txn.message.header_values(header) if v.strip()}
    if len(values) != 1:
        return default
    try:
        return normalize_topic(values.pop())
    except ConsentInputError:
        return default


def footer_edit(service: Any, txn: Transaction, topic: str) -> MessageEdit | None:
    """Each recipient's own unsubscribe footer (``MessageEdit.per_recipient_footer``), for a
    message that lacks a visible unsubscribe link; None when no part of the message can carry
    it (no text/plain or text/html a reader sees) or no recipient is an address.

    Blocking (it walks the message's MIME structure): call it from a thread.
    """
    from proxy.unsubscribe.footer import readable_part_count

    if txn.message is None or readable_part_count(txn.message.raw) == 0:
        return None
    sender = message_sender(txn)
    footers: dict[str, tuple[str, str]] = {}
    for recipient in txn.recipients:
        try:
            parse_subject(recipient)
        except ConsentInputError:
            continue
        footers[recipient] = service.footer(recipient, sender, topic)
    return MessageEdit(per_recipient_footer=footers) if footers else None


class ListUnsubscribePolicy(Policy):
    name = "list_unsubscribe"
    description = "adds each recipient's RFC 8058 one-click List-Unsubscribe headers to commercial mail"
    default_classes = ("commercial",)
    needs = ("unsubscribe",)

    @dataclass(frozen=True)
    class Options:
        existing_header: Literal["keep", "replace"] = doc(
            "a message with its own List-Unsubscribe: keep it as it is, or replace it with sendguard's",
            default="keep",
        )
        topic_header: str | None = doc(
            "header naming the message's topic (removed before relaying); null: every message has default_topic",
            default="X-Sendguard-Topic",
        )
        default_topic: str = doc("topic of a message that names none; * means all topics", default="*")

        def __post_init__(self) -> None:
            object.__setattr__(self, "default_topic", normalize_topic(self.default_topic))
            if self.topic_header is not None and not re.fullmatch(r"[!-9;-~]+", self.topic_header):
                raise ValueError(f"topic_header {self.topic_header!r} is not a header field name")

    @classmethod
    def headers_added(cls, options: Any) -> tuple[str, ...]:
        return ("List-Unsubscribe", "List-Unsubscribe-Post")

    @classmethod
    def instruction_headers(cls, options: Any) -> tuple[str, ...]:
        return (options.topic_header,) if options.topic_header else ()

    @classmethod
    def personal_edits(cls, options: Any) -> bool:
        return True  # each recipient's own token

    async def check_message(self, txn: Transaction) -> Verdict | None:
        message = txn.message
        if message is None:
            return None
        options: ListUnsubscribePolicy.Options = self.options
        service = self.resources.get("unsubscribe")
        if service is None:
            raise PolicyError("list_unsubscribe needs the unsubscribe: section of the config (enabled, keys, base_url)")
        if options.existing_header == "keep" and message.has_header("List-Unsubscribe"):
            return Verdict.accept(
                "the message has its own List-Unsubscribe; left as it is (existing_header: keep)",
                evidence={"existing_header": "keep", "kept": message.raw_header_values("List-Unsubscribe")[0][:200]},
            )
        sender = message_sender(txn)
        topic = message_topic(txn, options.topic_header, options.default_topic)
        per_recipient: dict[str, tuple[tuple[str, str], ...]] = {}
        skipped: list[str] = []
        for recipient in txn.recipients:
            try:
                parse_subject(recipient)
            except ConsentInputError:
                skipped.append(recipient)  # no consent can be recorded for it, so no link either
                continue
            per_recipient[recipient] = service.list_unsubscribe(recipient, sender, topic)
        evidence: dict[str, Any] = {
            "existing_header": options.existing_header,
            "sender": sender,
            "topic": topic,
            "recipients": len(per_recipient),
            "key_id": service.codec.issuing_key.id,
        }
        if skipped:
            evidence["skipped"] = skipped[:10]
        if not per_recipient:
            return Verdict.accept("no recipient can take an unsubscribe link", evidence=evidence)
        # Both fields go: in replace mode the sender's own, otherwise a stray List-Unsubscribe-Post
        # without a List-Unsubscribe (a second one would break RFC 8058's "exactly one").
        return Verdict.accept(
            f"one-click unsubscribe links added for {len(per_recipient)} recipient(s) (topic {topic})",
            evidence=evidence,
            edit=MessageEdit(remove=_FIELDS, per_recipient=per_recipient),
        )
