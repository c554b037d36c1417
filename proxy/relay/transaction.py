"""One relayed transaction from MAIL to its end, on the relay's side.

The upstream transaction runs alongside the client's (Postfix's before-queue proxy,
Haraka's smtp_proxy): MAIL opens an upstream session and relays MAIL, each RCPT is relayed
and the client gets the upstream's own answer for that recipient, and the client's final
dot gets 250 only after the upstream said 250 for the message (``proxy.relay.delivery``).
Policies sit in front of each step. Nothing is queued here, so nothing can be lost here: a
client that did not get 250 still has its message.

A ``RelayTransaction`` is driven by the SMTP session (``proxy.smtp.commands``) one command
at a time, or by anything else that has an envelope and a message (the tests drive it
directly): ``begin`` -> ``mail`` -> ``rcpt``... -> ``proxy.relay.delivery.deliver`` ->
``end``. Every method answers with the ``Reply`` the client gets; ``end`` commits the
policies' outcome and writes the audit line, the log line and the message metrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from policies.base import Action, Outcome, Reply, Transaction
from proxy import replies as R
from proxy.addresses import address_key
from proxy.observability.logsetup import AuditLog
from proxy.observability.metrics import Metrics
from proxy.relay.pipeline import PolicyResult, StageDecision
from proxy.relay.runtime import Runtime
from proxy.relay.spool import Spool
from proxy.relay.trace import Hop, received_field
from proxy.relay.upstream import UpstreamSession, UpstreamUnavailable
from proxy.reputation.backoff import sender_domains

__all__ = ("RelayTransaction", "Reporting")

# The loggers' names are part of the log format operators filter on: unchanged by the move.
log = logging.getLogger("sendguard.smtp")
txn_log = logging.getLogger("sendguard.txn")


class Reporting(Protocol):
    """What a transaction needs from the process: where it counts, audits and what it calls
    itself in reports (``proxy.smtp.listener.Services`` is one)."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def hostname(self) -> str: ...

    @property
    def spool(self) -> Spool | None: ...


@dataclass(eq=False)
class RelayTransaction:
    """One transaction from MAIL to its end."""

    txn: Transaction
    runtime: Runtime
    services: Reporting
    started: float
    upstream: UpstreamSession | None = None
    smtputf8: bool = False
    results: list[PolicyResult] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    #: ``address_key`` of every recipient the upstream accepted: a second spelling is a duplicate.
    seen: set[str] = field(default_factory=set)
    #: Why the transaction has its class: a short reason at MAIL time, the classifier's
    #: explanation (score, signals, declaration) after DATA.
    class_reason: str | dict[str, Any] = ""
    upstream_lost: bool = False
    relayed_options: list[str] = field(default_factory=list)
    #: Each accepted recipient's DSN parameters as relayed (NOTIFY, ORCPT): its copy's too.
    rcpt_options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Set when the message went out as one copy per recipient: each copy's outcome.
    copies: dict[str, Reply] | None = None
    #: Copies refused for now and put in the retry queue: recipient -> queue row id.
    queued: dict[str, int] = field(default_factory=dict)
    #: Copies refused for good whose recipients are in a DSN queued for the sender.
    reported: set[str] = field(default_factory=set)
    #: Recipients a policy refused after DATA (their copies carry the policy's reply).
    held: frozenset[str] = frozenset()
    #: Final outcomes of the recipients refused before DATA (sendguard_recipients_total
    #: counts every recipient once, when the transaction ends, with the class known then).
    refused_outcomes: Counter[str] = field(default_factory=Counter)
    #: After an internal error the transaction cannot go on: every later RCPT and DATA gets
    #: this 4xx (never a 503 that would bounce recipients) until the client starts anew.
    failed: Reply | None = None
    #: Recipients the upstream answered at RCPT that the bounce-rate denominator has not
    #: counted yet: counted in one store call at the end, or before a hard bounce is judged.
    tried_uncounted: int = 0
    #: Set when ``end`` ran: committed, audited, counted; later calls to ``end`` do nothing.
    ended: bool = False
    #: Called once, as the transaction ends and before its clean-up (the session forgets it).
    on_end: Callable[[], None] | None = None
    #: The hop from the client to us, for our Received field (None: no trace field, as when
    #: the tests drive a transaction without a session).
    hop: Hop | None = None
    #: Who told sendguard about the client and what (XCLIENT, XFORWARD), for the audit line.
    forwarded: dict[str, Any] | None = None
    #: Opens the upstream session for a transaction id (None: the runtime's upstream). The
    #: milter's is the MTA that called it (``proxy.milter``): it takes the final message back.
    open_upstream: Callable[[str], Awaitable[UpstreamSession]] | None = None
    #: Only the one message can leave (the milter: the MTA sends what it received): no
    #: per-recipient copies; a recipient's own edits apply when it is the only recipient.
    one_message: bool = False

    # ---- MAIL -----------------------------------------------------------------------------

    @classmethod
    def begin(
        cls, runtime: Runtime, services: Reporting, txn: Transaction, *, smtputf8: bool, hop: Hop | None = None
    ) -> RelayTransaction:
        """A new transaction for an envelope sender the session has accepted (syntax, relay
        authorization); the caller must ``end`` it."""
        classification = runtime.classifier.from_envelope(txn)
        if classification is not None:
            txn.message_class = classification.message_class
        runtime.enter()
        services.metrics.transactions_in_flight.inc()
        return cls(
            txn=txn,
            runtime=runtime,
            services=services,
            started=time.monotonic(),
            smtputf8=smtputf8,
            class_reason=classification.reason if classification else "",
            hop=hop,
        )

    async def mail(self, options: list[str]) -> Reply:
        """The MAIL stage: the policies, the pauses, then MAIL upstream. Ends the transaction
        when the answer is not a success."""
        runtime = self.runtime
        decision = await self.timed_stage("mail", runtime.pipeline.check_mail(self.txn))
        self.results.extend(decision.results)
        if not decision.accepted:
            assert decision.reply is not None
            await self.end(
                "rejected" if decision.action is Action.REJECT else "tempfailed", client_reply=decision.reply
            )
            return decision.reply

        paused = await self.pause_refusal("mail")
        if paused is not None:
            await self.end("tempfailed", client_reply=paused)
            return paused
        reply = await self._open_upstream(self.txn.mail_from, options)
        await self.observe("mail", reply)
        if not reply.is_success:
            await self.end("tempfailed" if reply.is_temporary else "rejected", client_reply=reply, upstream_reply=reply)
        return reply

    async def _open_upstream(self, sender: str, options: list[str]) -> Reply:
        runtime = self.runtime
        started = time.perf_counter()
        try:
            upstream = await (self.open_upstream or runtime.upstream.open)(self.txn.txn_id)
        except UpstreamUnavailable as exc:
            return exc.reply
        self.upstream = upstream
        caps = upstream.capabilities
        if self.smtputf8 and not caps.smtputf8:
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
            elif option.startswith(("RET=", "ENVID=")):
                # Offered only when the upstream offers DSN; should this connection's not (a
                # reload to another upstream since the client's EHLO), they are left out: the
                # upstream's own defaults then apply (failures reported, nothing else).
                if caps.dsn:
                    relayed.append(option)
                else:
                    log.info("txn %s: upstream does not offer DSN; %s not relayed", self.txn.txn_id, option)
        self.relayed_options = relayed
        reply = await upstream.mail(sender, relayed, self.hop)
        self.services.metrics.upstream_duration.labels("mail").observe(time.perf_counter() - started)
        return reply

    def received_field(self) -> bytes:
        """Our Received field for this transaction (empty without a hop)."""
        if self.hop is None:
            return b""
        return received_field(self.hop, self.txn.txn_id, self.txn.recipients)

    # ---- RCPT -----------------------------------------------------------------------------

    async def rcpt(self, address: str, options: Sequence[str] = ()) -> Reply:
        """The RCPT stage for a recipient the session has accepted (syntax, limits, not a
        duplicate): the policies, then RCPT upstream; the upstream's answer is the client's.
        ``options``: its checked DSN parameters (NOTIFY, ORCPT), relayed when the upstream
        offers DSN and kept for the recipient's own copy."""
        txn, metrics = self.txn, self.services.metrics
        decision = await self.timed_stage("rcpt", self.runtime.pipeline.check_rcpt(txn, address))
        self.results.extend(decision.results)
        if not decision.accepted:
            assert decision.reply is not None
            self.refused[address] = decision.reply
            self.refused_recipient(decision.reply, by="policy")
            return decision.reply

        suppressed = await self.runtime.bounces.refusal(txn, address)
        if suppressed is not None:
            self.refused[address] = suppressed
            self.refused_recipient(suppressed, by="policy")
            return suppressed
        relayed: list[str] = []
        if self.upstream is None or self.upstream_lost:
            reply = R.r451_upstream_lost(txn.txn_id)
        else:
            started = time.perf_counter()
            relayed = list(options) if self.upstream.capabilities.dsn else []
            reply = await self.upstream.rcpt(address, relayed)
            metrics.upstream_duration.labels("rcpt").observe(time.perf_counter() - started)
            await self.observe("rcpt", reply)
            await self.bounce(address, reply)
            self.upstream_lost = self.upstream.lost
        if reply.is_success:
            self.seen.add(address_key(address))
            if relayed:
                self.rcpt_options[address] = tuple(relayed)
            txn.recipients.append(address)  # counted in _account, under the class known by then
        else:
            self.refused[address] = reply
            self.refused_recipient(reply, by="upstream" if self.upstream is not None else "policy")
        return reply

    def refused_recipient(self, reply: Reply, *, by: str) -> None:
        """A recipient refused before DATA (``by``: policy, which is any refusal of sendguard's
        own, or upstream); counted when the transaction ends."""
        self.refused_outcomes["tempfailed" if reply.is_temporary else f"refused_{by}"] += 1

    # ---- pauses, backoff, bounces ---------------------------------------------------------

    async def timed_stage(self, stage: str, call: Awaitable[StageDecision]) -> StageDecision:
        started = time.perf_counter()
        try:
            decision: StageDecision = await call
        finally:
            self.services.metrics.policy_duration.labels(stage).observe(time.perf_counter() - started)
        return decision

    async def pause_refusal(self, stage: str) -> Reply | None:
        """451 when a pause (set by a backoff rule or a blocklist listing) covers this mail.

        The shared state being unreachable never stops mail: pauses fail open, counted in
        sendguard_state_store_errors_total."""
        txn, metrics = self.txn, self.services.metrics
        try:
            pauses = await self.runtime.pauses.active()
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
            self.results.append(
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

    async def observe(self, stage: str, reply: Reply) -> None:
        try:
            await self.runtime.backoff.observe(stage, reply, self.txn)
        except Exception as exc:
            self.services.metrics.state_errors.labels("backoff").inc()
            log.error("txn %s: backoff bookkeeping failed: %s", self.txn.txn_id, exc)

    async def bounce(self, recipient: str, reply: Reply, *, tried: bool = True) -> None:
        """The bounce bookkeeping of one upstream answer: at RCPT (``tried``: the recipient
        counts towards the bounce rate's denominator) or for a copy (counted at its RCPT)."""
        if tried:
            # Counted at the transaction's end: 50 recipients are one store call (one Redis
            # round trip), not 50.
            self.tried_uncounted += 1
        if not self.runtime.bounces.is_dead(reply):
            return
        await self.count_tried()  # a hard bounce is judged with the recipients before it counted
        try:
            await self.runtime.bounces.recipient_tried(self.txn, recipient, reply)
        except Exception as exc:
            self.services.metrics.state_errors.labels("bounces").inc()
            log.error("txn %s: bounce bookkeeping failed: %s", self.txn.txn_id, exc)

    async def count_tried(self) -> None:
        """Count the recipients the bounce rate's denominator has not counted yet."""
        count, self.tried_uncounted = self.tried_uncounted, 0
        if not count:
            return
        try:
            await self.runtime.bounces.count_tried(self.txn, count)
        except Exception as exc:
            self.services.metrics.state_errors.labels("bounces").inc()
            log.error("txn %s: bounce bookkeeping failed: %s", self.txn.txn_id, exc)

    # ---- the end --------------------------------------------------------------------------

    async def abandon(self, why: str) -> None:
        """The client left the transaction (RSET, EHLO, QUIT, disconnect, a new MAIL)."""
        await self.end("abandoned", client_reply=None, note=why)

    async def fail(self, reply: Reply) -> None:
        """An internal error: end the transaction upstream; ``failed`` then answers the rest
        of its commands with a 4xx, so the client retries the whole message instead of
        bouncing recipients."""
        await self.end("tempfailed", client_reply=reply, note="internal error")
        self.failed = reply

    async def end(
        self,
        outcome: str,
        *,
        client_reply: Reply | None,
        upstream_reply: Reply | None = None,
        note: str = "",
    ) -> None:
        """Finish or abort upstream, commit the outcome to the policies, account. Once."""
        if self.ended:
            return
        self.ended = True
        self.services.metrics.transactions_in_flight.dec()
        if self.on_end is not None:
            self.on_end()
        txn, runtime = self.txn, self.runtime
        try:
            if self.upstream is not None:
                if outcome == "delivered":
                    await self.upstream.finish()
                else:
                    await self.upstream.abort()
        except Exception:
            log.exception("txn %s: upstream cleanup failed", txn.txn_id)
        finally:
            delivered = outcome == "delivered"
            recipients: tuple[str, ...] = tuple(txn.recipients) if delivered else ()
            refused = dict(self.refused)
            if self.copies is not None:  # one copy per recipient: each has its own outcome
                # A queued copy counts as sent (limits charged, consent recorded): it is
                # retried until it is delivered, or its sender is told.
                recipients = tuple(r for r, reply in self.copies.items() if self._copy_fate(r, reply) != "refused")
                refused.update({r: reply for r, reply in self.copies.items() if self._copy_fate(r, reply) == "refused"})
            try:
                await self.count_tried()
                outcome_seen = Outcome(
                    delivered=delivered, delivered_recipients=recipients, refused_recipients=refused, reply=client_reply
                )
                await runtime.pipeline.commit(txn, outcome_seen)
            finally:
                runtime.leave()
                # Even when the client vanished during commit: what happened is on record.
                self._account(outcome, client_reply, upstream_reply, note)
                # Nothing reads the message after this. Let go of it (it may be 25 MB) now:
                # the session's objects form reference cycles, which only the garbage
                # collector frees, at a time of its choosing.
                txn.message = None

    def _recipient_outcomes(self, outcome: str, upstream_reply: Reply | None) -> Counter[str]:
        """Every recipient's final outcome: those refused before DATA as they were refused;
        the accepted ones as the message (or, sent as copies, their own copy) ended."""
        fates = Counter(self.refused_outcomes)
        if self.copies is not None:
            for recipient, reply in self.copies.items():
                fate = self._copy_fate(recipient, reply)
                if fate == "refused":
                    if reply.is_temporary:
                        fate = "tempfailed"  # refused for now and not queued (the client retries)
                    else:
                        fate = "refused_policy" if recipient in self.held else "refused_upstream"
                fates[fate] += 1
        elif self.txn.recipients:
            if outcome in ("delivered", "tempfailed", "abandoned"):
                fate = outcome
            elif upstream_reply is not None and not upstream_reply.is_success:
                fate = "refused_upstream"
            else:
                fate = "refused_policy"  # a message-stage policy, the class check, DKIM
            fates[fate] += len(self.txn.recipients)
        return fates

    def _copy_fate(self, recipient: str, reply: Reply) -> str:
        """delivered, queued (in the retry queue) or refused."""
        if reply.is_success:
            return "delivered"
        return "queued" if recipient in self.queued else "refused"

    def _copies_record(self) -> dict[str, dict[str, Any]] | None:
        """Each copy's fate for the audit line: its reply, and its queue row or whether the
        sender gets a DSN."""
        if self.copies is None:
            return None
        record: dict[str, dict[str, Any]] = {}
        for recipient, reply in self.copies.items():
            fate = self._copy_fate(recipient, reply)
            entry: dict[str, Any] = {"fate": fate, "reply": reply.line()}
            if fate == "queued":
                entry["queue_id"] = self.queued[recipient]
            elif fate == "refused":
                entry["reported"] = recipient in self.reported
            record[recipient] = entry
        return record

    def _account(self, outcome: str, client_reply: Reply | None, upstream_reply: Reply | None, note: str) -> None:
        txn = self.txn
        duration = time.monotonic() - self.started
        klass = txn.message_class or "unknown"
        metrics = self.services.metrics
        metrics.messages.labels(txn.listener, klass, outcome).inc()
        metrics.transaction_duration.labels(outcome).observe(duration)
        metrics.tls_transactions.labels(txn.listener, "tls" if txn.tls else "plaintext").inc()
        for fate, count in self._recipient_outcomes(outcome, upstream_reply).items():
            metrics.recipients.labels(txn.listener, klass, fate).inc(count)
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
            "refused": {rcpt: reply.line() for rcpt, reply in self.refused.items()},
            "class": txn.message_class,
            "class_reason": self.class_reason,
            "message_id": message_id,
            "size": txn.size,
            "policies": [r.as_dict() for r in self.results],
            "upstream_reply": upstream_reply.line() if upstream_reply else None,
            "copies": self._copies_record(),
            "reply": client_reply.line() if client_reply else None,
            "outcome": outcome,
            "duration_ms": round(duration * 1000, 1),
            "config": self.runtime.settings.digest,
        }
        if note:
            entry["note"] = note
        if self.forwarded:
            entry["forwarded"] = self.forwarded
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
                    "refused": len(self.refused),
                    "class": txn.message_class,
                    "size": txn.size,
                    "outcome": outcome,
                    "reply": client_reply.line() if client_reply else None,
                    "policies": ",".join(
                        f"{r.policy}={r.action}" for r in self.results if r.action is not Action.ACCEPT
                    )
                    or None,
                    "ms": round(duration * 1000, 1),
                }
            },
        )
