"""Delivery status notifications (RFC 3464) for copies that could not be delivered.

sendguard relays in lockstep, so it normally never bounces: the client keeps its message
until the upstream takes it. The exception is a message delivered as one copy per recipient
(``split_per_recipient``): when some copies were accepted and others refused, the client's
single DATA reply cannot say so, and answering 451 would duplicate the delivered copies.
Like any MTA after accepting a message, sendguard then answers 250, retries the copies
refused for now from its queue (``proxy.relay.spool``) and reports the copies refused for
good, or for too long, to the envelope sender in a DSN, so nothing is lost silently.
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from email.message import EmailMessage

from policies.base import Reply
from policies.message import split_header_block

__all__ = ("build_dsn",)


def build_dsn(
    *,
    reporting_host: str,
    sender: str,
    original: bytes,
    failures: Sequence[tuple[str, Reply]],
    txn_id: str,
) -> bytes:
    """A multipart/report DSN to ``sender`` listing each failed recipient with the upstream's reply."""
    report = EmailMessage()
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_host}>"
    report["To"] = sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(localtime=False)
    report["Message-ID"] = email.utils.make_msgid(idstring=txn_id, domain=reporting_host)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: never answer this automatically
    lines = [
        f"This is the mail system at {reporting_host} (sendguard, transaction {txn_id}).",
        "",
        "Your message was delivered as one copy per recipient. The copies for the",
        "recipients below were refused by the mail server (for good, or for longer",
        "than this system retries), so they were not delivered:",
        "",
        *(f"  <{recipient}>: {reply.line()}" for recipient, reply in failures),
    ]
    report.set_content("\n".join(lines) + "\n")
    report.make_mixed()
    report.replace_header("Content-Type", 'multipart/report; report-type="delivery-status"')

    fields = [f"Reporting-MTA: dns; {reporting_host}", f"X-Sendguard-Transaction: {txn_id}", ""]
    for recipient, reply in failures:
        fields += [
            f"Final-Recipient: rfc822; {recipient}",
            "Action: failed",
            f"Status: {reply.status if reply.code >= 500 else '5' + reply.status[1:]}",
            f"Diagnostic-Code: smtp; {reply.code} {reply.status} {reply.text}",
            "",
        ]
    # The email package models message/delivery-status as a list of header blocks; build it
    # from text so each block is exactly the fields above.
    blocks = "\n".join(fields).strip().split("\n\n")
    status = EmailMessage()
    status["Content-Type"] = "message/delivery-status"
    status.set_payload([email.message_from_string(block + "\n") for block in blocks])
    report.attach(status)

    header_block, _ = split_header_block(original)
    headers = EmailMessage()
    # set_content picks a transfer encoding for 8-bit header bytes (RFC 6532 headers, or a
    # raw Latin-1 subject), which a plain payload would fail to serialise.
    headers.set_content(header_block.decode("utf-8", "replace"), subtype="rfc822-headers", cte="quoted-printable")
    report.attach(headers)
    return report.as_bytes(policy=report.policy.clone(linesep="\r\n"))
