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
import re
from collections.abc import Iterable, Sequence
from email.message import EmailMessage

from policies.base import Reply
from policies.message import split_header_block

__all__ = (
    "DSNParameterError",
    "build_dsn",
    "dsn_parameters",
    "notify_failure",
    "split_options",
    "xtext_decode",
    "xtext_encode",
)

# ---- the DSN parameters of MAIL and RCPT (RFC 3461) -------------------------------------------

MAIL_PARAMETERS = ("RET", "ENVID")
RCPT_PARAMETERS = ("NOTIFY", "ORCPT")
DSN_PARAMETERS = MAIL_PARAMETERS + RCPT_PARAMETERS
#: RFC 3461 4: xtext is printable ASCII but "+" and "=", and "+" with two upper-case hex digits.
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 3461 4.2: an atom, "rfc822", "utf-8"
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")


_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


def xtext_decode(value: str) -> str:
    """RFC 3461 4 xtext to text (``+XX`` as its byte; lower-case hex digits are read too, as
    Postfix does). Raises ValueError on anything else that is not xtext: a stray ``+``, an
    ``=``, a space or a control character."""
    if not value or not _XTEXT.match(_XTEXT_HEX.sub("+00", value)):
        raise ValueError(value)
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    """Text to RFC 3461 4 xtext: every byte of its UTF-8 outside ``!``..``~``, and ``+`` and
    ``=``, as ``+XX``."""
    return "".join(
        chr(byte) if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D) else f"+{byte:02X}"
        for byte in value.encode("utf-8")
    )


class DSNParameterError(ValueError):
    """A DSN parameter the client got wrong; ``reply`` says what (501 or 555, 5.5.4)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.line())
        self.reply = reply


def _bad(text: str, code: int = 501) -> DSNParameterError:
    return DSNParameterError(Reply(code, "5.5.4", text))


def dsn_parameters(raw: Iterable[str], command: str) -> list[str]:
    """The DSN parameters among a MAIL (``command`` "MAIL") or RCPT command's parameters as the
    client wrote them, checked (RFC 3461 4.1-4.4) and with keywords in upper case; the values
    of ENVID and ORCPT keep their case (they are the sender's own identifiers). Raises
    ``DSNParameterError``."""
    allowed = MAIL_PARAMETERS if command == "MAIL" else RCPT_PARAMETERS
    seen: set[str] = set()
    out: list[str] = []
    for parameter in raw:
        keyword, _, value = parameter.partition("=")
        keyword = keyword.upper()
        if keyword not in DSN_PARAMETERS:
            continue
        if keyword not in allowed:
            raise _bad(f"{keyword} is not a {command} parameter (RFC 3461)", 555)
        if keyword in seen:
            raise _bad(f"{keyword} given twice (RFC 3461)")
        seen.add(keyword)
        if keyword == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                raise _bad("RET must be FULL or HDRS (RFC 3461 4.3)")
            out.append(f"RET={value.upper()}")
        elif keyword == "ENVID":
            if len(value) > 100 or not _XTEXT.match(value):
                raise _bad("ENVID must be xtext of at most 100 characters (RFC 3461 4.4)")
            out.append(f"ENVID={value}")
        elif keyword == "NOTIFY":
            items = value.upper().split(",")
            if items != ["NEVER"] and (len(set(items)) != len(items) or not all(i in _NOTIFY for i in items)):
                raise _bad("NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY joined by commas (RFC 3461 4.1)")
            out.append(f"NOTIFY={','.join(items)}")
        else:  # ORCPT
            addr_type, semicolon, address = value.partition(";")
            if len(value) > 500 or not semicolon or not _ADDR_TYPE.match(addr_type) or not _XTEXT.match(address):
                raise _bad("ORCPT must be addr-type;xtext of at most 500 characters (RFC 3461 4.2)")
            out.append(f"ORCPT={addr_type};{address}")
    return out


def split_options(options: Iterable[str]) -> tuple[list[str], list[str]]:
    """One list of parameters (as a queued copy keeps them) split into MAIL's and RCPT's: the
    RCPT ones are NOTIFY and ORCPT, names no MAIL parameter has."""
    mail: list[str] = []
    rcpt: list[str] = []
    for option in options:
        (rcpt if option.partition("=")[0].upper() in RCPT_PARAMETERS else mail).append(option)
    return mail, rcpt


def notify_failure(options: Iterable[str]) -> bool:
    """Whether the sender wants to hear of a failure for this recipient: yes unless NOTIFY says
    NEVER or leaves FAILURE out (RFC 3461 4.1; without NOTIFY, failures are reported)."""
    for option in options:
        keyword, _, value = option.partition("=")
        if keyword.upper() == "NOTIFY":
            return "FAILURE" in value.upper().split(",")
    return True


# ---- the report -------------------------------------------------------------------------------


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
