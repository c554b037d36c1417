"""What each SMTP command does in a session: the aiosmtpd handler.

The commands check what is the session's to check (relay authorization, address syntax,
the recipient limit, duplicates, timeouts) and hand the rest to one
``proxy.relay.transaction.RelayTransaction`` per transaction (policies, the upstream) and,
after DATA, to ``proxy.relay.delivery.deliver``; the client gets the reply they return.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Coroutine
from typing import Any, Protocol

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import Envelope, Session

from policies.base import Reply, Transaction
from proxy import replies as R
from proxy.addresses import address_key, relayable_recipient
from proxy.relay.delivery import deliver
from proxy.relay.dsn import DSN_PARAMETERS, DSNParameterError, dsn_parameters
from proxy.relay.runtime import Runtime
from proxy.relay.trace import Hop, client_name
from proxy.relay.transaction import RelayTransaction
from proxy.smtp.forwarding import XCLIENT_ATTRIBUTES, XFORWARD_ATTRIBUTES
from proxy.smtp.listener import ListenerState, Services
from proxy.smtp.reflection import ReflectedNames
from proxy.smtp.session import SendguardSMTP, new_txn_id

__all__ = ("AppHandle", "RelayHandler")

log = logging.getLogger("sendguard.smtp")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


class RelayHandler(ReflectedNames):
    """The aiosmtpd handler of one session: relay authorization, then the lockstep relay."""

    def __init__(self, app: AppHandle, listener: ListenerState) -> None:
        self.app = app
        self.listener = listener
        self.server: SendguardSMTP | None = None
        #: The transaction in progress; kept after an internal error (``failed``) only to
        #: answer the rest of its commands.
        self.state: RelayTransaction | None = None
        #: The client's verified name for the Received field, looked up once per session
        #: (and again should the client address change, as a PROXY header can set it).
        self._client_name: tuple[str, str | None] | None = None

    @property
    def current_txn_id(self) -> str | None:
        return self.state.txn.txn_id if self.state else None

    @property
    def services(self) -> Services:
        return self.app.services

    def _begin(self, txn: Transaction, *, smtputf8: bool, hop: Hop) -> RelayTransaction:
        state = RelayTransaction.begin(self.app.runtime, self.services, txn, smtputf8=smtputf8, hop=hop)

        def forget() -> None:
            if self.state is state:
                self.state = None
            if self.server is not None:
                self.server.end_xforward()  # XFORWARD describes one transaction (XFORWARD_README)

        state.on_end = forget
        self.state = state
        return state

    # ---- session-level hooks --------------------------------------------------------------

    async def handle_EHLO(
        self, server: SendguardSMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        await self.abandon("reset")
        server.end_xforward()
        session.host_name = hostname
        config = self.listener.config
        caps = self.app.runtime.upstream.capabilities
        size = int(config.max_message_size)
        if caps is not None and caps.size:
            size = min(size, caps.size)
        # DSN (RFC 3461) only when the upstream offers it: it then does what the parameters ask
        # (success, delay and failure reports). Offered without it, sendguard would owe the
        # sender "relayed" notices (RFC 3461 5.2.2) it has no way to send in lockstep.
        dsn = caps is not None and caps.dsn
        server.dsn_offered = dsn
        if dsn:
            # RFC 3461 5: ENVID and RET make MAIL up to 110 octets longer, ORCPT and NOTIFY a
            # RCPT up to 515.
            server.command_size_limits["MAIL"] = max(server.command_size_limits["MAIL"], 512 + 26 + 10 + 110)
            server.command_size_limits["RCPT"] = max(server.command_size_limits["RCPT"], 512 + 515)
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
                # RFC 2920: the command loop reads one command at a time from a buffer that
                # keeps whatever else the client sent (body.py leaves the commands after the
                # final dot there too), so replies come one per command, in order.
                out.append("250-PIPELINING")
                if dsn:
                    out.append("250-DSN")
                # Offered only to the hosts allowed to use them (Postfix does the same).
                if server.xclient_allowed:
                    out.append("250-XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
                if server.xforward_allowed:
                    out.append("250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
            out.append(line)
        return out

    async def handle_PROXY(self, server: SendguardSMTP, session: Session, envelope: Envelope, proxy: ProxyData) -> bool:
        """A PROXY header on a listener with ``proxy_protocol`` (only trusted balancers get
        this far): the address it carries is the client's."""
        return server.accept_proxy(proxy)

    async def handle_HELO(self, server: SendguardSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        await self.abandon("reset")
        server.end_xforward()
        server.dsn_offered = False  # no extensions after HELO (RFC 5321 4.1.1.1)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: SendguardSMTP, session: Session, envelope: Envelope) -> str:
        await self.abandon("reset")
        server.end_xforward()
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
        """Who may relay (Postfix: permit_mynetworks, permit_sasl_authenticated, reject). Judged
        on the session's client: the connection's, or XCLIENT's, never XFORWARD's (the MTA
        that forwards has applied its own relay rules; ``proxy.smtp.forwarding``)."""
        assert self.server is not None
        config = self.listener.config
        if session.authenticated:
            return None
        if config.auth == "required":
            return R.R530_AUTH_REQUIRED
        if self.listener.is_trusted(self.server.session_ip):
            return None
        if config.auth == "optional" and self.server.can_authenticate:
            return R.R530_AUTH_REQUIRED
        return R.R550_RELAY_DENIED

    async def handle_MAIL(
        self, server: SendguardSMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if server.limit_refusal is not None:
            # XFORWARD named a client already over its session cap: as a new connection of
            # its own would be, it is refused, and this connection closes after the reply.
            server.close_with_next_reply = True
            return server.limit_refusal.line()
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
        try:
            dsn = dsn_parameters(server.raw_params, "MAIL") if server.dsn_offered else []
        except DSNParameterError as bad:
            return bad.reply.line()
        # The DSN parameters as the client wrote them (ENVID keeps its case), the others as
        # aiosmtpd hands them over.
        options = [o.upper() for o in mail_options if o.partition("=")[0].upper() not in DSN_PARAMETERS] + dsn
        smtputf8 = "SMTPUTF8" in options
        if not smtputf8 and not sender.isascii():
            return R.R553_SMTPUTF8_REQUIRED.line()

        login = getattr(session.auth_data, "login", None)
        auth_user = login.decode("utf-8", "replace") if isinstance(login, bytes) else None
        txn = Transaction(
            txn_id=new_txn_id(),
            listener=self.listener.name,
            client_ip=server.client_ip,
            helo=server.client_helo(),
            auth_user=auth_user if session.authenticated else None,
            tls=session.ssl is not None or self.listener.config.tls.mode == "implicit",
            mail_from=sender,
        )
        hop = await self._hop(server, session, txn)
        state = self._begin(txn, smtputf8=smtputf8, hop=hop)
        state.forwarded = server.forwarding_record()
        reply = await state.mail(options)
        if reply.is_success:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply.line()

    async def _hop(self, server: SendguardSMTP, session: Session, txn: Transaction) -> Hop:
        """What our Received field says of this client (RFC 5321 4.4). A forwarded client is
        described as the MTA in front saw it, as Postfix does after XCLIENT or XFORWARD: its
        address, the name that MTA verified (its own lookup; "unknown" when it had none) and
        its HELO; the TLS details are those of this hop."""
        ip = server.client_ip
        name_given, name = server.forwarded("NAME")
        if not name_given:
            if self._client_name is None or self._client_name[0] != ip:
                self._client_name = (ip, await client_name(self.app.runtime.resolver, ip))
            name = self._client_name[1]
        proto_given, proto = server.forwarded("PROTO")
        esmtp = bool(session.extended_smtp)
        if proto_given and proto is not None:
            esmtp = proto != "SMTP"
        version, cipher, bits = server.tls_info()
        return Hop(
            client_ip=ip,
            client_name=name,
            helo=txn.helo,
            by=server.hostname,
            esmtp=esmtp,
            tls_version=version,
            tls_cipher=cipher,
            tls_bits=bits,
            authenticated=txn.auth_user is not None,
            auth_user=txn.auth_user if self.listener.config.received_auth_user else None,
        )

    # ---- RCPT -----------------------------------------------------------------------------

    async def handle_RCPT(
        self, server: SendguardSMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        state = self.state
        if state is None:
            return R.R503_NEED_MAIL.line()
        if state.failed is not None:
            return state.failed.line()
        reply = self._check_recipient_syntax(state, address)
        if reply is not None:
            state.refused_recipient(reply, by="policy")
            return reply.line()
        try:
            dsn = dsn_parameters(server.raw_params, "RCPT") if server.dsn_offered else []
        except DSNParameterError as bad:
            return bad.reply.line()
        # aiosmtpd hands over the addr-spec with needless quotes dropped ("bob2"@x is bob2@x,
        # proxy.addresses.envelope_address reads it the same way for sendguard check); two
        # spellings of one mailbox (case, trailing dot, IDN) are one recipient.
        if address_key(address) in state.seen:
            return R.R250_DUPLICATE_RECIPIENT.line()  # relayed once (Postfix dedups in cleanup too)
        reply = await state.rcpt(address, dsn)
        if reply.is_success:
            envelope.rcpt_tos.append(address)
        return reply.line()

    def _check_recipient_syntax(self, state: RelayTransaction, address: str) -> Reply | None:
        if address in ("<>", ""):
            return R.R501_NULL_RECIPIENT
        if not relayable_recipient(address):  # the same test sendguard check applies to --to
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
        settings = state.runtime.settings
        # The idle timer ran from the DATA command through the upload; the relay gets its own
        # budget: every policy's timeout plus the upstream's data timeout, and a margin.
        budget = sum(e.timeout for e in settings.policies) + (settings.upstream.timeouts.data + 30)
        server._reset_timeout(budget)
        server.in_data = True
        try:
            delivered = await deliver(state, envelope.original_content or b"", keepalive=server._reset_timeout)
        finally:
            server.in_data = False
        await state.end(delivered.outcome, client_reply=delivered.reply, upstream_reply=delivered.upstream_reply)
        # The transaction is over and on record: let go of it (and its message, which may be
        # 25 MB) now, not when the client next says MAIL, RSET or QUIT.
        if self.state is state:
            self.state = None
        if delivered.outcome == "delivered":
            server.errors = 0  # Postfix counts errors "without delivering mail"
        return delivered.reply.line()

    # ---- transaction end ------------------------------------------------------------------

    async def abandon(self, why: str) -> None:
        """The client left the transaction (RSET, EHLO, QUIT, disconnect, a new MAIL)."""
        state = self.state
        if state is not None and state.failed is not None:
            self.state = None  # already ended by fail(); the client has moved on
        elif state is not None:
            await state.abandon(why)

    async def fail(self, reply: Reply) -> None:
        """An internal error: end the transaction upstream but keep answering its commands
        with a 4xx, so the client retries the whole message instead of bouncing recipients."""
        state = self.state
        if state is None:
            return
        await state.fail(reply)
        self.state = state  # kept (ended) only to answer the rest of the transaction
