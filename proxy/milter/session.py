"""One milter connection, on the event loop: the MTA's events in, sendguard's answers out.

The MTA (Postfix's smtpd, Sendmail) owns the SMTP session and its queue; sendguard sees the
session through the milter's events and answers each with an action. The transaction is the
proxy's own ``RelayTransaction`` driven through the same stages as a session drives it
(``begin`` -> ``mail`` -> ``rcpt``... -> ``delivery.deliver`` -> ``end``), so policies,
classification, pauses, audit line and metrics are the proxy's; only its upstream differs:
``MtaUpstream`` accepts the envelope and takes the final message back, which the milter
turns into header actions (``headers.py``) on the message the MTA holds."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from policies.base import Reply, Transaction
from proxy import replies as R
from proxy.config.settings import MILTER_LISTENER, Settings
from proxy.milter.headers import HeaderAction, header_actions, join_fields, split_fields
from proxy.relay.delivery import deliver
from proxy.relay.rawmsg import Outgoing
from proxy.relay.runtime import Runtime
from proxy.relay.trace import Hop
from proxy.relay.transaction import RelayTransaction, Reporting
from proxy.relay.upstream import Capabilities

__all__ = ("MilterHost", "MilterSession", "MtaUpstream", "Peer", "milter_config_errors")

log = logging.getLogger("sendguard.milter")


class MilterHost(Protocol):
    """What a milter session needs from the process (``proxy.app.App`` is one)."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def services(self) -> Reporting: ...


def milter_config_errors(settings: Settings) -> list[str]:
    """What this config asks that a milter cannot do: it can edit the one message the MTA
    holds, never send one copy per recipient."""
    errors: list[str] = []
    for entry in settings.policies:
        if entry.mode != "enforce":
            continue
        option = entry.policy_class.splits(entry.options)
        if option is not None:
            errors.append(
                f"policies.{entry.id}: {option} delivers one copy per recipient, which a milter cannot; "
                "use it with sendguard serve, or choose another option"
            )
    return errors


def _personal_classes(settings: Settings) -> frozenset[str]:
    """Classes of mail some enforcing policy gives each recipient its own fields or footer."""
    classes: set[str] = set()
    for entry in settings.policies:
        if entry.mode == "enforce" and entry.policy_class.personal_edits(entry.options):
            classes.update(entry.classes)
    return frozenset(classes)


@dataclass
class Peer:
    """The client as the MTA saw it (the connect event and its macros)."""

    client_ip: str
    client_name: str | None = None
    helo: str | None = None
    #: The MTA's name ({j}): ours in the Received field.
    by: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None
    auth_user: str | None = None


class MtaUpstream:
    """The MTA as the transaction's upstream: it has the envelope already and keeps what the
    client sent; the final message comes back here for the header actions."""

    capabilities = Capabilities(smtputf8=True, eightbitmime=True, size=None, dsn=False)
    lost = False

    def __init__(self) -> None:
        self.final: Outgoing | None = None

    def discard(self) -> None:
        self.final = None

    async def mail(self, sender: str, options: list[str], origin: Hop | None = None) -> Reply:
        # The MTA knows its client already: XFORWARD (origin) is for an upstream that does not
        return Reply(250, "2.1.0", "Sender ok")

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        return Reply(250, "2.1.5", "Recipient ok")

    async def data(self, content: bytes | Outgoing) -> Reply:
        self.final = content if isinstance(content, Outgoing) else Outgoing.of(content)
        return Reply(250, "2.0.0", "Ok: the MTA queues it")

    async def finish(self) -> None:
        return None

    async def abort(self) -> None:
        self.final = None


@dataclass
class EndOfMessage:
    """The answer at end of message: a refusal (``reply``) or the header actions and, when
    the body changed (a footer), the new body."""

    reply: Reply | None = None
    actions: list[HeaderAction] = field(default_factory=list)
    body: bytes | None = None


class MilterSession:
    """One milter connection's transactions (one at a time)."""

    def __init__(self, host: MilterHost, peer: Peer, *, max_message_size: int) -> None:
        self.host = host
        self.peer = peer
        self.max_message_size = max_message_size
        self.relay: RelayTransaction | None = None
        self.upstream: MtaUpstream | None = None

    async def mail(self, sender: str, params: Sequence[str]) -> Reply | None:
        """MAIL: the policies' MAIL stage and the pauses; a refusal, or None to go on."""
        await self.abandon("new transaction")
        runtime, peer = self.host.runtime, self.peer
        txn = Transaction(
            txn_id=secrets.token_hex(6),
            listener=MILTER_LISTENER,
            client_ip=peer.client_ip,
            helo=peer.helo,
            auth_user=peer.auth_user,
            tls=peer.tls_version is not None,
            mail_from=sender,
        )
        hop = Hop(
            client_ip=peer.client_ip,
            client_name=peer.client_name,
            helo=peer.helo,
            by=peer.by or self.host.services.hostname,
            tls_version=peer.tls_version,
            tls_cipher=peer.tls_cipher,
            tls_bits=peer.tls_bits,
            authenticated=peer.auth_user is not None,
        )
        options = [p.upper() for p in params]
        relay = RelayTransaction.begin(runtime, self.host.services, txn, smtputf8="SMTPUTF8" in options, hop=hop)
        upstream = MtaUpstream()
        relay.open_upstream = lambda _txn_id: _opened(upstream)
        relay.one_message = True
        self.relay, self.upstream = relay, upstream
        reply = await relay.mail(options)
        if reply.is_success:
            return None
        self.relay = None  # mail() ended it
        return reply

    async def rcpt(self, recipient: str, params: Sequence[str]) -> Reply | None:
        relay = self.relay
        if relay is None:
            return None  # a transaction sendguard already refused: the MTA will not go on
        if relay.failed is not None:
            return relay.failed
        if relay.txn.recipients and self._one_recipient_at_a_time(relay):
            return R.R452_ONE_RECIPIENT_AT_A_TIME
        reply = await relay.rcpt(recipient)
        return None if reply.is_success else reply

    def _one_recipient_at_a_time(self, relay: RelayTransaction) -> bool:
        """A policy may give this mail's recipients their own fields or footer: the one
        message the MTA sends can carry one recipient's (RFC 5321 4.5.3.1.10: a client
        retries a 452 recipient in a later transaction)."""
        classes = _personal_classes(relay.runtime.settings)
        klass = relay.txn.message_class
        return bool(classes) and (klass is None or klass in classes)

    async def end_of_message(self, fields: list[tuple[str, str]], body: bytes) -> EndOfMessage:
        relay, upstream = self.relay, self.upstream
        if relay is None or upstream is None:
            return EndOfMessage(R.R503_NEED_RCPT)
        self.relay = None
        if not relay.txn.recipients:
            await relay.end("rejected", client_reply=R.R503_NEED_RCPT)
            return EndOfMessage(R.R503_NEED_RCPT)
        head = join_fields(fields)
        if len(head) + len(body) > self.max_message_size:
            reply = R.r552_message_too_big(self.max_message_size)
            await relay.end("rejected", client_reply=reply)
            return EndOfMessage(reply)
        received = head + b"\r\n" + body
        try:
            delivered = await deliver(relay, received)
        except Exception:
            log.exception("txn %s: milter end of message failed", relay.txn.txn_id)
            reply = R.r451_policy_error(relay.txn.txn_id)
            await relay.fail(reply)
            return EndOfMessage(reply)
        final = upstream.final
        if delivered.outcome != "delivered" or final is None:
            await relay.end(delivered.outcome, client_reply=delivered.reply, upstream_reply=delivered.upstream_reply)
            return EndOfMessage(delivered.reply)
        actions = header_actions(fields, split_fields(final.head))
        if actions is None:  # cannot happen with the relay's edits; never send a guess
            log.error("txn %s: the final header block is not an edit of the MTA's", relay.txn.txn_id)
            reply = R.r451_policy_error(relay.txn.txn_id)
            await relay.end("tempfailed", client_reply=reply, note="milter: header edits not expressible")
            return EndOfMessage(reply)
        rest = bytes(final.rest)
        new_body = None if rest == b"\r\n" + body else rest[2:]
        await relay.end("delivered", client_reply=delivered.reply, upstream_reply=delivered.upstream_reply)
        return EndOfMessage(None, actions, new_body)

    async def abandon(self, why: str) -> None:
        """The MTA aborted the transaction (RSET, another milter's or its own refusal, the
        client gone) or closed the connection."""
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.abandon(why)


async def _opened(upstream: MtaUpstream) -> MtaUpstream:
    return upstream
