"""The checks every message passes before any policy sees it, shared by the proxy and
``sendguard check`` so that both judge exactly the same bytes."""

from __future__ import annotations

from policies.base import Reply
from policies.message import MessageParseError, ParsedMessage
from proxy import replies as R
from proxy.config.settings import MessageLimits
from proxy.relay import rawmsg

__all__ = ("MessageRefused", "prepare_message")


class MessageRefused(Exception):
    def __init__(self, reply: Reply, why: str) -> None:
        super().__init__(why)
        self.reply = reply
        self.why = why


def prepare_message(content: bytes, limits: MessageLimits, *, own_hops: int = 0) -> tuple[bytes, ParsedMessage]:
    """Check, normalise and parse a message; blocking (CPU), so the proxy runs it in a thread.

    Returns the bytes to relay (line endings normalised, obsolete ``To :`` field names
    canonicalised by the parse) and their one parse, so that the policies judge exactly the
    bytes the upstream receives. ``own_hops``: the Received fields the caller will add (the
    proxy: its own), counted with the message's toward ``max_received`` as Postfix's cleanup
    counts smtpd's own (hopcount_limit).
    """
    if b"\x00" in content:
        raise MessageRefused(R.R550_NUL_IN_DATA, "NUL in message")
    if rawmsg.has_bare_newline(content):
        if limits.bare_newlines == "reject":
            raise MessageRefused(R.R550_BARE_NEWLINE, "bare CR or LF in message")
        content = rawmsg.normalize_newlines(content)
    if rawmsg.header_block_size(content) > limits.max_header_size:
        raise MessageRefused(R.r552_header_too_big(limits.max_header_size), "header section too large")
    if rawmsg.count_header(content, "Received") + own_hops > limits.max_received:
        raise MessageRefused(R.R554_MAIL_LOOP, "too many Received headers")
    try:
        message = ParsedMessage(content, max_mime_depth=limits.max_mime_depth)
    except MessageParseError as exc:
        raise MessageRefused(Reply(554, "5.6.0", f"{exc}; simplify the MIME structure"), str(exc)) from exc
    # The parse reads "To : x" (RFC 5322 4.5.3) as the To field it is for Postfix and every
    # mail client, and relaying those same bytes keeps the upstream from reading another.
    return message.raw, message
