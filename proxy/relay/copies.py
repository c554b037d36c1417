"""One copy per recipient, each in its own upstream transaction; the copies refused for now
go to the retry queue, and the DSN to the sender for the copies refused for good.

A policy asks for copies when each recipient must get a different message (a personal
unsubscribe link, a To: naming only that recipient). The shared upstream transaction the
session opened is then never completed. Up to ``upstream.copy_concurrency`` copies go out at
once, each over its own pooled connection; a pushback from the upstream stops new ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policies.base import Reply
from policies.message import VISIBLE_RECIPIENT_FIELDS
from proxy import replies as R
from proxy.config.settings import UpstreamConfig
from proxy.relay.drain import attempt_budget, dsn_for, send_one
from proxy.relay.dsn import notify_failure
from proxy.relay.pipeline import StageDecision
from proxy.relay.rawmsg import Outgoing
from proxy.relay.signing import sign_outgoing
from proxy.relay.spool import Queued
from proxy.relay.transaction import RelayTransaction
from proxy.unsubscribe.footer import NoReadablePart, append_footer

__all__ = ("copy_width", "deliver_copies")

log = logging.getLogger("sendguard.smtp")

# Copies for one message are tried within this time; the rest go to the retry queue at once:
# clients give up on a reply after 10 minutes (RFC 5321 4.5.3.2.6), many sooner.
_FANOUT_BUDGET = 300.0


async def deliver_copies(
    t: RelayTransaction,
    outgoing: Outgoing,
    decision: StageDecision,
    keepalive: Callable[[float], None] | None = None,
    *,
    received: bytes = b"",
) -> tuple[Reply, Reply | None, str]:
    """One copy per recipient, each in its own upstream transaction, ``copy_width`` at a time.

    The client gets 250 only when every copy was accepted by the upstream or is durably in
    the retry queue (``proxy.relay.spool``: committed and fsync'd before the reply), and a
    DSN for every copy refused for good is queued too. All copies refused: the client gets
    the refusal (4xx when any was temporary) and nothing is queued, so it keeps its message.
    ``keepalive(seconds)``, when given, is called as each copy starts with the time that copy
    may take (the session resets its idle timer: each copy gets the whole upstream budget,
    and the last one to start is the last to need it).
    """
    txn = t.txn
    assert t.upstream is not None
    await t.upstream.abort()  # the shared transaction is never completed
    split = any(edit.split_per_recipient for edit in decision.edits)
    extra: dict[str, list[tuple[str, str]]] = {}
    footers: dict[str, tuple[str, str]] = {}
    for edit in decision.edits:
        for recipient, fields in edit.per_recipient.items():
            extra.setdefault(recipient, []).extend(fields)
        footers.update(edit.per_recipient_footer)
    # Recipients a policy refused after DATA (no consent, say): no copy, reported to the sender.
    t.copies = dict(decision.held)
    t.held = frozenset(decision.held)
    retry: list[Queued] = []  # copies refused for now, with the exact bytes to send again
    retry_at = time.time() + t.runtime.settings.spool.retry_min
    fanout = _Fanout(deadline=time.monotonic() + _FANOUT_BUDGET)
    plan = [r for r in txn.recipients if r not in decision.held]
    outcomes: dict[str, tuple[Reply, Outgoing | None, bool]] = {}
    pending = iter(plan)  # shared by the workers: copies start in recipient order

    async def worker() -> None:
        for recipient in pending:
            outcomes[recipient] = await _copy(
                t,
                fanout,
                outgoing,
                recipient,
                split,
                extra.get(recipient, ()),
                footers.get(recipient),
                received,
                keepalive,
            )

    # Several copies at once, each over its own pooled connection (never more than the pool
    # holds); a child's failure is its copy's reply, so the group fails only when cancelled
    # (the client went away), and then every copy in flight is cancelled with it.
    async with asyncio.TaskGroup() as group:
        for _ in range(min(copy_width(t.runtime.settings.upstream), len(plan))):
            group.create_task(worker())
    # Recorded in recipient order, whatever order the copies finished in: the audit line, the
    # metrics and the DSN list the recipients as the client gave them.
    for recipient in plan:
        reply, prepared, tried = outcomes[recipient]
        t.copies[recipient] = reply
        if prepared is not None and reply.is_temporary:
            retry.append(
                Queued(
                    kind="copy",
                    txn_id=txn.txn_id,
                    sender=txn.mail_from,
                    recipient=recipient,
                    content=prepared.to_bytes(),  # the one copy, only for what waits in the queue
                    next_attempt=retry_at,
                    # MAIL's and this recipient's parameters in one list (dsn.split_options).
                    options=(*t.relayed_options, *t.rcpt_options.get(recipient, ())),
                    attempts=int(tried),
                    last_reply=reply.line(),
                )
            )
    delivered = [r for r, reply in t.copies.items() if reply.is_success]
    failed = [(r, reply) for r, reply in t.copies.items() if not reply.is_success]
    if not delivered:
        # Nothing went out: the client keeps its message, and a 4xx when any copy was refused
        # only for now, so that recipient is tried again (a 5xx would lose it).
        first = next((reply for _, reply in failed if reply.is_temporary), failed[0][1])
        outcome = "tempfailed" if first.is_temporary else "rejected"
        return Reply(first.code, first.status, f"{first.text} [{txn.txn_id}]"[:500]), first, outcome
    refused = [(r, reply) for r, reply in failed if not reply.is_temporary]
    # Reported only where the sender asked to hear of failures (RFC 3461 4.1: NOTIFY=NEVER,
    # or a NOTIFY without FAILURE, means no report for that recipient).
    unreported = {r for r, _ in refused if not notify_failure(t.rcpt_options.get(r, ()))}
    text = f"Delivered as {len(delivered)} separate copies, one per recipient"
    if decision.held:  # copies only because some recipients were refused after DATA
        text = f"Delivered to {len(delivered)} recipient{'' if len(delivered) == 1 else 's'}, one copy each"
    if not failed:
        return Reply(250, "2.0.0", f"{text} [{txn.txn_id}]"), None, "delivered"
    queued = await _queue(
        t, outgoing, retry, [(r, reply) for r, reply in refused if r not in unreported], len(failed) - len(refused)
    )
    if queued is None:
        # Some copies are delivered and the others could not be queued: a 451 makes the client
        # send the whole message again, which duplicates the delivered copies. A duplicate is
        # better than a recipient who never gets the message and a sender who is never told.
        return R.r451_not_queued(txn.txn_id), None, "tempfailed"
    if retry:
        text += f"; {len(retry)} queued for retry"
    if refused:
        text += f"; {len(refused)} refused" + (", reported to the sender" if txn.mail_from else "")
    return Reply(250, "2.0.0", f"{text} [{txn.txn_id}]"), None, "delivered"


async def _queue(
    t: RelayTransaction, outgoing: Outgoing, retry: list[Queued], refused: list[tuple[str, Reply]], temporary: int
) -> list[int] | None:
    """Queue the copies to retry and the DSN for the refused ones, all in one commit; None when
    that failed (or a copy refused for now has nothing that could be queued)."""
    txn, spool = t.txn, t.services.spool
    if len(retry) < temporary:
        log.error("txn %s: a copy refused for now has no bytes to queue (it could not be prepared)", txn.txn_id)
        return None
    messages = list(retry)
    try:
        if refused and txn.mail_from:  # never bounce a bounce (RFC 5321 6.1)
            messages.append(
                await dsn_for(
                    t.runtime,
                    t.services.metrics,
                    t.services.hostname,
                    sender=txn.mail_from,
                    original=outgoing.to_bytes(),
                    failures=refused,
                    txn_id=txn.txn_id,
                )
            )
        if not messages:
            return []
        if spool is None:
            raise RuntimeError("no retry queue configured")
        ids = await spool.add(messages)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("txn %s: cannot queue %d copies and DSNs", txn.txn_id, len(messages))
        return None
    t.queued = {m.recipient: entry_id for m, entry_id in zip(retry, ids, strict=False)}
    t.reported = {r for r, _ in refused} if txn.mail_from else set()
    for m, entry_id in zip(messages, ids, strict=True):
        log.warning(
            "txn %s: %s to <%s> queued as %d: %s", txn.txn_id, m.kind, m.recipient, entry_id, m.last_reply or "due now"
        )
    return ids


async def _prepare_copy(
    t: RelayTransaction,
    outgoing: Outgoing,
    recipient: str,
    split: bool,
    fields: Sequence[tuple[str, str]],
    footer: tuple[str, str] | None,
    received: bytes = b"",
) -> Outgoing | Reply:
    """One recipient's signed copy, or why there is none. Its header edits rewrite the header
    block only; the body stays the shared one (a footer changes it, and so copies it). The
    trace field goes on top of the copy's own header fields (RFC 5322 3.6.7: trace fields
    lead the header)."""
    copy = outgoing
    if split:
        # Every field a reader sees recipients in (visible_recipients counts the Resent-* ones
        # too), with the addresses written in their display names: the copy shows one.
        copy = copy.edited(VISIBLE_RECIPIENT_FIELDS, [("To", recipient)])
    copy = copy.edited((), fields).prepended(received)
    if footer is not None:
        try:
            copy = Outgoing.of(await asyncio.to_thread(append_footer, copy.to_bytes(), *footer))
        except NoReadablePart:
            return R.R550_NO_PART_FOR_FOOTER
    return await sign_outgoing(t, copy)  # each copy differs, so each is signed


def copy_width(upstream: UpstreamConfig) -> int:
    """How many copies of one message go out at once: ``copy_concurrency``, and never more
    than the pool's connections (a copy waits for a free slot; more would only queue)."""
    if upstream.is_maildir:
        return max(1, upstream.copy_concurrency)
    return max(1, min(upstream.copy_concurrency, upstream.pool.max_connections))


@dataclass
class _Fanout:
    """What the copies of one message share while they go out."""

    deadline: float  # time.monotonic(): copies not started by then go straight to the queue
    #: The upstream pushed back (see ``_pushback``): copies not yet started are queued untried.
    stopped: bool = False


def _pushback(stage: str, reply: Reply) -> bool:
    """A reply that says the upstream wants less from us now, not that one recipient cannot
    take this copy: no session at all (unreachable, our pool full), a 421 (the upstream is
    closing the connection, RFC 5321 3.8), or a 4xx to MAIL (the sender is deferred). The
    copies still to start would draw the same answer and feed the backoff rules more of it."""
    if reply.is_success:
        return False
    return stage == "connect" or reply.upstream_code == 421 or (stage == "mail" and reply.is_temporary)


async def _copy(
    t: RelayTransaction,
    fanout: _Fanout,
    outgoing: Outgoing,
    recipient: str,
    split: bool,
    fields: Sequence[tuple[str, str]],
    footer: tuple[str, str] | None,
    received: bytes,
    keepalive: Callable[[float], None] | None,
) -> tuple[Reply, Outgoing | None, bool]:
    """One recipient's copy, prepared and sent: its reply, its bytes (None when it could not
    be prepared: nothing to queue) and whether it was tried."""
    txn_id = t.txn.txn_id
    if keepalive is not None:  # each copy gets the whole upstream budget again
        keepalive(attempt_budget(t.runtime))
    try:
        prepared = await _prepare_copy(t, outgoing, recipient, split, fields, footer, received)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("txn %s: copy for %s could not be prepared", txn_id, recipient)
        return R.r451_internal(txn_id), None, False
    if isinstance(prepared, Reply):  # no bytes to send: nothing to queue either
        return prepared, None, False
    if fanout.stopped or time.monotonic() > fanout.deadline:  # straight to the queue
        return R.r451_not_attempted(txn_id), prepared, False
    try:
        stage, reply = await _deliver_one(t, recipient, prepared)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("txn %s: copy for %s failed", txn_id, recipient)
        return R.r451_internal(txn_id), prepared, True
    if _pushback(stage, reply) and not fanout.stopped:
        fanout.stopped = True
        log.warning(
            "txn %s: upstream pushed back (%s at %s); the copies not yet sent are queued", txn_id, reply.line(), stage
        )
    return reply, prepared, True


async def _deliver_one(t: RelayTransaction, recipient: str, content: Outgoing) -> tuple[str, Reply]:
    sender = t.txn.mail_from
    options = (*t.relayed_options, *t.rcpt_options.get(recipient, ()))
    stage, reply = await send_one(t.runtime.upstream, t.txn.txn_id, sender, recipient, content, options)
    if stage != "connect":
        await t.observe(stage, reply)
    if sender and stage in ("rcpt", "data"):  # a copy's DATA reply is this recipient's
        await t.bounce(recipient, reply, tried=False)  # counted at its RCPT already
    return stage, reply
