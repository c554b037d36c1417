"""Sending what waits in the retry queue (``proxy.relay.spool``), and one message to one
recipient over the upstream (``send_one``, shared with ``proxy.relay.copies``).

The app runs one ``Drainer`` per process. Each round it takes the rows that are due, one at
a time, and sends each through the upstream of the config generation running then:

- accepted (2xx): the row is deleted;
- refused for now (4xx, or the upstream unreachable): tried again after ``retry_min``,
  doubling each time up to ``retry_max``;
- refused for good (5xx), or still refused after ``max_age``: a copy becomes a DSN to its
  sender (queued in the same transaction that deletes the copy); a DSN, or a copy of a
  message with the null sender, is logged and dropped, as Postfix drops a double bounce.

Every attempt writes a log line and counts in ``sendguard_spool_deliveries_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from policies.base import Reply, Transaction
from proxy import replies as R
from proxy.observability.metrics import Metrics
from proxy.relay.dsn import build_dsn, notify_failure, split_options
from proxy.relay.rawmsg import Outgoing
from proxy.relay.runtime import Runtime
from proxy.relay.signing import sign_bytes
from proxy.relay.spool import Queued, Spool, SpoolEntry, retry_delay
from proxy.relay.upstream import MaildirUpstream, SmtpUpstream, UpstreamUnavailable

__all__ = ("Drainer", "attempt_budget", "dsn_for", "send_one")

log = logging.getLogger("sendguard.spool")


def attempt_budget(runtime: Runtime) -> float:
    """The longest one message to one recipient may take with the upstream."""
    timeouts = runtime.settings.upstream.timeouts
    return float(timeouts.connect + 3 * timeouts.command + timeouts.data + 30)


async def send_one(
    upstream: MaildirUpstream | SmtpUpstream,
    txn_id: str,
    sender: str,
    recipient: str,
    content: bytes | Outgoing,
    options: Sequence[str] = (),
) -> tuple[str, Reply]:
    """MAIL, RCPT and DATA of one message to one recipient: the stage it ended at and the
    reply there ("connect" when no session could be opened)."""
    try:
        session = await upstream.open(txn_id)
    except UpstreamUnavailable as exc:
        return "connect", exc.reply
    mail_options, rcpt_options = split_options(options)
    try:
        stage = "mail"
        reply = await session.mail(sender, mail_options)
        if reply.is_success:
            stage, reply = "rcpt", await session.rcpt(recipient, rcpt_options)
        if reply.is_success:
            stage, reply = "data", await session.data(content)
            await session.finish()
        else:
            await session.abort()
    except BaseException:
        await session.abort()
        raise
    return stage, reply


async def dsn_for(
    runtime: Runtime,
    metrics: Metrics,
    hostname: str,
    *,
    sender: str,
    original: bytes,
    failures: Sequence[tuple[str, Reply]],
    txn_id: str,
) -> Queued:
    """The DSN to ``sender`` for the failed copies, signed, ready to queue (due now)."""
    report = build_dsn(reporting_host=hostname, sender=sender, original=original, failures=failures, txn_id=txn_id)
    signed = await sign_bytes(runtime, metrics, txn_id, report)
    if not isinstance(signed, Reply):  # an unsigned report beats none
        report = signed
    return Queued(kind="dsn", txn_id=txn_id, sender="", recipient=sender, content=report, next_attempt=time.time())


class Drainer:
    """The process's one worker on the queue."""

    def __init__(self, spool: Spool, runtime: Callable[[], Runtime], metrics: Metrics, hostname: str) -> None:
        self.spool = spool
        self._runtime = runtime
        self.metrics = metrics
        self.hostname = hostname

    async def run(self) -> None:
        """Rounds until cancelled: at each interval, and at once when a row due now was added."""
        while True:
            self.spool.wakeup.clear()
            try:
                await self.drain()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("spool: a round over the retry queue failed")
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.spool.wakeup.wait(), self._runtime().settings.spool.interval)

    async def refresh(self) -> None:
        """The queue's gauges."""
        try:
            counts, oldest = await self.spool.stats()
        except Exception:
            log.exception("spool: cannot read the retry queue")
            return
        self.metrics.spool_state(counts, max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    async def drain(self) -> None:
        """Every row due now, one after another."""
        while True:
            runtime = self._runtime()
            entry = await self.spool.claim(attempt_budget(runtime) + 60)
            if entry is None:
                return
            try:
                await self.attempt(runtime, entry)
            except BaseException:
                # Cancelled (shutdown) or broken mid-attempt: let the next round or process take
                # it at once. The upstream may have taken it: at least once, never lost.
                with contextlib.suppress(Exception):
                    self.spool.release_sync(entry.id)
                raise

    async def _account(self, runtime: Runtime, entry: SpoolEntry, stage: str, reply: Reply) -> None:
        """A copy's answer counts like one given while the client waited: toward the backoff
        rules (an upstream that pushes back) and the bounce bookkeeping (a dead address)."""
        txn = Transaction(txn_id=entry.txn_id, listener="spool", client_ip="", mail_from=entry.sender)
        try:
            await runtime.backoff.observe(stage, reply, txn)
        except Exception as exc:
            self.metrics.state_errors.labels("backoff").inc()
            log.error("spool: backoff bookkeeping for txn %s failed: %s", entry.txn_id, exc)
        if stage in ("rcpt", "data"):
            try:
                await runtime.bounces.recipient_tried(txn, entry.recipient, reply)
            except Exception as exc:
                self.metrics.state_errors.labels("bounces").inc()
                log.error("spool: bounce bookkeeping for txn %s failed: %s", entry.txn_id, exc)

    async def attempt(self, runtime: Runtime, entry: SpoolEntry) -> None:
        runtime.enter()  # a reload retires this generation's upstream only after we are done
        try:
            try:
                stage, reply = await send_one(
                    runtime.upstream, entry.txn_id, entry.sender, entry.recipient, entry.content, entry.options
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("spool: %s %d (txn %s) failed", entry.kind, entry.id, entry.txn_id)
                stage, reply = "internal", R.r451_internal(entry.txn_id)
        finally:
            runtime.leave()
        if entry.kind == "copy" and stage != "internal":
            await self._account(runtime, entry, stage, reply)
        config = runtime.settings.spool
        attempts = entry.attempts + 1
        age = entry.age()
        where = f"{entry.kind} {entry.id} (txn {entry.txn_id}) to <{entry.recipient}>"
        if reply.is_success:
            await self.spool.delivered(entry.id)
            self.metrics.spool_deliveries.labels(entry.kind, "delivered").inc()
            log.info("spool: %s delivered at attempt %d: %s", where, attempts, reply.line())
            return
        if reply.is_temporary and age < config.max_age:
            delay = retry_delay(attempts, config.retry_min, config.retry_max)
            await self.spool.defer(entry.id, reply.line(), time.time() + delay)
            self.metrics.spool_deliveries.labels(entry.kind, "deferred").inc()
            log.warning(
                "spool: %s deferred at attempt %d (%s): %s; next try in %.0fs",
                where,
                attempts,
                stage,
                reply.line(),
                delay,
            )
            return
        self.metrics.spool_deliveries.labels(entry.kind, "failed").inc()
        why = "refused" if not reply.is_temporary else f"still refused after {age:.0f}s (max_age)"
        if entry.kind == "copy" and entry.sender and notify_failure(entry.options):
            dsn = await dsn_for(
                runtime,
                self.metrics,
                self.hostname,
                sender=entry.sender,
                original=entry.content,
                failures=[(entry.recipient, reply)],
                txn_id=entry.txn_id,
            )
            await self.spool.replace(entry.id, [dsn])
            log.warning("spool: %s %s at attempt %d: %s; DSN to the sender queued", where, why, attempts, reply.line())
            return
        await self.spool.delivered(entry.id)  # nobody left to tell: a double bounce, or NOTIFY said not to
        whom = "the sender asked for no failure report (NOTIFY)" if entry.sender else "nobody to report to"
        log.error("spool: %s %s at attempt %d: %s; dropped (%s)", where, why, attempts, reply.line(), whom)
