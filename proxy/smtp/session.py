"""SMTP in: the aiosmtpd session with sendguard's limits, timeouts, replies and AUTH.

What the commands do is ``proxy.smtp.commands``; the transactions they start are
``proxy.relay`` (policies, the upstream, the delivery of the message). This module knows
connections and replies: session limits per listener and per client, the session timer,
the error limit, aiosmtpd's replies rewritten with enhanced status codes, and AUTH.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
from typing import Any, Protocol

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, Session, syntax

from policies.base import Reply
from proxy import replies as R
from proxy.observability.memory import release_memory
from proxy.relay.dsn import DSN_PARAMETERS
from proxy.schema import address_in
from proxy.smtp.body import END_LINE, BodyCollector, BodyState, ends_data
from proxy.smtp.forwarding import ForwardSyntaxError, parse_attributes
from proxy.smtp.listener import ListenerState, Services
from proxy.smtp.reflection import ReflectedNames

__all__ = ("SendguardSMTP", "SessionHandler", "new_txn_id")

log = logging.getLogger("sendguard.smtp")

_MAX_ERRORS = 20  # Postfix smtpd_hard_error_limit
# Only protocol errors (bad syntax, wrong sequence, failed AUTH) count towards the limit:
# refusing recipients is normal business (a newsletter with thirty addresses without
# consent), and "too many recipients" must leave the client free to send the rest later.
_PROTOCOL_ERROR = re.compile(r"^(50[0-4] |5\d\d 5\.5\.|53[05] |538 )")
# The everyday MAIL/RCPT path, <dot-atom@host.name> and what follows it, which aiosmtpd's
# email-parser reading returns unchanged (RFC 5322 3.4.1: a dot-atom local part is never
# quoted); anything else (quoted, literal, UTF-8, comments, <>) takes aiosmtpd's own path.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


def new_txn_id() -> str:
    return secrets.token_hex(6)


class SessionHandler(Protocol):
    """What the session needs from its command handler (``proxy.smtp.commands.RelayHandler``)."""

    server: SendguardSMTP | None

    @property
    def current_txn_id(self) -> str | None: ...

    async def fail(self, reply: Reply) -> None:
        """An internal error: end the transaction in progress with this reply."""

    async def abandon(self, why: str) -> None:
        """The client left the transaction in progress (XCLIENT starts the session anew)."""

    def connection_lost(self) -> None: ...


class _Session(Session):
    """aiosmtpd's session without the deprecated ``login_data`` property, which aiosmtpd
    itself sets on every successful AUTH (a "deprecated" warning in the log each time); the
    login lives in ``auth_data``, where sendguard reads it."""

    login_data: object = None


class SendguardSMTP(ReflectedNames, SMTP):
    """aiosmtpd's SMTP with sendguard's limits, AUTH, replies and exception handling."""

    AuthLoginUsernameChallenge = "Username:"  # aiosmtpd's "User Name\x00" breaks Go and curl (#566)
    AuthLoginPasswordChallenge = "Password:"

    def __init__(
        self,
        handler: SessionHandler,
        listener: ListenerState,
        services: Services,
        idle_timeout: float,
        session_timeout: float,
        *,
        command_timeout: float = 60.0,
        stress_idle: float = 10.0,
    ) -> None:
        config = listener.config
        self.line_length_limit = int(config.max_line_length)  # read by SMTP.__init__ for the stream limit
        self.listener = listener
        self.services = services
        self.relay = handler
        self._session_timeout = session_timeout
        self._session_timer: asyncio.TimerHandle | None = None
        self._command_timeout = command_timeout
        self._stress_idle = stress_idle
        self._command_timer: asyncio.TimerHandle | None = None
        self._reading_body = False
        self._counted_ip: str | None = None
        self.errors = 0
        #: The address of the TCP peer (a PROXY header's address where one came): the host
        #: XFORWARD is authorized for.
        self.connection_ip = ""
        #: The session's client: the connection's, or an XCLIENT's ADDR. Relay authorization,
        #: AUTH over plaintext and XCLIENT itself are judged on it.
        self.session_ip = ""
        #: The client every limit, rate limit, audit line and Received field names: the
        #: session's, or the ADDR of an XFORWARD for the transaction in progress.
        self.client_ip = ""
        #: What the last XCLIENT said (upper-case attribute -> value; None: unavailable), for
        #: the rest of the session; what XFORWARD said, until the transaction ends.
        self.xclient: dict[str, str | None] = {}
        self.xforward: dict[str, str | None] = {}
        #: Set when an XFORWARD moved the session to an address over its session cap: the
        #: next MAIL gets it and the session closes.
        self.limit_refusal: Reply | None = None
        self.in_data = False
        self.close_after_reply = False
        #: Close the connection once the next reply is written (that reply says why).
        self.close_with_next_reply = False
        #: DSN (RFC 3461) was offered in the last EHLO: its parameters are then known.
        self.dsn_offered = False
        #: The parameters of the MAIL or RCPT command being handled, as the client wrote them
        #: (aiosmtpd hands the handler upper-cased ones; ENVID and ORCPT values keep case).
        self.raw_params: list[str] = []
        #: A listener with PROXY protocol: connected from a balancer, its header not yet read.
        self._awaiting_proxy = False
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
            # aiosmtpd reads the PROXY header (v1 or v2) before the greeting and hands it to
            # handle_PROXY, which calls accept_proxy below.
            proxy_protocol_timeout=float(config.proxy_protocol.timeout) if config.proxy_protocol.trusted else None,
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
        self.client_ip = self.session_ip = self.connection_ip = str(peer[0]) if peer else ""
        if self.listener.config.proxy_protocol.trusted:
            # The client is known only from the PROXY header (accept_proxy); only the balancers
            # may send one: anyone else could claim any address (a trusted one, say).
            if not address_in(self.client_ip, self.listener.config.proxy_protocol.trusted):
                log.warning(
                    "refusing connection from %s on %s: not a trusted PROXY protocol sender",
                    self.client_ip,
                    self.listener.name,
                )
                self._refuse(None, "refused_proxy")
            else:
                self._awaiting_proxy = True
            return
        self._admit()

    def accept_proxy(self, proxy: ProxyData) -> bool:
        """The PROXY header from a trusted balancer: the client address it carries is the
        client's from here on. A LOCAL (v2) or UNKNOWN (v1) header, a balancer's own health
        check, keeps the balancer's address (as the protocol asks). False: close."""
        if not proxy.valid:
            return False  # counted as it closes, with the headers that never came or were broken
        self._awaiting_proxy = False
        if proxy.src_addr is not None:
            log.debug("PROXY from %s: client %s", self.client_ip, proxy.src_addr)
            self.client_ip = self.session_ip = self.connection_ip = str(proxy.src_addr)
        return self._admit(in_loop=True)

    def _admit(self, *, in_loop: bool = False) -> bool:
        """Admit the client at ``client_ip`` (its session limits), or refuse it with a 421."""
        self._set_auth_require_tls()
        listener, metrics = self.listener, self.services.metrics
        config = listener.config
        refused = R.R421_SERVER_BUSY if listener.active >= config.max_sessions else self._per_ip_refusal(self.client_ip)
        if refused is not None:
            # Refuse before the greeting (RFC 5321 3.1: a 421 greeting) and close.
            log.warning("refusing session from %s on %s: %s", self.client_ip, listener.name, refused.text)
            self._refuse(refused, "refused_limit", in_loop=in_loop)
            return False
        self._counted_ip = self.client_ip
        listener.active += 1
        listener.per_ip[self.client_ip] += 1
        listener.sessions.add(self)
        metrics.sessions.labels(listener.name, "accepted").inc()
        metrics.sessions_active.labels(listener.name).inc()
        self._session_timer = self.loop.call_later(self._session_timeout, self._session_expired)
        listener.update_stress(metrics)
        return True

    def _set_auth_require_tls(self) -> None:
        # Loopback clients may AUTH without TLS (nothing crosses a network); others only
        # over TLS. An implicit-TLS connection is encrypted from its first byte.
        implicit = self.listener.config.tls.mode == "implicit"
        self._auth_require_tls = not (
            implicit or address_in(self.session_ip, self.listener.config.plaintext_auth_networks)
        )

    def _per_ip_refusal(self, ip: str) -> Reply | None:
        """The 421 for one more session from ``ip``, if it is over its per-IP cap."""
        listener, config = self.listener, self.listener.config
        if listener.per_ip[ip] >= config.max_sessions_per_ip:
            return R.R421_TOO_MANY_SESSIONS
        if listener.stress and listener.per_ip[ip] >= config.stress_sessions_per_ip:
            # Under stress an address gets its fair share of what is left: otherwise a few
            # addresses that reconnect as fast as they are shed keep every slot.
            return R.R421_BUSY_FOR_YOUR_ADDRESS
        return None

    def _count_as(self, ip: str, *, force: bool = False) -> Reply | None:
        """Count this session under another client address (XCLIENT, XFORWARD): the 421 when
        that address is over its cap (the session stays counted where it was), else None.
        ``force``: move even over the cap (back to where the session was counted before)."""
        old = self._counted_ip
        if old is None or old == ip:
            return None
        refused = None if force else self._per_ip_refusal(ip)
        if refused is not None:
            return refused
        per_ip = self.listener.per_ip
        per_ip[old] -= 1
        if per_ip[old] <= 0:
            del per_ip[old]
        per_ip[ip] += 1
        self._counted_ip = ip
        return None

    # ---- XCLIENT and XFORWARD (proxy.smtp.forwarding) ---------------------------------------

    @property
    def xclient_allowed(self) -> bool:
        """Postfix judges XCLIENT on the client as it stands, so after an XCLIENT that names
        another address, a second one needs that address to be listed too."""
        return address_in(self.session_ip, self.listener.config.xclient_hosts)

    @property
    def xforward_allowed(self) -> bool:
        return address_in(self.connection_ip, self.listener.config.xforward_hosts)

    def forwarded(self, name: str) -> tuple[bool, str | None]:
        """(given, value) of a client attribute: XFORWARD's for this transaction, else XCLIENT's."""
        for told in (self.xforward, self.xclient):
            if name in told:
                return True, told[name]
        return False, None

    def client_helo(self) -> str | None:
        """The client's HELO name: XFORWARD's for this transaction (None when the MTA in front
        says it had none: the EHLO of this session is that MTA's own), else XCLIENT's, else
        the session's EHLO (after XCLIENT the sender says EHLO again as the client)."""
        if "HELO" in self.xforward:
            return self.xforward["HELO"]
        session_helo = self.session.host_name if self.session is not None else None
        return self.xclient.get("HELO") or session_helo

    def forwarding_record(self) -> dict[str, Any] | None:
        """For the audit line: who told sendguard about the client, and what."""
        if not self.xclient and not self.xforward:
            return None
        record: dict[str, Any] = {"by": self.connection_ip}
        if self.xclient:
            record["xclient"] = dict(self.xclient)
        if self.xforward:
            record["xforward"] = dict(self.xforward)
        return record

    def _in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    async def _forwarded_attributes(self, command: str, allowed: bool, arg: str) -> dict[str, str | None] | None:
        """The attributes of an XCLIENT or XFORWARD this client may send here and now, or None
        when it got its refusal: not listed (checked first, so that nobody else learns more),
        inside a transaction, bad syntax."""
        if not allowed:
            log.warning("%s refused from %s on %s: not listed for it", command, self.session_ip, self.listener.name)
            await self.push(R.R550_INSUFFICIENT_AUTHORIZATION.line())
            return None
        if self._in_transaction():
            await self.push(R.R503_FORWARD_IN_TRANSACTION.line())
            return None
        try:
            return parse_attributes(command, arg or "")
        except ForwardSyntaxError as bad:
            await self.push(bad.reply.line())
            return None

    async def smtp_XCLIENT(self, arg: str) -> None:
        told = await self._forwarded_attributes("XCLIENT", self.xclient_allowed, arg)
        if told is None:
            return
        if "ADDR" in told:
            ip = told["ADDR"] or "unknown"
            refused = self._count_as(ip)
            if refused is not None:
                # As a new connection from that address would be: a 421 greeting, closed.
                log.warning("XCLIENT from %s: %s over its session cap", self.connection_ip, ip)
                self.close_with(refused)
                return
            self.session_ip = ip
        self.xclient.update(told)
        self.xforward = {}
        self.limit_refusal = None
        self.client_ip = self.session_ip
        self._set_auth_require_tls()
        # The session starts anew (XCLIENT_README): no transaction, no EHLO, no extensions;
        # a LOGIN is the client's SASL login, otherwise the client is not authenticated.
        await self.relay.abandon("xclient")
        session = self.session
        assert session is not None
        session.host_name = None
        session.extended_smtp = False
        self.dsn_offered = False
        login = self.xclient.get("LOGIN")
        session.authenticated = login is not None
        session.auth_data = LoginPassword(login.encode("utf-8"), b"") if login is not None else None  # type: ignore[assignment]
        log.info("XCLIENT from %s: client %s, login %s", self.connection_ip, self.client_ip, login)
        await self.push(f"220 {self.hostname} {self.__ident__}")

    async def smtp_XFORWARD(self, arg: str) -> None:
        told = await self._forwarded_attributes("XFORWARD", self.xforward_allowed, arg)
        if told is None:
            return
        self.xforward.update(told)
        if "ADDR" in told:
            self.client_ip = told["ADDR"] or "unknown"
            self.limit_refusal = self._count_as(self.client_ip)
        await self.push("250 2.0.0 Ok")

    def end_xforward(self) -> None:
        """The transaction is over (or never began: RSET, EHLO): XFORWARD's attributes go."""
        if not self.xforward:
            return
        self.xforward = {}
        self.limit_refusal = None
        self.client_ip = self.session_ip
        self._count_as(self.session_ip, force=True)

    def _refuse(self, reply: Reply | None, outcome: str, *, in_loop: bool = False) -> None:
        """Close before the greeting, with ``reply`` (a 421) when there is one to give.
        ``in_loop``: called from the command loop itself (handle_PROXY), which then ends."""
        self.services.metrics.sessions.labels(self.listener.name, outcome).inc()
        if not in_loop and self._handler_coroutine is not None:
            self._handler_coroutine.cancel()  # the command loop must never greet this client
        transport = self.transport
        assert isinstance(transport, asyncio.WriteTransport)
        if reply is not None:
            transport.write(reply.line().encode("ascii") + b"\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._awaiting_proxy:
            # From a balancer, but no valid PROXY header in time (aiosmtpd closes on a bad one
            # without asking the handler): never greeted, never counted as a session.
            self._awaiting_proxy = False
            log.warning("closed connection from %s on %s: no valid PROXY header", self.client_ip, self.listener.name)
            self.services.metrics.sessions.labels(self.listener.name, "refused_proxy").inc()
        if self._counted_ip is not None:
            listener = self.listener
            listener.active -= 1
            listener.per_ip[self._counted_ip] -= 1
            if listener.per_ip[self._counted_ip] <= 0:
                del listener.per_ip[self._counted_ip]
            listener.sessions.discard(self)
            self.services.metrics.sessions_active.labels(listener.name).dec()
            self._counted_ip = None
            listener.update_stress(self.services.metrics)
        if self._session_timer is not None:
            self._session_timer.cancel()
        self._stop_command_timer()
        super().connection_lost(error)
        self.relay.connection_lost()

    def _session_expired(self) -> None:
        if self.in_data:
            self.close_after_reply = True  # never cut a relay in flight; close after its reply
            return
        log.info("session from %s reached the session time limit", self.client_ip)
        self.close_with(R.R421_SESSION_TIMEOUT)

    # ---- idle and command limits, shorter under stress -------------------------------------

    def _limit(self, normal: float) -> float:
        return min(normal, self._stress_idle) if self.listener.stress else normal

    def _timeout_cb(self) -> None:
        """Idle for too long: say so before closing (as Postfix does), unless a relay is in
        flight (its reply is what the client waits for)."""
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.in_data and not self._awaiting_proxy:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(R.R421_IDLE_TIMEOUT.line().encode("ascii") + b"\r\n")
            self.services.metrics.sessions.labels(self.listener.name, "idle_timeout").inc()
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer (restarted by each complete command; partial bytes do not
        count), at ``timeouts.stress_idle`` while the listener is under stress. An explicit
        duration (the relay's budget) is kept as given."""
        super()._reset_timeout(duration if duration is not None else self._limit(self._timeout_duration))

    def data_received(self, data: bytes) -> None:
        """The command deadline: a command line must be whole within ``timeouts.command``
        (under stress ``stress_idle``) of its first byte, so that a client trickling a byte
        at a time holds a slot that long per command, not the idle limit. Lines of a message
        body are bounded the same way, one by one."""
        if not self.in_data:
            if b"\n" in data:
                self._stop_command_timer()
                if not data.endswith(b"\n"):
                    self._start_command_timer()
            elif self._command_timer is None:
                self._start_command_timer()
        super().data_received(data)

    def _start_command_timer(self) -> None:
        self._command_timer = self.loop.call_later(self._limit(self._command_timeout), self._command_expired)

    def _stop_command_timer(self) -> None:
        if self._command_timer is not None:
            self._command_timer.cancel()
            self._command_timer = None

    def _command_expired(self) -> None:
        self._command_timer = None
        if self.in_data:
            return  # never cut a relay in flight
        log.info("closing session from %s: a command line not complete in time", self.client_ip)
        self.services.metrics.sessions.labels(self.listener.name, "command_timeout").inc()
        self.close_with(R.R421_COMMAND_TIMEOUT)

    def stress_began(self) -> None:
        """The listener came under stress: from now on this session has at most
        ``stress_idle`` to send its next command and to finish the line it is sending. A
        message body being uploaded or relayed keeps its own bound."""
        now = self.loop.time()
        handle = self._timeout_handle
        if handle is not None and not (self.in_data or self._reading_body) and handle.when() - now > self._stress_idle:
            super()._reset_timeout(self._stress_idle)
        timer = self._command_timer
        if timer is not None and timer.when() - now > self._stress_idle:
            self._stop_command_timer()
            self._start_command_timer()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA command with the body read in blocks (``proxy.smtp.body``): the
        same checks, end of data, limits and replies, in one buffer instead of a list of
        lines. The body is bounded by the normal idle limit from the 354, even under stress
        (a client that got this far is allowed to relay; a big upload takes time); the timer
        is restarted at the 354, in push."""
        try:
            if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
                return
            assert self.envelope is not None
            if not self.envelope.rcpt_tos:
                await self.push("503 Error: need RCPT command")
                return
            if arg:
                await self.push("501 Syntax: DATA")
                return
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            collector = await self._read_body()
            if collector is None:
                return  # the connection is gone
            if collector.state is BodyState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
                self._set_post_data_state()  # type: ignore[no-untyped-call]
                return
            if collector.state is BodyState.TOO_MUCH:
                await self.push("552 Error: Too much mail data")
                self._set_post_data_state()  # type: ignore[no-untyped-call]
                return
            content = collector.message()
            size = len(content)
            self.envelope.content = self.envelope.original_content = content
            del content, collector  # the envelope holds the one copy from here
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
            release_memory(size)
        finally:
            self._reading_body = False

    async def _read_body(self) -> BodyCollector | None:
        """Read up to the end-of-data line. Each read returns the stream up to the next
        ".CRLF" (a whole buffer's worth when there is none in it), so pipelined commands after
        the end of data stay in the reader for the command loop."""
        collector = BodyCollector(max_size=self.data_size_limit, max_line_length=self.line_length_limit)
        before = b""  # the last two bytes of the body read so far
        while self.transport is not None:
            try:
                try:
                    piece = await self._reader.readuntil(END_LINE)
                except asyncio.LimitOverrunError as error:
                    # No ".CRLF" within the reader's limit: take what is there but the last
                    # bytes, which may begin one (asyncio keeps len(separator) - 1 of them).
                    piece = await self._reader.read(error.consumed)
                else:
                    if ends_data(piece, before):
                        collector.feed(piece[: -len(END_LINE)])
                        return collector
            except asyncio.CancelledError:
                log.info("connection from %s lost during DATA", self.client_ip)
                self._writer.close()
                raise
            except asyncio.IncompleteReadError:
                # aiosmtpd cancels this coroutine on EOF first; should the stream end anyway,
                # the message is incomplete and is not relayed.
                log.info("connection from %s closed during DATA", self.client_ip)
                return None
            collector.feed(piece)
            before = (before + piece)[-2:]
        return None

    # ---- MAIL and RCPT parameters ---------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = _PLAIN_PATH.match(arg)
        rest: str | None = None
        if plain is not None:
            # Nothing after the path, or one space and a parameter: the parser would drop that
            # space (other blanks and comments there are its business).
            after = arg[plain.end() :]
            if not after or (len(after) > 1 and after[0] == " " and "!" <= after[1] <= "~" and after[1] != "("):
                rest = after[1:]
        address: str | None
        if (
            plain is not None
            and rest is not None
            and not (self.local_part_limit and len(plain.group(1)) > self.local_part_limit)
        ):
            # What aiosmtpd's reading gives for this form, without its per-call class and the
            # email header parser (a tenth of a small message's CPU, for two addresses).
            address = f"{plain.group(1)}@{plain.group(2)}"
        else:
            address, rest = super()._getaddr(arg)
        self.raw_params = rest.split() if rest else []
        return address, rest

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        """aiosmtpd's parameter check, with the DSN parameters known while DSN is offered
        (``proxy.smtp.commands`` checks them); otherwise they are "555 not recognized"."""
        result = super()._getparams(params)
        if result is not None and self.dsn_offered:
            for keyword in DSN_PARAMETERS:
                result.pop(keyword, None)
        return result

    def tls_info(self) -> tuple[str | None, str | None, int | None]:
        """The TLS version, cipher and secret bits of this connection (STARTTLS or implicit),
        for the Received field; Nones without TLS."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return None, None, None
        cipher = ssl_object.cipher()
        if not cipher:
            return ssl_object.version(), None, None
        return ssl_object.version(), cipher[0], cipher[2]

    def close_with(self, reply: Reply) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(reply.line().encode("ascii") + b"\r\n")
            transport.close()

    def _create_session(self) -> Session:
        return _Session(self.loop)

    # ---- replies --------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        text = self._rewrite(text)
        code = text[:3]
        if code == "354" and not self._reading_body:
            self._reading_body = True
            super()._reset_timeout(self._timeout_duration)
        if _PROTOCOL_ERROR.match(text):
            self.errors += 1
        await super().push(text)
        if self.errors >= _MAX_ERRORS and self.transport is not None and not self.transport.is_closing():
            log.warning("closing session from %s after %d errors", self.client_ip, self.errors)
            await super().push("421 4.7.0 Too many errors; closing connection")
            self.transport.close()
        elif self.close_with_next_reply and self.transport is not None:
            self.transport.close()
        elif self.close_after_reply and not self.in_data and code != "354":
            self.close_with(R.R421_SESSION_TIMEOUT)

    def _rewrite(self, text: str) -> str:
        return R.rewrite_aiosmtpd_reply(
            text, line_length_limit=self.line_length_limit, max_message_size=int(self.listener.config.max_message_size)
        )

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
    def can_authenticate(self) -> bool:
        """Whether this client can AUTH here, now or after STARTTLS. (Not named ``auth_*``:
        aiosmtpd offers every attribute so named as a SASL mechanism.)"""
        if self.listener.config.auth == "none":
            return False
        return bool(self._tls_protocol) or not self._auth_require_tls or self.listener.config.tls.mode == "starttls"

    async def smtp_AUTH(self, arg: str) -> None:
        mode = self.listener.config.auth
        if mode == "none":
            await self.push(R.R503_AUTH_NOT_OFFERED.line())
            return
        if self.session is not None and self.session.host_name and not self.session.extended_smtp:
            # AUTH after HELO is a command out of sequence (503), not an unknown one (500):
            # RFC 4954 4 offers it only after EHLO.
            await self.push(R.R503_AUTH_NEEDS_EHLO.line())
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
