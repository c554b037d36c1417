"""One copy per recipient, each in its own upstream transaction, and the DSN to the sender
for the copies that were refused.

A policy asks for copies when each recipient must get a different message (a personal
unsubscribe link, a To: naming only that recipient). The shared upstream transaction the
session opened is then never completed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from policies.base import Reply
from proxy import replies as R
from proxy.relay import rawmsg
from proxy.relay.dsn import build_dsn
from proxy.relay.pipeline import StageDecision
from proxy.relay.runtime import Runtime
from proxy.relay.signing import sign
from proxy.relay.transaction import RelayTransaction
from proxy.relay.upstream import UpstreamUnavailable
from proxy.unsubscribe.footer import NoReadablePart, append_footer

__all__ = ("deliver_copies",)

log = logging.getLogger("sendguard.smtp")

# Copies for one message are delivered within this time; whatever is left is reported to
# the sender: clients give up on a reply after 10 minutes (RFC 5321 4.5.3.2.6), many sooner.
_FANOUT_BUDGET = 300.0


def _copy_budget(runtime: Runtime) -> float:
    timeouts = runtime.settings.upstream.timeouts
    return float(timeouts.connect + 3 * timeouts.command + timeouts.data + 30)


async def deliver_copies(
    t: RelayTransaction,
    outgoing: bytes,
    decision: StageDecision,
    keepalive: Callable[[float], None] | None = None,
) -> tuple[Reply, Reply | None, str]:
    """One copy per recipient, each in its own upstream transaction.

    All copies refused: the client gets the refusal (4xx when any was temporary), so it
    keeps its message. Some delivered: the client gets 250 (a 451 would duplicate the
    delivered copies) and the refused recipients are reported to the sender in a DSN.
    ``keepalive(seconds)``, when given, is called before each copy with the time that copy
    may take (the session resets its idle timer: each copy gets the whole upstream budget).
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
    t.copies = {}
    deadline = time.monotonic() + _FANOUT_BUDGET
    for attempt in (1, 2):
        # A copy refused for now (4xx) gets one more try after the others: once some copies
        # are delivered, a refused one can only be reported to the sender.
        pending = [
            r
            for r in txn.recipients
            if r not in t.copies
            or (attempt == 2 and t.copies[r].is_temporary and any(c.is_success for c in t.copies.values()))
        ]
        for recipient in pending:
            if time.monotonic() > deadline:
                t.copies[recipient] = R.r451_not_attempted(txn.txn_id)
                continue
            if keepalive is not None:  # each copy gets the whole upstream budget again
                keepalive(_copy_budget(t.runtime))
            try:
                t.copies[recipient] = await _deliver_copy(
                    t, outgoing, recipient, split, extra.get(recipient, ()), footers.get(recipient)
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("txn %s: copy for %s failed", txn.txn_id, recipient)
                t.copies[recipient] = R.r451_internal(txn.txn_id)
    delivered = [r for r, reply in t.copies.items() if reply.is_success]
    failed = [(r, reply) for r, reply in t.copies.items() if not reply.is_success]
    if not delivered:
        first = next((reply for _, reply in failed if reply.is_temporary), failed[0][1])
        outcome = "tempfailed" if first.is_temporary else "rejected"
        return Reply(first.code, first.status, f"{first.text} [{txn.txn_id}]"[:500]), first, outcome
    text = f"Delivered as {len(delivered)} separate copies, one per recipient"
    if failed:
        text += f"; {len(failed)} refused, reported to the sender"
        if txn.mail_from:  # never bounce a bounce (RFC 5321 6.1)
            try:
                await _send_dsn(t, outgoing, failed)
            except asyncio.CancelledError:
                raise
            except Exception:  # the copies are delivered: a failed report must not undo that
                log.exception("txn %s: the DSN for %d refused copies could not be built", txn.txn_id, len(failed))
    return Reply(250, "2.0.0", f"{text} [{txn.txn_id}]"), None, "delivered"


async def _deliver_copy(
    t: RelayTransaction,
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
    signed = await sign(t, copy)  # each copy differs, so each is signed
    if isinstance(signed, Reply):
        return signed
    return await _deliver_one(t, t.txn.mail_from, recipient, signed)


async def _deliver_one(t: RelayTransaction, sender: str, recipient: str, content: bytes) -> Reply:
    runtime, txn_id = t.runtime, t.txn.txn_id
    try:
        session = await runtime.upstream.open(txn_id)
    except UpstreamUnavailable as exc:
        return exc.reply
    try:
        stage = "mail"
        reply = await session.mail(sender, t.relayed_options)
        if reply.is_success:
            stage, reply = "rcpt", await session.rcpt(recipient, [])
        if reply.is_success:
            stage, reply = "data", await session.data(content)
            await session.finish()
        else:
            await session.abort()
        await t.observe(stage, reply)
        if sender and stage in ("rcpt", "data"):  # a copy's DATA reply is this recipient's; not for DSNs
            await t.bounce(recipient, reply, tried=False)  # counted at its RCPT already
    except BaseException:
        await session.abort()
        raise
    return reply


async def _send_dsn(t: RelayTransaction, original: bytes, failed: list[tuple[str, Reply]]) -> None:
    txn = t.txn
    report = build_dsn(
        reporting_host=t.services.hostname,
        sender=txn.mail_from,
        original=original,
        failures=failed,
        txn_id=txn.txn_id,
    )
    signed = await sign(t, report)
    if not isinstance(signed, Reply):
        report = signed
    reply = await _deliver_one(t, "", txn.mail_from, report)
    if reply.is_success:
        log.warning("txn %s: %d copies refused; DSN sent to the sender", txn.txn_id, len(failed))
    else:
        log.error(
            "txn %s: %d copies refused and the DSN to the sender was refused too: %s",
            txn.txn_id,
            len(failed),
            reply.line(),
        )
