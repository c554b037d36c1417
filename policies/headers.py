"""required_headers: the header rules of RFC 5322 section 3.6 that receivers rely on.

* ``From`` and ``Date`` are the only required fields (section 3.6). A missing ``Date`` or
  ``Message-ID`` may be added by a submission server (RFC 6409 section 8); by default this
  policy adds them instead of refusing the message, as Postfix does for local clients.
* ``From`` must hold at least one address; with several, ``Sender`` is required (3.6.2).
* Fields that may occur at most once (the table in 3.6) must not repeat: two ``To`` fields
  are a classic way to show one recipient list and deliver to another.
"""

from __future__ import annotations

import email.utils
import uuid
from dataclasses import dataclass, field

from policies.base import MessageEdit, Policy, Transaction, Verdict

__all__ = ("RequiredHeadersPolicy",)

#: RFC 5322 section 3.6: fields with a maximum of one occurrence.
SINGLE_OCCURRENCE = (
    "Date", "From", "Sender", "Reply-To", "To", "Cc", "Bcc",
    "Message-ID", "In-Reply-To", "References", "Subject",
)  # fmt: skip


class RequiredHeadersPolicy(Policy):
    name = "required_headers"
    description = "From and Date present, From parseable, single-occurrence fields not repeated (RFC 5322 3.6)"

    @dataclass(frozen=True)
    class Options:
        require: tuple[str, ...] = field(default=("From", "Date"))
        add_missing: tuple[str, ...] = field(default=("Date", "Message-ID"))
        reject_duplicates: bool = True

        def __post_init__(self) -> None:
            addable = {"date", "message-id"}
            for name in self.add_missing:
                if name.lower() not in addable:
                    raise ValueError(f"add_missing can add Date and Message-ID only, not {name!r}")

    async def check_message(self, txn: Transaction) -> Verdict | None:
        message = txn.message
        if message is None:
            return None
        options: RequiredHeadersPolicy.Options = self.options
        additions: list[tuple[str, str]] = []

        for name in options.require:
            if message.has_header(name):
                continue
            if name.lower() in {n.lower() for n in options.add_missing}:
                additions.append((name, _generated_value(name, txn)))
                continue
            return Verdict.reject(
                f"missing {name} header",
                f"Message has no {name}: header (RFC 5322 section 3.6); add one and send again",
                status="5.6.0",
            )
        for name in options.add_missing:
            if not message.has_header(name) and name.lower() not in {a[0].lower() for a in additions}:
                additions.append((name, _generated_value(name, txn)))

        if message.has_header("From"):
            senders = message.addresses("From")
            if not senders:
                return Verdict.reject(
                    "From header holds no valid address",
                    "The From: header holds no valid address (RFC 5322 section 3.6.2); "
                    "write it as Name <user@example.com>",
                    status="5.6.0",
                )
            if len(senders) > 1 and not message.has_header("Sender"):
                return Verdict.reject(
                    "several From addresses without Sender",
                    "The From: header names several authors but there is no Sender: header "
                    "(RFC 5322 section 3.6.2); add Sender: with the address that sent it",
                    status="5.6.0",
                )

        if options.reject_duplicates:
            counts: dict[str, int] = {}
            for header_name in message.header_names:
                counts[header_name.lower()] = counts.get(header_name.lower(), 0) + 1
            repeated = [n for n in SINGLE_OCCURRENCE if counts.get(n.lower(), 0) > 1]
            if repeated:
                return Verdict.reject(
                    f"repeated header fields: {', '.join(repeated)}",
                    f"Header field {repeated[0]}: appears more than once (RFC 5322 section 3.6 allows one); "
                    "merge the fields into one",
                    status="5.6.0",
                )

        if additions:
            return Verdict.accept(
                "added " + ", ".join(name for name, _ in additions),
                edit=MessageEdit(add=tuple(additions)),
            )
        return Verdict.accept()


def _generated_value(name: str, txn: Transaction) -> str:
    if name.lower() == "date":
        return email.utils.formatdate(localtime=False)
    domain = "sendguard.invalid"
    if txn.message is not None:
        senders = txn.message.addresses("From")
        if senders and "@" in senders[0].addr_spec:
            domain = senders[0].addr_spec.rsplit("@", 1)[1]
    elif "@" in txn.mail_from:
        domain = txn.mail_from.rsplit("@", 1)[1]
    return f"<{uuid.uuid4().hex}@{domain}>"
