"""The delivery of one accepted transaction: from the client's message bytes to its reply.

``deliver`` takes a transaction whose recipients the upstream has accepted (the lockstep
relay of ``proxy.relay.transaction``) and the bytes the client sent after DATA, and
returns the reply the client gets for its final dot. In order: the message checks and the
parse (``proxy.relay.intake``), the classification from the message, the pauses, the
policies' message stage, their header edits and footer, then either one DKIM-signed
message over the upstream transaction the session opened, or one copy per recipient
(``proxy.relay.copies``: per-recipient edits, DKIM, a DSN for refused copies). The
caller then ``end``s the transaction (commit, audit, metrics).

Nothing here needs a client socket: the SMTP session is one caller, the tests are another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policies.base import Action, MessageEdit, Reply
from proxy import replies as R
from proxy.relay.copies import deliver_copies
from proxy.relay.intake import MessageRefused, prepare_message
from proxy.relay.pipeline import StageDecision
from proxy.relay.rawmsg import Outgoing
from proxy.relay.runtime import Runtime
from proxy.relay.signing import sign_outgoing
from proxy.relay.transaction import RelayTransaction
from proxy.unsubscribe.footer import NoReadablePart, append_footer

__all__ = ("Delivered", "deliver")

log = logging.getLogger("sendguard.smtp")

# Below this size checking and parsing a message takes well under a millisecond, less than
# handing it to a worker thread costs (measured, bench/README.md); above it, a thread.
_INLINE_PARSE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Delivered:
    """What became of a message: the client's reply, the upstream's (None when the message
    never reached the upstream's final dot) and the outcome for the audit and metrics
    (delivered, rejected, tempfailed)."""

    reply: Reply
    upstream_reply: Reply | None
    outcome: str


async def deliver(
    t: RelayTransaction, content: bytes, *, keepalive: Callable[[float], None] | None = None
) -> Delivered:
    """Relay the message of a transaction with at least one accepted recipient.

    ``keepalive(seconds)``: called when a step may take that long (one copy per recipient
    gets the whole upstream budget each). When the caller is cancelled (the client went
    away mid-relay) the upstream connection is dropped without finishing, so the upstream
    never completes a message the client will send again, and the transaction is ended."""
    try:
        reply, upstream_reply, outcome = await _relay_message(t, content, keepalive)
    except asyncio.CancelledError:
        if t.upstream is not None:
            t.upstream.discard()
        await t.end("abandoned", client_reply=None)
        raise
    return Delivered(reply, upstream_reply, outcome)


async def _relay_message(
    t: RelayTransaction, content: bytes, keepalive: Callable[[float], None] | None
) -> tuple[Reply, Reply | None, str]:
    txn, runtime = t.txn, t.runtime
    metrics = t.services.metrics
    txn.size = len(content)
    metrics.message_size.observe(len(content))

    def refuse(reply: Reply, why: str) -> tuple[Reply, Reply | None, str]:
        log.info("txn %s refused before policies: %s", txn.txn_id, why)
        return reply, None, "tempfailed" if reply.is_temporary else "rejected"

    if t.upstream is None or t.upstream_lost:
        return refuse(R.r451_upstream_lost(txn.txn_id), "upstream connection lost")
    try:
        hops = 1 if t.hop is not None else 0  # ours counts toward the loop limit too
        if len(content) < _INLINE_PARSE_LIMIT:
            content, message = prepare_message(content, runtime.settings.message, own_hops=hops)
        else:  # CPU work in proportion to the size: a thread lets other sessions be answered in between
            content, message = await asyncio.to_thread(
                prepare_message, content, runtime.settings.message, own_hops=hops
            )
    except MessageRefused as refused:
        return refuse(refused.reply, refused.why)
    txn.message = message
    if len(content) < _INLINE_PARSE_LIMIT:
        classification = runtime.classifier.from_message(txn, message)
    else:  # the detector reads the whole visible text: a thread, as for the parse
        classification = await asyncio.to_thread(runtime.classifier.from_message, txn, message)
    txn.message_class, txn.class_note = classification.message_class, classification.note()
    t.class_reason = classification.as_dict()
    classification.observe(metrics, runtime.settings.classes.detector.mode)
    if classification.refusal is not None:
        await t.upstream.abort()
        return classification.refusal, None, "rejected"
    paused = await t.pause_refusal("message")
    if paused is not None:
        await t.upstream.abort()
        return paused, None, "tempfailed"

    decision = await t.timed_stage("message", runtime.pipeline.check_message(txn))
    t.results.extend(decision.results)
    if not decision.accepted:
        assert decision.reply is not None
        await t.upstream.abort()
        return decision.reply, None, "rejected" if decision.action is Action.REJECT else "tempfailed"

    if t.one_message and (decision.held or any(edit.fans_out for edit in decision.edits)):
        one = as_one_message(decision, txn.recipients)
        if isinstance(one, Reply):
            await t.upstream.abort()
            return one, None, "rejected"
        decision = one
    # The header edits rewrite the header block only; the body stays the received bytes.
    outgoing = apply_edits(content, runtime, decision)
    del content  # from here on the one copy is referenced by ``outgoing`` (and the parse)
    footer = next((edit.footer for edit in decision.edits if edit.footer is not None), None)
    if footer is not None:
        try:
            # CPU work on the whole body: a thread keeps the event loop answering others.
            outgoing = Outgoing.of(await asyncio.to_thread(append_footer, outgoing.to_bytes(), *footer))
        except NoReadablePart:
            await t.upstream.abort()
            return R.R550_NO_PART_FOR_FOOTER, None, "rejected"
    received = t.received_field()
    if decision.held or any(edit.fans_out for edit in decision.edits):
        # Each copy gets the trace field on top of its own header edits (copies.py).
        return await deliver_copies(t, outgoing, decision, keepalive, received=received)
    # Our hop's trace field on top (RFC 5321 4.4), before DKIM signs the message.
    outgoing = outgoing.prepended(received)
    if runtime.signer.enabled:
        # The signature fields go in front of the header block; the body stays where it is.
        signed = await sign_outgoing(t, outgoing)
        if isinstance(signed, Reply):
            await t.upstream.abort()
            return signed, None, "tempfailed" if signed.is_temporary else "rejected"
        outgoing = signed
    started = time.perf_counter()
    upstream_reply = await t.upstream.data(outgoing)
    metrics.upstream_duration.labels("data").observe(time.perf_counter() - started)
    await t.observe("data", upstream_reply)
    await t.upstream.finish()
    client_reply = Reply(upstream_reply.code, upstream_reply.status, f"{upstream_reply.text} [{txn.txn_id}]"[:500])
    if upstream_reply.is_success:
        return client_reply, upstream_reply, "delivered"
    return client_reply, upstream_reply, "tempfailed" if upstream_reply.is_temporary else "rejected"


def as_one_message(decision: StageDecision, recipients: Sequence[str]) -> StageDecision | Reply:
    """The decision for an upstream that takes one message (the milter): a single recipient's
    own header fields and footer become the message's; what needs copies is a refusal that
    says so (never a message that silently lacks them)."""
    if decision.held:  # no copy for the others, no DSN for these: the message is refused
        first = next(iter(decision.held.values()))
        names = ", ".join(list(decision.held)[:10])
        return Reply(first.code, first.status, f"{first.text} (recipients: {names})"[:480])
    edits: list[MessageEdit] = []
    for edit in decision.edits:
        if edit.split_per_recipient:
            return R.R554_ONE_MESSAGE_ONLY
        personal = set(edit.per_recipient) | set(edit.per_recipient_footer)
        if len(recipients) > 1 and personal:
            return R.R550_ONE_RECIPIENT_ONLY
        add = list(edit.add)
        footer = edit.footer
        for recipient in personal:
            add.extend(edit.per_recipient.get(recipient, ()))
            footer = edit.per_recipient_footer.get(recipient, footer)
        edits.append(MessageEdit(add=tuple(add), remove=edit.remove, footer=footer))
    return dataclasses.replace(decision, edits=edits)


def apply_edits(content: bytes, runtime: Runtime, decision: StageDecision) -> Outgoing:
    """The configured header removals and the policies' header edits, on the raw header block."""
    settings = runtime.settings
    remove = [*settings.message.strip_headers, *settings.instruction_headers]
    add: list[tuple[str, str]] = []
    for edit in decision.edits:
        remove.extend(edit.remove)
        add.extend(edit.add)
    return Outgoing.of(content).edited(remove, add)
