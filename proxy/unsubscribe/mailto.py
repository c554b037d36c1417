"""The mailto: unsubscribe target: an SMTP listener that records an opt-out per valid token.

``List-Unsubscribe`` carries ``<mailto:unsubscribe@news.example.com?subject=unsubscribe%20TOKEN>``
after the https URI (RFC 2369, RFC 8058 section 3.1). Route that address's mail (an MX record,
or a transport map on the organisation's mail server) to this listener. It:

* accepts RCPT only for the configured address, or ``local+TOKEN@domain`` with a valid token;
  every other recipient gets ``550 5.1.1``, so it can never relay anything;
* takes the message (64 KB at most by default), finds the token in the recipient, the
  Subject or the first lines of the text, records the opt-out (method ``reply``, evidence:
  the client IP, the envelope sender, HELO and Message-ID) and answers ``250``;
* reads a feedback report (ARF, RFC 5965) sent to it, or to ``complaints.address``, as a
  complaint (``proxy/reputation/complaints.py``): the recipient is opted out, the sender's
  complaint rate counted;
* answers ``550 5.7.1`` when no valid token is found (the person's mail system then tells
  them it did not work), ``451 4.3.0`` when the consent store is down (their system retries).

The token normally travels in the Subject: it is longer than the 64 octets RFC 5321
4.5.3.1.1 allows a local part, and mail systems refuse longer ones.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import ssl
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from proxy.replies import rewrite_aiosmtpd_reply
from proxy.schema import HostPort
from proxy.stores.consent import ConsentInputError, ConsentStoreError
from proxy.unsubscribe import UnsubscribeService, UnsubscribeToken
from proxy.unsubscribe.tokens import TokenError

__all__ = ("MailtoUnsubscribeHandler", "find_token_candidates", "start_mailto_listener")

log = logging.getLogger("sendguard.unsubscribe.mailto")

MAX_RECIPIENTS = 5
_SCAN_CHARS = 8192
_CANDIDATE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{40,1024}(?![A-Za-z0-9_-])")
_MAX_CANDIDATES = 10


def find_token_candidates(message: EmailMessage, limit: int = _MAX_CANDIDATES) -> list[str]:
    """Strings that may be tokens, from the Subject first, then the start of the text parts."""
    found: list[str] = []
    texts: list[str] = []
    try:
        texts.append(str(message.get("Subject", "")))
    except Exception:
        texts.append("")
    try:
        for part in message.walk():
            if part.get_content_type() == "text/plain" and not part.is_attachment():
                content = part.get_content()
                if isinstance(content, str):
                    texts.append(content[:_SCAN_CHARS])
            if sum(len(t) for t in texts) > 4 * _SCAN_CHARS:
                break
    except Exception as error:  # an unreadable body: the Subject is what counts
        log.debug("unsubscribe mail body unreadable: %s", error)
    for chunk in texts:
        for match in _CANDIDATE.finditer(chunk):
            if match.group() not in found:
                found.append(match.group())
            if len(found) >= limit:
                return found
    return found


class MailtoUnsubscribeHandler:
    """The aiosmtpd handler of the mailto listener."""

    def __init__(self, service: UnsubscribeService, complaints_address: str | None = None) -> None:
        self.service = service
        # Feedback reports (ARF) come to this address too (complaints.address), or to the
        # unsubscribe address itself.
        self.complaints_address = (complaints_address or "").strip().lower().rstrip(".") or None

    def _address(self) -> tuple[str, str]:
        mailto = self.service.config.mailto
        if mailto is None:
            return "", ""
        local, _, domain = mailto.address.rpartition("@")
        return local.lower(), domain.lower()

    def _recipient(self, address: str) -> tuple[bool, UnsubscribeToken | None]:
        """(accepted, the token in a local+TOKEN address)."""
        wanted_local, wanted_domain = self._address()
        local, at, domain = address.rpartition("@")
        if not at or not wanted_local or domain.lower().rstrip(".") != wanted_domain:
            return False, None
        if local.lower() == wanted_local:
            return True, None
        prefix = wanted_local + "+"
        if local.lower().startswith(prefix):
            try:
                return True, self.service.read(local[len(prefix) :], allow_expired=True)
            except TokenError:
                return False, None
        return False, None

    @staticmethod
    def _peer(session: Session) -> str:
        peer: Any = session.peer  # declared Optional[str], but it is the socket's (host, port)
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def _count(self, outcome: str) -> None:
        self.service.metrics.requests.labels("mailto", outcome).inc()

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        # No per-IP block here: providers relay everyone's unsubscribe replies from shared
        # addresses, and a request without a valid token is refused anyway (550).
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        accepted, _ = self._recipient(address)
        if not accepted and self.complaints_address and address.strip().lower().rstrip(".") == self.complaints_address:
            accepted = True
        if not accepted:
            self.service.limits["invalid"].hit(self._peer(session))
            self._count("invalid_token")
            return f"550 5.1.1 <{address[:200]}>: no such mailbox; this server only takes unsubscribe requests"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        ip = self._peer(session)
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        if self.service.complaints is not None:
            reply = await self.service.complaints(content, ip)
            if reply is not None:
                return reply
        token = self._token(envelope, content)
        if token is None:
            self.service.limits["invalid"].hit(ip)
            self._count("invalid_token")
            return (
                "550 5.7.1 No valid unsubscribe token in the address or the subject; "
                "use the unsubscribe link in the message"
            )
        note = self._note(envelope, session, content)
        try:
            result = await self.service.opt_out(token, method="reply", channel="mailto", ip=ip, note=note)
        except (ConsentStoreError, ConsentInputError) as error:
            self._count("store_error")
            log.error("mailto unsubscribe could not be recorded: %s", error)
            return "451 4.3.0 The request cannot be recorded right now; try again later"
        self._count("ok")
        what = "Unsubscribed" if result.recorded else "Already unsubscribed"
        return f"250 2.0.0 {what}; thank you"

    def _token(self, envelope: Envelope, content: bytes) -> UnsubscribeToken | None:
        for address in envelope.rcpt_tos:
            _, token = self._recipient(address)
            if token is not None:
                return token
        try:
            parsed = email.message_from_bytes(content, policy=email.policy.default)
        except Exception:
            return None
        for candidate in find_token_candidates(parsed):
            try:
                return self.service.read(candidate, allow_expired=True)
            except TokenError:
                continue
        return None

    @staticmethod
    def _note(envelope: Envelope, session: Session, content: bytes) -> str:
        message_id = ""
        match = re.search(rb"(?im)^message-id:[ \t]*(<[^>\r\n]{1,200}>)", content[:65536])
        if match:
            message_id = match.group(1).decode("ascii", "replace")
        parts = [
            f"envelope sender <{str(envelope.mail_from or '')[:200]}>",
            f"HELO {str(session.host_name or '')[:100]}",
        ]
        if message_id:
            parts.append(f"Message-ID {message_id}")
        return "; ".join(parts)


class _MailtoSMTP(SMTP):
    """aiosmtpd with the relay's reply wording: enhanced status codes on its own replies."""

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        limit = int(self.data_size_limit or 0)
        await super().push(
            rewrite_aiosmtpd_reply(text, line_length_limit=self.line_length_limit, max_message_size=limit)
        )


async def start_mailto_listener(
    service: UnsubscribeService, address: HostPort, complaints_address: str | None = None
) -> asyncio.Server:
    """Listen for unsubscribe mail (and feedback reports) on ``address`` (the caller closes the server)."""
    config = service.config
    mailto = config.mailto
    assert mailto is not None
    handler = MailtoUnsubscribeHandler(service, complaints_address)
    tls_context: ssl.SSLContext | None = None
    if config.tls_cert and config.tls_key:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(config.tls_cert, config.tls_key)
    loop = asyncio.get_running_loop()
    hostname = mailto.address.rpartition("@")[2]

    def factory() -> Any:
        return _MailtoSMTP(
            handler,
            data_size_limit=int(mailto.max_message_size),
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="sendguard unsubscribe",
            tls_context=tls_context,
            require_starttls=False,
            timeout=60,
            loop=loop,
        )

    try:
        return await loop.create_server(factory, host=address.host, port=address.port, reuse_address=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address} for unsubscribe mail: {exc.strerror}") from exc
