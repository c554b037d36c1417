"""Every reply sendguard itself gives, in one place (RFC 5321 codes, RFC 3463 enhanced status).

Names carry the code (``R550_...``); ``tests/test_replies.py`` checks that each name's code
matches its value and that the code class agrees with the enhanced status class.
Replies that need a value (a size, a transaction id) are functions.
"""

from __future__ import annotations

from policies.base import Reply

# ---- session and relay authorization
R421_TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many connections from your address; try again later")
R421_SERVER_BUSY = Reply(421, "4.3.2", "Server busy; try again later")
R421_SHUTTING_DOWN = Reply(421, "4.3.2", "Server shutting down; try again later")
R421_SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit reached; closing connection")
R550_RELAY_DENIED = Reply(
    550,
    "5.7.1",
    "Relaying denied: your address is not allowed to send through this server; "
    "authenticate or ask the administrator to add your network",
)
R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required; log in with AUTH before MAIL")
R530_STARTTLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R538_ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for authentication; issue STARTTLS first")
R454_AUTH_BLOCKED = Reply(454, "4.7.0", "Too many failed login attempts from your address; try again later")
R535_AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
R235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R503_AUTH_NOT_OFFERED = Reply(503, "5.5.1", "AUTH is not offered on this port")

# ---- envelope
R250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R250_RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
R250_DUPLICATE_RECIPIENT = Reply(250, "2.1.5", "Duplicate recipient; the message is delivered to it once")
R250_RESET = Reply(250, "2.0.0", "Reset OK")
R501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R501_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
R501_NULL_RECIPIENT = Reply(501, "5.1.3", "The null address <> cannot receive mail")
R553_SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM")
R553_SMTPUTF8_UNSUPPORTED = Reply(
    553, "5.6.7", "The upstream mail server does not accept internationalized addresses (SMTPUTF8)"
)
R554_8BIT_UNSUPPORTED = Reply(
    554,
    "5.6.3",
    "The upstream mail server does not accept 8-bit data (8BITMIME); send the message with a 7-bit transfer encoding",
)
R452_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients for one message; send the rest in another message")

# ---- message content
R550_NUL_IN_DATA = Reply(550, "5.6.0", "Message contains NUL characters, which SMTP does not allow; remove them")
R550_BARE_NEWLINE = Reply(550, "5.6.0", "Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)")
R554_MAIL_LOOP = Reply(554, "5.4.6", "Too many Received: headers; the message is looping")
R554_UNPARSEABLE = Reply(554, "5.6.0", "Message structure cannot be parsed safely")
R550_NO_PART_FOR_FOOTER = Reply(
    550,
    "5.6.0",
    "The message has no text/plain or text/html part to add the unsubscribe link to; add a visible unsubscribe link",
)
R503_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
R503_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first; no recipient was accepted")


def r552_message_too_big(limit: int) -> Reply:
    return Reply(
        552,
        "5.3.4",
        f"Message too big: the limit is {_human_size(limit)}; send a smaller message or share large files by link",
    )


def r552_header_too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message header section exceeds {_human_size(limit)}")


def r500_line_too_long(limit: int) -> Reply:
    return Reply(
        500,
        "5.5.2",
        f"Line too long: the limit is {limit} bytes including CRLF; "
        "use a transfer encoding such as quoted-printable or base64",
    )


# ---- upstream and internal trouble: always temporary, never internal detail (Postfix T6)
def r451_upstream_unavailable(txn_id: str) -> Reply:
    return Reply(451, "4.4.1", f"Upstream mail server not reachable; try again later ({txn_id})")


def r451_upstream_lost(txn_id: str) -> Reply:
    return Reply(451, "4.4.2", f"Connection to the upstream mail server was lost; try again later ({txn_id})")


def r451_upstream_busy(txn_id: str) -> Reply:
    return Reply(451, "4.4.5", f"All upstream connections are busy; try again later ({txn_id})")


def r451_not_attempted(txn_id: str) -> Reply:
    return Reply(451, "4.4.7", f"Not attempted: the time to deliver the copies ran out ({txn_id})")


def r451_not_queued(txn_id: str) -> Reply:
    return Reply(
        451,
        "4.3.0",
        f"Some copies were delivered but the others could not be queued for retry; try again later "
        f"(the delivered copies may arrive twice) ({txn_id})",
    )


def r451_internal(txn_id: str) -> Reply:
    return Reply(451, "4.3.0", f"Temporary local problem; try again later ({txn_id})")


def r451_policy_error(txn_id: str) -> Reply:
    return Reply(451, "4.3.0", f"A policy check could not be completed; try again later ({txn_id})")


def _human_size(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    if size >= 1024**2:
        return f"{size / 1024**2:.1f} MB"
    return f"{size} bytes"
