"""Hard bounces: suppress dead addresses, and pause a sender whose bounce rate climbs.

sendguard relays in lockstep, so the upstream's refusal of a recipient arrives at RCPT (or
at the final dot, for a copy sent to one recipient): no bounce message needs parsing. A
refusal whose enhanced status says the address does not exist (5.1.1 bad mailbox, 5.1.2 bad
domain, 5.1.3 bad syntax, 5.1.6 mailbox moved, 5.1.10 null MX, RFC 3463 and RFC 7505;
5.2.1 mailbox disabled) is a hard bounce. An address that hard-bounced ``suppress_after``
times (default 2) over at least ``suppress_span`` (default a day, as Postal does), within
``suppress_window``, is recorded as a ``suppressed`` event in the consent store: sendguard
then refuses it at RCPT for every class of mail and never offers it to the upstream again.
One refusal is not enough: a mailbox server that misbehaves for a minute must not kill the
addresses it touched. An admin lifts a suppression with ``sendguard consent unsuppress``.

Many distinct addresses bouncing within seconds (``burst``) is the upstream's fault, not a
list full of dead addresses: nothing is counted toward suppression, the burst is counted in
``sendguard_bounce_bursts_total`` and commercial mail is paused while it lasts.

Per sending domain (the envelope sender's: bounces go there), the share of hard bounces
among the recipients tried in a rolling window is watched; above the threshold (default
5%, SES reviews accounts at 5% and pauses at 10%) that sender's commercial mail is paused
on every instance, so a stale list cannot ruin the domain's reputation. A minimum volume
keeps one bounce out of three recipients from pausing anyone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import time
from dataclasses import dataclass

from policies.base import Reply, Transaction
from proxy.observability.metrics import Metrics
from proxy.schema import Duration, Rate, doc, parse_rate
from proxy.stores.consent import (
    SUPPRESSED,
    ConsentEvent,
    ConsentInputError,
    ConsentStore,
    active_suppression,
    new_event,
)
from proxy.stores.pauses import Pause, PauseStore

__all__ = ("BounceConfig", "Bounces", "address_counter")

log = logging.getLogger("sendguard.bounces")


def _sender_domain(txn: Transaction) -> str:
    """The envelope sender's domain, lowercased; "" for the null sender (bounces, auto-replies)."""
    return txn.mail_from.rsplit("@", 1)[1].lower() if "@" in txn.mail_from else ""


def address_counter(recipient: str) -> str:
    """The shared-state counter of one address's hard bounces. A plain hash of the address, so
    it names a person to anyone who tries addresses: an erasure deletes it
    (``PauseStore.forget``)."""
    return "bounces:address:" + hashlib.sha256(recipient.strip().lower().encode()).hexdigest()[:32]


#: RFC 3463 / RFC 7505 statuses that mean "this address will never take mail".
DEAD_ADDRESS_STATUSES = ("5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1")


@dataclass(frozen=True)
class BounceConfig:
    suppress: bool = doc("record hard-bounced addresses as suppressed in the consent store", default=True)
    statuses: tuple[str, ...] = doc(
        "enhanced statuses (globs allowed) that mean the address is dead", default=DEAD_ADDRESS_STATUSES
    )
    rate_threshold: float = doc(
        "pause a sender's commercial mail above this hard-bounce share (0.05 = 5%)", default=0.05
    )
    rate_window: Duration = doc("the rolling window of the bounce rate", default=Duration(86400))
    min_recipients: int = doc("recipients tried in the window before the rate counts", default=100)
    pause: Duration = doc("how long a sender's commercial mail stays paused", default=Duration(86400))
    suppress_after: int = doc("hard bounces of one address before it is suppressed", default=2)
    suppress_span: Duration = doc(
        "the first and the last of those at least this far apart (0: at once; ignored for 1)", default=Duration(86400)
    )
    suppress_window: Duration = doc("hard bounces older than this are forgotten", default=Duration(30 * 86400))
    burst: Rate = doc(
        "this many hard bounces (any addresses) this fast mean an upstream fault, not dead addresses",
        default_factory=lambda: parse_rate("20/1m"),
    )
    burst_pause: Duration = doc("how long commercial mail pauses after a burst", default=Duration(1800))

    def __post_init__(self) -> None:
        if self.suppress_after < 1:
            raise ValueError("suppress_after must be at least 1")
        if self.suppress_span >= self.suppress_window:
            raise ValueError("suppress_span must be shorter than suppress_window")
        if not 0 < self.rate_threshold <= 1:
            raise ValueError("rate_threshold is a share between 0 and 1, e.g. 0.05 for 5%")
        if self.min_recipients < 1:
            raise ValueError("min_recipients must be at least 1")
        for status in self.statuses:
            if not status.startswith("5."):
                raise ValueError(f"statuses: {status!r} is not permanent; only 5.x.x means the address is dead")


class Bounces:
    def __init__(
        self, config: BounceConfig, consent: ConsentStore | None, pauses: PauseStore, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.consent = consent
        self.pauses = pauses
        self.metrics = metrics

    async def refusal(self, txn: Transaction, recipient: str) -> Reply | None:
        """550 for an address that hard-bounced before: it is never offered to the upstream
        again, whatever the class of mail (a password reset to a dead mailbox bounces too, and
        counts against the sender's reputation). An admin's own suppressions are the consent
        policy's business, for commercial mail; the store being down lets the mail pass."""
        record = await self._hard_bounce_suppression(txn, recipient)
        if record is None:
            return None
        when = record.effective_at.strftime("%Y-%m-%d")
        return Reply(
            550,
            "5.1.1",
            f"<{recipient}>: this address hard-bounced before ({when}) and is suppressed: remove it from your "
            "list (an administrator lifts it with: sendguard consent unsuppress)"[:450],
        )

    async def _hard_bounce_suppression(self, txn: Transaction, recipient: str) -> ConsentEvent | None:
        if not self.config.suppress or self.consent is None:
            return None
        try:
            events = await self.consent.history(recipient)
        except ConsentInputError:
            return None  # not an address the store can hold (no domain): nothing recorded
        except Exception as exc:  # ConsentStoreError and kin: bookkeeping never stops mail
            log.error("txn %s: cannot look up the suppression of %s: %s", txn.txn_id, recipient, exc)
            if self.metrics is not None:
                self.metrics.state_errors.labels("suppression").inc()
            return None
        record = active_suppression(events)
        return record if record is not None and record.method == "hard_bounce" else None

    def is_dead(self, reply: Reply) -> bool:
        return reply.code >= 500 and any(fnmatch.fnmatchcase(reply.status, s) for s in self.config.statuses)

    async def count_tried(self, txn: Transaction, count: int) -> None:
        """Add ``count`` recipients the upstream answered at RCPT to the sender domain's
        bounce-rate denominator, in one store call: a transaction counts its recipients at
        its end, or before a hard bounce among them is judged, not one call per RCPT."""
        domain = _sender_domain(txn)
        if domain:  # bounces and auto-replies (MAIL FROM:<>) have no sender to pause
            await self.pauses.tally(f"bounces:tried:{domain}", self.config.rate_window, count)

    async def recipient_tried(self, txn: Transaction, recipient: str, reply: Reply) -> None:
        """Called for an upstream answer to one recipient (at RCPT, or a one-recipient copy's),
        once that recipient is counted in the denominator (``count_tried``): a hard bounce
        counts toward the address's suppression and the sender domain's bounce rate."""
        if not self.is_dead(reply):
            return
        if self.metrics is not None:
            self.metrics.hard_bounces.inc()
        counted = not await self._burst(txn) and self.config.suppress and self.consent is not None
        if counted and await self._bounced_enough(recipient):
            await self._suppress(txn, recipient, reply)
        domain = _sender_domain(txn)
        if not domain:
            return  # bounces and auto-replies (MAIL FROM:<>) have no sender to pause
        window = self.config.rate_window
        tried = await self.pauses.tallied(f"bounces:tried:{domain}", window)
        bounced = await self.pauses.hit(f"bounces:hard:{domain}", window)
        if tried < self.config.min_recipients or bounced / tried <= self.config.rate_threshold:
            return
        reason = (
            f"{bounced} of the last {tried} recipients of {domain} hard-bounced ({bounced / tried:.1%}, "
            f"more than {self.config.rate_threshold:.0%}); clean the list"
        )
        await self.pauses.pause(
            Pause("sender", domain, time.time() + self.config.pause, reason, "bounces", message_class="commercial")
        )
        if self.metrics is not None:
            self.metrics.bounce_pauses.inc()
        log.warning("commercial mail from %s paused: %s", domain, reason)

    async def _burst(self, txn: Transaction) -> bool:
        """True while hard bounces come faster than ``burst``: an upstream fault. The first
        bounce over the line pauses commercial mail and is counted once per burst."""
        rate = self.config.burst
        seen = await self.pauses.hit("bounces:burst", rate.period)
        if seen <= rate.count:
            return False
        if seen == rate.count + 1:
            reason = (
                f"the upstream refused {seen} addresses as dead within {rate}: more like an upstream fault "
                "than dead addresses; nothing was suppressed, check the upstream"
            )
            await self.pauses.pause(
                Pause("class", "commercial", time.time() + self.config.burst_pause, reason, "bounces:burst")
            )
            if self.metrics is not None:
                self.metrics.bounce_bursts.inc()
            log.warning("txn %s: hard-bounce burst: %s", txn.txn_id, reason)
        return True

    async def _bounced_enough(self, recipient: str) -> bool:
        """Count this hard bounce of ``recipient``; True once it has bounced ``suppress_after``
        times, the first at least ``suppress_span`` before this one."""
        config = self.config
        key = address_counter(recipient)
        total = await self.pauses.hit(key, config.suppress_window)
        if total < config.suppress_after:
            return False
        if config.suppress_span <= 0 or config.suppress_after == 1:
            return True  # one bounce spans nothing
        recent = await self.pauses.count(key, config.suppress_span)
        return total > recent  # some bounce in the window is older than the span

    async def _suppress(self, txn: Transaction, recipient: str, reply: Reply) -> None:
        assert self.consent is not None
        if await self._hard_bounce_suppression(txn, recipient) is not None:
            return  # recorded once: a repeated refusal adds nothing to what is known
        try:
            await self.consent.add(
                new_event(
                    SUPPRESSED,
                    recipient,
                    method="hard_bounce",
                    reason=f"upstream refused the address ({reply.status})",
                    upstream_reply=reply.line()[:500],
                    source=f"sendguard txn {txn.txn_id}",
                )
            )
        except Exception as exc:  # suppression is bookkeeping: it must never fail the mail
            log.error("txn %s: cannot record the suppression of %s: %s", txn.txn_id, recipient, exc)
            if self.metrics is not None:
                self.metrics.state_errors.labels("suppression").inc()
        else:
            log.info("txn %s: %s suppressed after %s", txn.txn_id, recipient, reply.line())
