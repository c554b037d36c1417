"""SMTP in: the aiosmtpd session, relay authorization, and the lockstep relay handler.

The upstream transaction runs alongside the client's (Postfix's before-queue proxy,
Haraka's smtp_proxy): MAIL opens an upstream session and relays MAIL, each RCPT is relayed
and the client gets the upstream's own answer for that recipient, and the client's final
dot gets 250 only after the upstream said 250 for the message. Policies sit in front of
each step. Nothing is queued here, so nothing can be lost here: a client that did not get
250 still has its message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from policies.base import Action, Outcome, Reply, Transaction
from proxy import replies as R
from proxy.relay import rawmsg
from proxy.relay.dsn import build_dsn
from proxy.relay.intake import MessageRefused, prepare_message
from proxy.relay.pipeline import PolicyResult, StageDecision
from proxy.relay.runtime import ListenerState, Runtime, Services
from proxy.relay.upstream import UpstreamSession, UpstreamUnavailable
from proxy.reputation.backoff import sender_domains
from proxy.reputation.dkim import DKIMSignError
from proxy.schema import address_in
from proxy.unsubscribe.footer import NoReadablePart, append_footer

__all__ = ("AppHandle", "RelayHandler", "SendguardSMTP")

log = logging.getLogger("sendguard.smtp")
txn_log = logging.getLogger("sendguard.txn")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")
_MAX_ERRORS = 20  # Postfix smtpd_hard_error_limit
# Below this size checking and parsing a message takes well under a millisecond, less than
# handing it to a worker thread costs (measured, bench/README.md); above it, a thread.
_INLINE_PARSE_LIMIT = 64 * 1024
# Copies for one message are delivered within this time; whatever is left is reported to
# the sender: clients give up on a reply after 10 minutes (RFC 5321 4.5.3.2.6), many sooner.
_FANOUT_BUDGET = 300.0


def _copy_budget(runtime: Runtime) -> float:
    timeouts = runtime.settings.upstream.timeouts
    return float(timeouts.connect + 3 * timeouts.command + timeouts.data + 30)


# Only protocol errors (bad syntax, wrong sequence, failed AUTH) count towards the limit:
# refusing recipients is normal business (a newsletter with thirty addresses without
# consent), and "too many recipients" must leave the client free to send the rest later.
_PROTOCOL_ERROR = re.compile(r"^(50[0-4] |5\d\d 5\.5\.|53[05] |538 )")


class AppHandle(Protocol):
    """What a session needs from the application."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def services(self) -> Services: ...

    @property
    def accepting(self) -> bool: ...

    def track(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a session's clean-up in the background; the app waits for it on stop."""


def _utf8(address: str) -> bool:
    """aiosmtpd keeps bytes that are not UTF-8 as lone surrogates; such an address cannot be
    relayed (and is not a valid internationalized address either, RFC 6531)."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def new_txn_id() -> str:
    return secrets.token_hex(6)


# aiosmtpd's own replies carry no enhanced status code and some leak nothing useful;
# each is replaced by one that tells the client what to do (RFC 3463, RFC 2034).
_REWRITES_EXACT = {
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "500 Command line too long": "500 5.5.2 Command line too long (512 bytes at most, RFC 5321 4.5.3.1.4)",
    "503 Error: need MAIL command": R.R503_NEED_MAIL.line(),
    "503 Error: need RCPT command": R.R503_NEED_RCPT.line(),
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command; finish or RSET the transaction first",
    "503 Error: send HELO first": "503 5.5.1 Send HELO or EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "530 Must issue a STARTTLS command first": R.R530_STARTTLS_REQUIRED.line(),
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


@dataclass
class TxnState:
    """One transaction from MAIL to its end."""

    txn: Transaction
    runtime: Runtime
    started: float
    upstream: UpstreamSession | None = None
    smtputf8: bool = False
    results: list[PolicyResult] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    class_reason: str = ""
    upstream_lost: bool = False
    relayed_options: list[str] = field(default_factory=list)
    #: Set when the message went out as one copy per recipient: each copy's outcome.
    copies: dict[str, Reply] | None = None
    #: After an internal error the transaction cannot go on: every later RCPT and DATA gets
    #: this 4xx (never a 503 that would bounce recipients) until the client starts anew.
    failed: Reply | None = None


class SendguardSMTP(SMTP):
    """aiosmtpd's SMTP with sendguard's limits, AUTH, replies and exception handling."""

    AuthLoginUsernameChallenge = "Username:"  # aiosmtpd's "User Name\x00" breaks Go and curl (#566)
    AuthLoginPasswordChallenge = "Password:"

    def __init__(
        self,
        handler: RelayHandler,
        listener: ListenerState,
        services: Services,
        idle_timeout: float,
        session_timeout: float,
    ) -> None:
        config = listener.config
        self.line_length_limit = int(config.max_line_length)  # read by SMTP.__init__ for the stream limit
        self.listener = listener
        self.services = services
        self.relay = handler
        self._session_timeout = session_timeout
        self._session_timer: asyncio.TimerHandle | None = None
        self._counted_ip: str | None = None
        self.errors = 0
        self.client_ip = ""
        self.in_data = False
        self.close_after_reply = False
        super().__init__(
            handler,
            data_size_limit=int(config.max_message_size),
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname or services.hostname,
            ident="sendguard ESMTP",
            tls_context=listener.tls_context if config.tls.mode == "starttls" else None,
            require_starttls=config.tls.required,
            timeout=idle_timeout,
            auth_required=False,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        handler.server = self

    # ---- connection accounting ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and self.transport is None
        super().connection_made(transport)
        if not first:
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else ""
        # Loopback clients may AUTH without TLS (nothing crosses a network); others only
        # over TLS. An implicit-TLS connection is encrypted from its first byte.
        implicit = self.listener.config.tls.mode == "implicit"
        self._auth_require_tls = not (
            implicit or address_in(self.client_ip, self.listener.config.plaintext_auth_networks)
        )
        listener, metrics = self.listener, self.services.metrics
        config = listener.config
        refused: Reply | None = None
        if listener.active >= config.max_sessions:
            refused = R.R421_SERVER_BUSY
        elif listener.per_ip[self.client_ip] >= config.max_sessions_per_ip:
            refused = R.R421_TOO_MANY_SESSIONS
        if refused is not None:
            # Refuse before the greeting (RFC 5321 3.1: a 421 greeting) and close.
            log.warning("refusing session from %s on %s: %s", self.client_ip, listener.name, refused.text)
            metrics.sessions.labels(listener.name, "refused_limit").inc()
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(refused.line().encode("ascii") + b"\r\n")
            transport.close()
            return
        self._counted_ip = self.client_ip
        listener.active += 1
        listener.per_ip[self.client_ip] += 1
        listener.sessions.add(self)
        metrics.sessions.labels(listener.name, "accepted").inc()
        metrics.sessions_active.labels(listener.name).inc()
        self._session_timer = self.loop.call_later(self._session_timeout, self._session_expired)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted_ip is not None:
            listener = self.listener
            listener.active -= 1
            listener.per_ip[self._counted_ip] -= 1
            if listener.per_ip[self._counted_ip] <= 0:
                del listener.per_ip[self._counted_ip]
            listener.sessions.discard(self)
            self.services.metrics.sessions_active.labels(listener.name).dec()
            self._counted_ip = None
        if self._session_timer is not None:
            self._session_timer.cancel()
        super().connection_lost(error)
        self.relay.connection_lost()

    def _session_expired(self) -> None:
        if self.in_data:
            self.close_after_reply = True  # never cut a relay in flight; close after its reply
            return
        log.info("session from %s reached the session time limit", self.client_ip)
        self.close_with(R.R421_SESSION_TIMEOUT)

    def close_with(self, reply: Reply) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(reply.line().encode("ascii") + b"\r\n")
            transport.close()

    # ---- replies --------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        text = self._rewrite(text)
        code = text[:3]
        if _PROTOCOL_ERROR.match(text):
            self.errors += 1
        await super().push(text)
        if self.errors >= _MAX_ERRORS and self.transport is not None and not self.transport.is_closing():
            log.warning("closing session from %s after %d errors", self.client_ip, self.errors)
            await super().push("421 4.7.0 Too many errors; closing connection")
            self.transport.close()
        elif self.close_after_reply and not self.in_data and code != "354":
            self.close_with(R.R421_SESSION_TIMEOUT)

    def _rewrite(self, text: str) -> str:
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
            return R.r500_line_too_long(self.line_length_limit).line()
        if text.startswith("552 Error:"):
            return R.r552_message_too_big(self.listener.config.max_message_size).line()
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

    async def handle_exception(self, error: Exception) -> str:
        """An unexpected exception is a 451 with the transaction id, never aiosmtpd's
        permanent ``500 Error: (Exception) ...`` with internal details."""
        txn_id = self.relay.current_txn_id or new_txn_id()
        log.error("txn %s: internal error in session from %s", txn_id, self.client_ip, exc_info=error)
        reply = R.r451_internal(txn_id)
        await self.relay.fail(reply)
        return reply.line()

    # ---- AUTH -----------------------------------------------------------------------------

    @property
    def auth_possible(self) -> bool:
        """Whether this client can AUTH here, now or after STARTTLS."""
        if self.listener.config.auth == "none":
            return False
        return bool(self._tls_protocol) or not self._auth_require_tls or self.listener.config.tls.mode == "starttls"

    async def smtp_AUTH(self, arg: str) -> None:
        mode = self.listener.config.auth
        if mode == "none":
            await self.push(R.R503_AUTH_NOT_OFFERED.line())
            return
        if self._auth_require_tls and not self._tls_protocol:
            await self.push(R.R538_ENCRYPTION_REQUIRED.line())
            return
        if self.listener.auth_failures.blocked(self.client_ip):
            self.services.metrics.auth.labels(self.listener.name, "blocked").inc()
            await self.push(R.R454_AUTH_BLOCKED.line())
            return
        await super().smtp_AUTH(arg)

    async def _check_login(self, login: bytes, password: bytes) -> AuthResult:
        metrics, listener = self.services.metrics, self.listener
        try:
            name, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            name, secret = "", ""
        ok = bool(name) and await asyncio.to_thread(self.services.users.check, name, secret)
        if ok:
            metrics.auth.labels(listener.name, "success").inc()
            log.info("AUTH success for %s from %s", name, self.client_ip)
            return AuthResult(success=True, auth_data=LoginPassword(login, b""))
        metrics.auth.labels(listener.name, "failure").inc()
        listener.auth_failures.failed(self.client_ip)
        log.warning("AUTH failure for %r from %s", name[:64], self.client_ip)
        return AuthResult(success=False, handled=False, message=R.R535_AUTH_INVALID.line())

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:  # RFC 4616: [authzid] NUL authcid NUL passwd
            await self.push("501 5.5.2 Cannot split the AUTH PLAIN value")
            return AuthResult(success=False, handled=True)
        return await self._check_login(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)


class RelayHandler:
    """The aiosmtpd handler of one session: relay authorization, policies, lockstep relay."""

    def __init__(self, app: AppHandle, listener: ListenerState) -> None:
        self.app = app
        self.listener = listener
        self.server: SendguardSMTP | None = None
        self.state: TxnState | None = None

    @property
    def current_txn_id(self) -> str | None:
        return self.state.txn.txn_id if self.state else None

    @property
    def services(self) -> Services:
        return self.app.services

    # ---- session-level hooks --------------------------------------------------------------

    async def handle_EHLO(
        self, server: SendguardSMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        await self.abandon("reset")
        session.host_name = hostname
        config = self.listener.config
        caps = self.app.runtime.upstream.capabilities
        size = int(config.max_message_size)
        if caps is not None and caps.size:
            size = min(size, caps.size)
        out = []
        for line in responses:
            keyword = line[4:].split(" ", 1)[0].upper()
            if keyword == "AUTH" and config.auth == "none":
                continue
            if keyword == "SIZE":
                line = f"250-SIZE {size}"
            if caps is not None and (
                (keyword == "SMTPUTF8" and not caps.smtputf8) or (keyword == "8BITMIME" and not caps.eightbitmime)
            ):
                continue
            if line == "250 HELP":
                out.append("250-ENHANCEDSTATUSCODES")
            out.append(line)
        return out

    async def handle_HELO(self, server: SendguardSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        await self.abandon("reset")
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: SendguardSMTP, session: Session, envelope: Envelope) -> str:
        await self.abandon("reset")
        return R.R250_RESET.line()

    async def handle_QUIT(self, server: SendguardSMTP, session: Session, envelope: Envelope) -> str:
        await self.abandon("quit")
        return "221 2.0.0 Bye"

    async def handle_NOOP(self, server: SendguardSMTP, session: Session, envelope: Envelope, arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_VRFY(self, server: SendguardSMTP, session: Session, envelope: Envelope, address: str) -> str:
        # Never confirm or deny addresses (RFC 5321 3.5.3; avoids address harvesting).
        return "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"

    def connection_lost(self) -> None:
        if self.state is not None:
            self.app.track(self.abandon("disconnected"))

    # ---- MAIL -----------------------------------------------------------------------------

    def _relay_refusal(self, session: Session) -> Reply | None:
        """Who may relay (Postfix: permit_mynetworks, permit_sasl_authenticated, reject)."""
        assert self.server is not None
        config = self.listener.config
        if session.authenticated:
            return None
        if config.auth == "required":
            return R.R530_AUTH_REQUIRED
        if self.listener.is_trusted(self.server.client_ip):
            return None
        if config.auth == "optional" and self.server.auth_possible:
            return R.R530_AUTH_REQUIRED
        return R.R550_RELAY_DENIED

    async def handle_MAIL(
        self, server: SendguardSMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        refusal = self._relay_refusal(session)
        if refusal is not None:
            log.warning("relay refused for %s on %s: %s", server.client_ip, self.listener.name, refusal.code)
            return refusal.line()
        if not self.app.accepting:
            return R.R421_SHUTTING_DOWN.line()
        if self.state is not None:
            # aiosmtpd ends a transaction by itself when the message is too big or has an
            # over-long line (handle_DATA is never called): close ours before a new one.
            if self.state.failed is not None:
                self.state = None
            else:
                await self.abandon("message refused by the SMTP layer")
        sender = "" if address == "<>" else address
        if _CONTROL.search(sender) or len(sender) > 320 or not _utf8(sender):
            return R.R501_BAD_SENDER.line()
        options = [o.upper() for o in mail_options]
        smtputf8 = "SMTPUTF8" in options
        if not smtputf8 and not sender.isascii():
            return R.R553_SMTPUTF8_REQUIRED.line()

        runtime = self.app.runtime
        login = getattr(session.auth_data, "login", None)
        auth_user = login.decode("utf-8", "replace") if isinstance(login, bytes) else None
        txn = Transaction(
            txn_id=new_txn_id(),
            listener=self.listener.name,
            client_ip=server.client_ip,
            helo=session.host_name,
            auth_user=auth_user if session.authenticated else None,
            tls=session.ssl is not None or self.listener.config.tls.mode == "implicit",
            mail_from=sender,
        )
        classification = runtime.classifier.from_envelope(txn)
        if classification is not None:
            txn.message_class = classification.message_class
        runtime.enter()
        state = TxnState(
            txn=txn,
            runtime=runtime,
            started=time.monotonic(),
            smtputf8=smtputf8,
            class_reason=classification.reason if classification else "",
        )
        self.state = state

        decision = await self._timed_stage(runtime, "mail", runtime.pipeline.check_mail(txn))
        state.results.extend(decision.results)
        if not decision.accepted:
            assert decision.reply is not None
            await self._end(
                state, "rejected" if decision.action is Action.REJECT else "tempfailed", client_reply=decision.reply
            )
            return decision.reply.line()

        paused = await self._pause_refusal(state, "mail")
        if paused is not None:
            await self._end(state, "tempfailed", client_reply=paused)
            return paused.line()
        reply = await self._open_upstream(state, sender, options)
        await self._observe(state, "mail", reply)
        if not reply.is_success:
            await self._end(
                state, "tempfailed" if reply.is_temporary else "rejected", client_reply=reply, upstream_reply=reply
            )
            return reply.line()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply.line()

    async def _open_upstream(self, state: TxnState, sender: str, options: list[str]) -> Reply:
        runtime = state.runtime
        started = time.perf_counter()
        try:
            upstream = await runtime.upstream.open(state.txn.txn_id)
        except UpstreamUnavailable as exc:
            return exc.reply
        state.upstream = upstream
        caps = upstream.capabilities
        if state.smtputf8 and not caps.smtputf8:
            return R.R553_SMTPUTF8_UNSUPPORTED
        relayed: list[str] = []
        for option in options:
            if option == "SMTPUTF8":
                relayed.append(option)
            elif option.startswith("BODY="):
                if option == "BODY=8BITMIME" and not caps.eightbitmime:
                    return R.R554_8BIT_UNSUPPORTED
                if caps.eightbitmime:
                    relayed.append(option)
            elif option.startswith("SIZE=") and caps.size is not None:
                relayed.append(option)
        state.relayed_options = relayed
        reply = await upstream.mail(sender, relayed)
        self.services.metrics.upstream_duration.labels("mail").observe(time.perf_counter() - started)
        return reply

    # ---- RCPT -----------------------------------------------------------------------------

    async def handle_RCPT(
        self, server: SendguardSMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        state = self.state
        if state is None:
            return R.R503_NEED_MAIL.line()
        if state.failed is not None:
            return state.failed.line()
        txn, metrics = state.txn, self.services.metrics
        klass = txn.message_class or "unknown"
        reply = self._check_recipient_syntax(state, address)
        if reply is not None:
            metrics.recipients.labels(txn.listener, klass, "rejected" if reply.code >= 500 else "tempfailed").inc()
            return reply.line()
        key = address.lower()
        if key in state.seen:
            return R.R250_DUPLICATE_RECIPIENT.line()  # relayed once (Postfix dedups in cleanup too)

        decision = await self._timed_stage(state.runtime, "rcpt", state.runtime.pipeline.check_rcpt(txn, address))
        state.results.extend(decision.results)
        if not decision.accepted:
            assert decision.reply is not None
            state.refused[address] = decision.reply
            outcome = "rejected" if decision.action is Action.REJECT else "tempfailed"
            metrics.recipients.labels(txn.listener, klass, outcome).inc()
            return decision.reply.line()

        if state.upstream is None or state.upstream_lost:
            reply = R.r451_upstream_lost(txn.txn_id)
        else:
            started = time.perf_counter()
            reply = await state.upstream.rcpt(address, [])
            metrics.upstream_duration.labels("rcpt").observe(time.perf_counter() - started)
            await self._observe(state, "rcpt", reply)
            await self._bounce(state, address, reply)
            state.upstream_lost = state.upstream.lost
        if reply.is_success:
            state.seen.add(key)
            txn.recipients.append(address)
            envelope.rcpt_tos.append(address)
            metrics.recipients.labels(txn.listener, klass, "accepted").inc()
        else:
            state.refused[address] = reply
            metrics.recipients.labels(txn.listener, klass, "tempfailed" if reply.is_temporary else "rejected").inc()
        return reply.line()

    def _check_recipient_syntax(self, state: TxnState, address: str) -> Reply | None:
        if address in ("<>", ""):
            return R.R501_NULL_RECIPIENT
        if _CONTROL.search(address) or len(address) > 320 or "@" not in address or not _utf8(address):
            return R.R501_BAD_RECIPIENT
        if not state.smtputf8 and not address.isascii():
            return R.R553_SMTPUTF8_REQUIRED
        if len(state.txn.recipients) >= self.listener.config.max_recipients:
            return R.R452_TOO_MANY_RECIPIENTS
        return None

    # ---- DATA -----------------------------------------------------------------------------

    async def handle_DATA(self, server: SendguardSMTP, session: Session, envelope: Envelope) -> str:
        state = self.state
        if state is not None and state.failed is not None:
            self.state = None  # the transaction ends with this DATA, as the client sees it
            return state.failed.line()
        if state is None or not state.txn.recipients:
            return R.R503_NEED_RCPT.line()
        runtime = state.runtime
        # The idle timer ran from the DATA command through the upload; the relay gets its own
        # budget: every policy's timeout plus the upstream's data timeout, and a margin.
        budget = sum(e.timeout for e in runtime.settings.policies) + (runtime.settings.upstream.timeouts.data + 30)
        server._reset_timeout(budget)
        server.in_data = True
        try:
            reply, upstream_reply, outcome = await self._relay_message(state, envelope.original_content or b"")
        except asyncio.CancelledError:
            # The client went away mid-relay: drop the upstream connection without finishing,
            # so the upstream never completes a message the client will send again.
            if state.upstream is not None:
                state.upstream.discard()
            await self._end(state, "abandoned", client_reply=None)
            raise
        finally:
            server.in_data = False
        await self._end(state, outcome, client_reply=reply, upstream_reply=upstream_reply)
        if outcome == "delivered":
            server.errors = 0  # Postfix counts errors "without delivering mail"
        return reply.line()

    async def _relay_message(self, state: TxnState, content: bytes) -> tuple[Reply, Reply | None, str]:
        txn, runtime = state.txn, state.runtime
        metrics = self.services.metrics
        txn.size = len(content)
        metrics.message_size.observe(len(content))

        def refuse(reply: Reply, why: str) -> tuple[Reply, Reply | None, str]:
            log.info("txn %s refused before policies: %s", txn.txn_id, why)
            return reply, None, "tempfailed" if reply.is_temporary else "rejected"

        if state.upstream is None or state.upstream_lost:
            return refuse(R.r451_upstream_lost(txn.txn_id), "upstream connection lost")
        try:
            if len(content) < _INLINE_PARSE_LIMIT:
                content, message = prepare_message(content, runtime.settings.message)
            else:  # CPU work in proportion to the size: a thread lets other sessions be answered in between
                content, message = await asyncio.to_thread(prepare_message, content, runtime.settings.message)
        except MessageRefused as refused:
            return refuse(refused.reply, refused.why)
        txn.message = message
        classification = runtime.classifier.from_message(txn, message)
        txn.message_class, state.class_reason = classification.message_class, classification.reason
        paused = await self._pause_refusal(state, "message")
        if paused is not None:
            await state.upstream.abort()
            return paused, None, "tempfailed"

        decision = await self._timed_stage(runtime, "message", runtime.pipeline.check_message(txn))
        state.results.extend(decision.results)
        if not decision.accepted:
            assert decision.reply is not None
            await state.upstream.abort()
            return decision.reply, None, "rejected" if decision.action is Action.REJECT else "tempfailed"

        outgoing = self._apply_edits(content, runtime, decision)
        footer = next((edit.footer for edit in decision.edits if edit.footer is not None), None)
        if footer is not None:
            try:
                # CPU work on the whole body: a thread keeps the event loop answering others.
                outgoing = await asyncio.to_thread(append_footer, outgoing, *footer)
            except NoReadablePart:
                await state.upstream.abort()
                return R.R550_NO_PART_FOR_FOOTER, None, "rejected"
        if any(edit.fans_out for edit in decision.edits):
            return await self._deliver_copies(state, outgoing, decision)
        signed = await self._sign(state, outgoing)
        if isinstance(signed, Reply):
            await state.upstream.abort()
            return signed, None, "tempfailed" if signed.is_temporary else "rejected"
        outgoing = signed
        started = time.perf_counter()
        upstream_reply = await state.upstream.data(outgoing)
        metrics.upstream_duration.labels("data").observe(time.perf_counter() - started)
        await self._observe(state, "data", upstream_reply)
        await state.upstream.finish()
        client_reply = Reply(upstream_reply.code, upstream_reply.status, f"{upstream_reply.text} [{txn.txn_id}]"[:500])
        if upstream_reply.is_success:
            return client_reply, upstream_reply, "delivered"
        return client_reply, upstream_reply, "tempfailed" if upstream_reply.is_temporary else "rejected"

    async def _deliver_copies(
        self, state: TxnState, outgoing: bytes, decision: StageDecision
    ) -> tuple[Reply, Reply | None, str]:
        """One copy per recipient, each in its own upstream transaction.

        All copies refused: the client gets the refusal (4xx when any was temporary), so it
        keeps its message. Some delivered: the client gets 250 (a 451 would duplicate the
        delivered copies) and the refused recipients are reported to the sender in a DSN.
        """
        txn = state.txn
        assert state.upstream is not None
        await state.upstream.abort()  # the shared transaction is never completed
        split = any(edit.split_per_recipient for edit in decision.edits)
        extra: dict[str, list[tuple[str, str]]] = {}
        footers: dict[str, tuple[str, str]] = {}
        for edit in decision.edits:
            for recipient, fields in edit.per_recipient.items():
                extra.setdefault(recipient, []).extend(fields)
            footers.update(edit.per_recipient_footer)
        state.copies = {}
        deadline = time.monotonic() + _FANOUT_BUDGET
        for attempt in (1, 2):
            # A copy refused for now (4xx) gets one more try after the others: once some copies
            # are delivered, a refused one can only be reported to the sender.
            pending = [
                r
                for r in txn.recipients
                if r not in state.copies
                or (attempt == 2 and state.copies[r].is_temporary and any(c.is_success for c in state.copies.values()))
            ]
            for recipient in pending:
                if time.monotonic() > deadline:
                    state.copies[recipient] = R.r451_not_attempted(txn.txn_id)
                    continue
                if self.server is not None:  # each copy gets the whole upstream budget again
                    self.server._reset_timeout(_copy_budget(state.runtime))
                try:
                    state.copies[recipient] = await self._deliver_copy(
                        state, outgoing, recipient, split, extra.get(recipient, ()), footers.get(recipient)
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("txn %s: copy for %s failed", txn.txn_id, recipient)
                    state.copies[recipient] = R.r451_internal(txn.txn_id)
        delivered = [r for r, reply in state.copies.items() if reply.is_success]
        failed = [(r, reply) for r, reply in state.copies.items() if not reply.is_success]
        if not delivered:
            first = next((reply for _, reply in failed if reply.is_temporary), failed[0][1])
            outcome = "tempfailed" if first.is_temporary else "rejected"
            return Reply(first.code, first.status, f"{first.text} [{txn.txn_id}]"[:500]), first, outcome
        text = f"Delivered as {len(delivered)} separate copies, one per recipient"
        if failed:
            text += f"; {len(failed)} refused, reported to the sender"
            if txn.mail_from:  # never bounce a bounce (RFC 5321 6.1)
                try:
                    await self._send_dsn(state, outgoing, failed)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the copies are delivered: a failed report must not undo that
                    log.exception("txn %s: the DSN for %d refused copies could not be built", txn.txn_id, len(failed))
        return Reply(250, "2.0.0", f"{text} [{txn.txn_id}]"), None, "delivered"

    async def _deliver_copy(
        self,
        state: TxnState,
        outgoing: bytes,
        recipient: str,
        split: bool,
        fields: Sequence[tuple[str, str]],
        footer: tuple[str, str] | None,
    ) -> Reply:
        copy = outgoing
        if split:
            copy = rawmsg.prepend_headers(rawmsg.remove_headers(copy, ("To", "Cc")), [("To", recipient)])
        copy = rawmsg.prepend_headers(copy, fields)
        if footer is not None:
            try:
                copy = await asyncio.to_thread(append_footer, copy, *footer)
            except NoReadablePart:
                return R.R550_NO_PART_FOR_FOOTER
        signed = await self._sign(state, copy)  # each copy differs, so each is signed
        if isinstance(signed, Reply):
            return signed
        return await self._deliver_one(state, state.txn.mail_from, recipient, signed)

    async def _deliver_one(self, state: TxnState, sender: str, recipient: str, content: bytes) -> Reply:
        runtime, txn_id = state.runtime, state.txn.txn_id
        try:
            session = await runtime.upstream.open(txn_id)
        except UpstreamUnavailable as exc:
            return exc.reply
        try:
            stage = "mail"
            reply = await session.mail(sender, state.relayed_options)
            if reply.is_success:
                stage, reply = "rcpt", await session.rcpt(recipient, [])
            if reply.is_success:
                stage, reply = "data", await session.data(content)
                await session.finish()
            else:
                await session.abort()
            await self._observe(state, stage, reply)
            if sender and stage in ("rcpt", "data"):  # a copy's DATA reply is this recipient's; not for DSNs
                await self._bounce(state, recipient, reply, tried=False)  # counted at its RCPT already
        except BaseException:
            await session.abort()
            raise
        return reply

    async def _send_dsn(self, state: TxnState, original: bytes, failed: list[tuple[str, Reply]]) -> None:
        txn = state.txn
        report = build_dsn(
            reporting_host=self.services.hostname,
            sender=txn.mail_from,
            original=original,
            failures=failed,
            txn_id=txn.txn_id,
        )
        signed = await self._sign(state, report)
        if not isinstance(signed, Reply):
            report = signed
        reply = await self._deliver_one(state, "", txn.mail_from, report)
        if reply.is_success:
            log.warning("txn %s: %d copies refused; DSN sent to the sender", txn.txn_id, len(failed))
        else:
            log.error(
                "txn %s: %d copies refused and the DSN to the sender was refused too: %s",
                txn.txn_id,
                len(failed),
                reply.line(),
            )

    @staticmethod
    def _apply_edits(content: bytes, runtime: Runtime, decision: StageDecision) -> bytes:
        settings = runtime.settings
        remove = [*settings.message.strip_headers, *settings.instruction_headers]
        add: list[tuple[str, str]] = []
        for edit in decision.edits:
            remove.extend(edit.remove)
            add.extend(edit.add)
        content = rawmsg.remove_headers(content, remove)
        return rawmsg.prepend_headers(content, add)

    # ---- DKIM -----------------------------------------------------------------------------

    async def _sign(self, state: TxnState, content: bytes) -> bytes | Reply:
        """DKIM-sign the final bytes (the last change before the upstream); a Reply when the
        message cannot be signed and dkim.on_error says to refuse it."""
        runtime, metrics = state.runtime, self.services.metrics
        if not runtime.signer.enabled:
            return content
        try:
            result = await runtime.signer.sign_async(content)
        except DKIMSignError as exc:
            metrics.dkim_signatures.labels("error").inc()
            log.error("txn %s: DKIM signing failed: %s", state.txn.txn_id, exc)
            if runtime.settings.dkim.on_error == "send_unsigned":
                return content
            if exc.permanent:
                return Reply(550, "5.6.0", "The message header cannot be DKIM-signed; check its header lines")
            return R.r451_policy_error(state.txn.txn_id)
        metrics.dkim_signatures.labels("signed" if result.signatures else result.skipped.replace("-", "_")).inc()
        return result.message

    # ---- pauses and backoff ---------------------------------------------------------------

    async def _pause_refusal(self, state: TxnState, stage: str) -> Reply | None:
        """451 when a pause (set by a backoff rule or a blocklist listing) covers this mail.

        The shared state being unreachable never stops mail: pauses fail open, counted in
        sendguard_state_store_errors_total."""
        txn, metrics = state.txn, self.services.metrics
        try:
            pauses = await state.runtime.pauses.active()
        except Exception as exc:
            metrics.state_errors.labels("pauses").inc()
            log.error("txn %s: cannot read pauses from the state store: %s", txn.txn_id, exc)
            return None
        metrics.set_pause_counts(pauses)
        domains = sender_domains(txn)
        for pause in pauses:
            if not pause.covers(txn.message_class, domains):
                continue
            metrics.paused_transactions.labels(pause.scope).inc()
            kind = f"{pause.message_class.capitalize()} mail" if pause.message_class else "Mail"
            what = {
                "class": f"{pause.value.capitalize()} mail",
                "sender": f"{kind} from {pause.value}",
                "all": "Sending" if not pause.message_class else kind,
            }[pause.scope]
            until = time.strftime("%H:%M UTC", time.gmtime(pause.until))
            reply = Reply(451, "4.7.1", f"{what} is paused until {until} because {pause.reason}; try again later"[:480])
            state.results.append(
                PolicyResult(
                    policy="pause",
                    stage=stage,
                    action=Action.TEMPFAIL,
                    mode="enforce",
                    reason=f"{pause.source}: {pause.reason}",
                    reply=reply,
                )
            )
            return reply
        return None

    async def _observe(self, state: TxnState, stage: str, reply: Reply) -> None:
        try:
            await state.runtime.backoff.observe(stage, reply, state.txn)
        except Exception as exc:
            self.services.metrics.state_errors.labels("backoff").inc()
            log.error("txn %s: backoff bookkeeping failed: %s", state.txn.txn_id, exc)

    async def _bounce(self, state: TxnState, recipient: str, reply: Reply, *, tried: bool = True) -> None:
        try:
            await state.runtime.bounces.recipient_tried(state.txn, recipient, reply, count_tried=tried)
        except Exception as exc:
            self.services.metrics.state_errors.labels("bounces").inc()
            log.error("txn %s: bounce bookkeeping failed: %s", state.txn.txn_id, exc)

    # ---- transaction end ------------------------------------------------------------------

    async def _timed_stage(self, runtime: Runtime, stage: str, call: Any) -> StageDecision:
        started = time.perf_counter()
        try:
            decision: StageDecision = await call
        finally:
            self.services.metrics.policy_duration.labels(stage).observe(time.perf_counter() - started)
        return decision

    async def abandon(self, why: str) -> None:
        """The client left the transaction (RSET, EHLO, QUIT, disconnect, a new MAIL)."""
        state = self.state
        if state is not None and state.failed is not None:
            self.state = None  # already ended by fail(); the client has moved on
        elif state is not None:
            await self._end(state, "abandoned", client_reply=None, note=why)

    async def fail(self, reply: Reply) -> None:
        """An internal error: end the transaction upstream but keep answering its commands
        with a 4xx, so the client retries the whole message instead of bouncing recipients."""
        state = self.state
        if state is None:
            return
        await self._end(state, "tempfailed", client_reply=reply, note="internal error")
        state.failed = reply
        self.state = state  # kept (ended) only to answer the rest of the transaction

    async def _end(
        self,
        state: TxnState,
        outcome: str,
        *,
        client_reply: Reply | None,
        upstream_reply: Reply | None = None,
        note: str = "",
    ) -> None:
        if self.state is not state or state.failed is not None:
            return  # already ended
        self.state = None
        txn, runtime = state.txn, state.runtime
        try:
            if state.upstream is not None:
                if outcome == "delivered":
                    await state.upstream.finish()
                else:
                    await state.upstream.abort()
        except Exception:
            log.exception("txn %s: upstream cleanup failed", txn.txn_id)
        finally:
            delivered = outcome == "delivered"
            recipients: tuple[str, ...] = tuple(txn.recipients) if delivered else ()
            refused = dict(state.refused)
            if state.copies is not None:  # one copy per recipient: each has its own outcome
                recipients = tuple(r for r, reply in state.copies.items() if reply.is_success)
                refused.update({r: reply for r, reply in state.copies.items() if not reply.is_success})
            try:
                outcome_seen = Outcome(
                    delivered=delivered, delivered_recipients=recipients, refused_recipients=refused, reply=client_reply
                )
                await runtime.pipeline.commit(txn, outcome_seen)
            finally:
                runtime.leave()
                # Even when the client vanished during commit: what happened is on record.
                self._account(state, outcome, client_reply, upstream_reply, note)

    def _account(
        self, state: TxnState, outcome: str, client_reply: Reply | None, upstream_reply: Reply | None, note: str
    ) -> None:
        txn = state.txn
        duration = time.monotonic() - state.started
        klass = txn.message_class or "unknown"
        self.services.metrics.messages.labels(txn.listener, klass, outcome).inc()
        raw_ids = txn.message.raw_header_values("Message-ID") if txn.message is not None else []
        message_id = raw_ids[0].strip() if raw_ids else None
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "txn": txn.txn_id,
            "listener": txn.listener,
            "client": txn.client_ip,
            "helo": txn.helo,
            "tls": txn.tls,
            "auth_user": txn.auth_user,
            "sender": txn.mail_from,
            "recipients": list(txn.recipients),
            "refused": {rcpt: reply.line() for rcpt, reply in state.refused.items()},
            "class": txn.message_class,
            "class_reason": state.class_reason,
            "message_id": message_id,
            "size": txn.size,
            "policies": [r.as_dict() for r in state.results],
            "upstream_reply": upstream_reply.line() if upstream_reply else None,
            "copies": {r: reply.line() for r, reply in state.copies.items()} if state.copies is not None else None,
            "reply": client_reply.line() if client_reply else None,
            "outcome": outcome,
            "duration_ms": round(duration * 1000, 1),
            "config": state.runtime.settings.digest,
        }
        if note:
            entry["note"] = note
        self.services.audit.write(entry)
        domain = txn.mail_from.rsplit("@", 1)[-1] if "@" in txn.mail_from else ""
        txn_log.info(
            "transaction %s",
            outcome,
            extra={
                "fields": {
                    "txn": txn.txn_id,
                    "listener": txn.listener,
                    "client": txn.client_ip,
                    "user": txn.auth_user,
                    "sender_domain": domain,
                    "rcpts": len(txn.recipients),
                    "refused": len(state.refused),
                    "class": txn.message_class,
                    "size": txn.size,
                    "outcome": outcome,
                    "reply": client_reply.line() if client_reply else None,
                    "policies": ",".join(
                        f"{r.policy}={r.action}" for r in state.results if r.action is not Action.ACCEPT
                    )
                    or None,
                    "ms": round(duration * 1000, 1),
                }
            },
        )
