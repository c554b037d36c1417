"""Every reply sendguard itself gives, in one place (RFC 5321 codes, RFC 3463 enhanced status).

Names carry the code (``R550_...``); ``tests/test_replies.py`` checks that each name's code
matches its value and that the code class agrees with the enhanced status class.
Replies that need a value (a size, a transaction id) are functions.
"""

from __future__ import annotations

import re

from policies.base import Reply

# ---- session and relay authorization
R421_TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many connections from your address; try again later")
R421_SERVER_BUSY = Reply(421, "4.3.2", "Server busy; try again later")
R421_BUSY_FOR_YOUR_ADDRESS = Reply(
    421, "4.7.0", "Server busy: too many connections from your address for now; try again later"
)
R421_IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle for too long; closing connection")
R421_SHUTTING_DOWN = Reply(421, "4.3.2", "Server shutting down; try again later")
R421_SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit reached; closing connection")
R421_COMMAND_TIMEOUT = Reply(421, "4.4.2", "Command not received in time; closing connection")
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
R503_AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Send EHLO first: AUTH is an ESMTP command (RFC 4954)")

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
#: XCLIENT or XFORWARD from a host not listed for it (Postfix's words and codes).
R550_INSUFFICIENT_AUTHORIZATION = Reply(550, "5.7.0", "Error: insufficient authorization")
R503_FORWARD_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
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


def r451_upstream_tls_failed(txn_id: str) -> Reply:
    # RFC 3463 X.3.5: the system is not configured to accept this message now.
    return Reply(
        451,
        "4.3.5",
        f"TLS with the upstream mail server failed (certificate or handshake); the administrator must check "
        f"the upstream TLS settings; try again later ({txn_id})",
    )


def r451_upstream_auth_refused(txn_id: str) -> Reply:
    return Reply(
        451,
        "4.3.5",
        f"The upstream mail server refused sendguard's credentials; the administrator must check the upstream "
        f"user name and password; try again later ({txn_id})",
    )


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


# ---- aiosmtpd's own replies -------------------------------------------------------------------

_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")

# aiosmtpd's own replies carry no enhanced status code and some leak nothing useful;
# each is replaced by one that tells the client what to do (RFC 3463, RFC 2034).
_REWRITES_EXACT = {
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "500 Command line too long": "500 5.5.2 Command line too long (512 bytes at most, RFC 5321 4.5.3.1.4)",
    "503 Error: need MAIL command": R503_NEED_MAIL.line(),
    "503 Error: need RCPT command": R503_NEED_RCPT.line(),
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command; finish or RSET the transaction first",
    "503 Error: send HELO first": "503 5.5.1 Send HELO or EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "530 Must issue a STARTTLS command first": R530_STARTTLS_REQUIRED.line(),
    "454 TLS not available": "454 4.7.0 TLS not available",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused: the TLS handshake failed",
    "500 Error: strict ASCII mode": "500 5.6.7 Non-ASCII characters need the SMTPUTF8 extension",
    "501 Error: SMTPUTF8 disabled": "501 5.5.4 SMTPUTF8 is not available",
    "501 Error: SMTPUTF8 takes no arguments": "501 5.5.4 SMTPUTF8 takes no arguments",
    "501 Error: BODY can only be one of 7BIT, 8BITMIME": "501 5.5.4 BODY can only be 7BIT or 8BITMIME",
    "555 MAIL FROM parameters not recognized or not implemented": "555 5.5.4 MAIL FROM parameters not recognized",
    "555 RCPT TO parameters not recognized or not implemented": "555 5.5.4 RCPT TO parameters not recognized",
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "501 Not enough value": "501 5.5.4 AUTH needs a mechanism",
    "501 Too many values": "501 5.5.4 Too many AUTH arguments",
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "252 Cannot VRFY user, but will accept message and attempt delivery": "252 2.5.2 Cannot VRFY user",
}


def rewrite_aiosmtpd_reply(text: str, *, line_length_limit: int, max_message_size: int) -> str:
    """One of aiosmtpd's reply lines with an enhanced status code and words that tell the
    client what to do; replies that have one, multi-line replies and greetings pass as they are.
    Every listener (relay and unsubscribe mailto) says the same thing the same way."""
    if (
        text.startswith(("220 ", "250-", "334 ", "354 ", "235 ", "214"))
        or text == "250 HELP"
        or "\r\n" in text
        or _ENHANCED.match(text)
    ):
        return text
    exact = _REWRITES_EXACT.get(text)
    if exact is not None:
        return exact
    if text.startswith("500 Line too long"):
        return r500_line_too_long(line_length_limit).line()
    if text.startswith("552 Error:"):
        return r552_message_too_big(max_message_size).line()
    if text.startswith("501 Syntax:"):
        return "501 5.5.4 " + text[4:]
    if text.startswith("500 Error: command"):
        return "500 5.5.1 Command not recognized"
    if text.startswith("502 Could not VRFY"):
        return "502 5.5.4 Could not VRFY that address"
    if len(text) >= 4 and text[:3].isdigit() and text[0] in "245" and text[3] in (" ", ""):
        # Anything else of aiosmtpd's: add the class's generic enhanced status.
        return f"{text[:3]} {text[0]}.0.0 {text[4:]}".rstrip()
    return text


# ---- where only the one message can leave (milter mode)
R452_ONE_RECIPIENT_AT_A_TIME = Reply(
    452,
    "4.5.3",
    "Too many recipients for this message: sendguard gives each recipient its own unsubscribe link; "
    "send to the others in another transaction",
)
R550_ONE_RECIPIENT_ONLY = Reply(
    550, "5.5.3", "This message needs a copy of its own for each recipient; send it to one recipient per message"
)
R554_ONE_MESSAGE_ONLY = Reply(
    554, "5.3.3", "This message needs one copy per recipient, which sendguard's milter mode cannot make"
)
R451_MILTER_INTERNAL = Reply(451, "4.3.0", "Temporary sendguard milter error; try again later")
