"""DKIM-signing the final bytes of a message: the last change before the upstream."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

from policies.base import Reply
from proxy import replies as R
from proxy.observability.metrics import Metrics
from proxy.relay.rawmsg import Outgoing
from proxy.relay.runtime import Runtime
from proxy.relay.transaction import RelayTransaction
from proxy.reputation.dkim import DKIMSignError, SignedFields, SignResult

__all__ = ("sign_bytes", "sign_outgoing")

log = logging.getLogger("sendguard.smtp")

_Result = TypeVar("_Result", SignResult, SignedFields)


async def sign_bytes(runtime: Runtime, metrics: Metrics, txn_id: str, content: bytes) -> bytes | Reply:
    """DKIM-sign whole bytes outside a transaction (the queue's DSNs); a Reply when the message
    cannot be signed and dkim.on_error says to refuse it."""
    if not runtime.signer.enabled:
        return content
    result = await _signed(runtime, metrics, txn_id, runtime.signer.sign_async(content))
    if isinstance(result, Reply):
        return result
    return content if result is None else result.message


async def sign_outgoing(t: RelayTransaction, outgoing: Outgoing) -> Outgoing | Reply:
    """DKIM-sign the final message of a transaction (the last change before the upstream):
    the signature fields go in front of the header block and the body is hashed where it
    lies, never copied (a 25 MB message costs a few blocks of 256 KiB, not several whole
    copies). A Reply when it cannot be signed and dkim.on_error says to refuse it."""
    runtime = t.runtime
    if not runtime.signer.enabled:
        return outgoing
    signing = runtime.signer.sign_fields_async(outgoing.head, outgoing.rest)
    result = await _signed(runtime, t.services.metrics, t.txn.txn_id, signing)
    if isinstance(result, Reply):
        return result
    if result is None or not result.fields:
        return outgoing
    return Outgoing(result.fields + outgoing.head, outgoing.rest)


async def _signed(
    runtime: Runtime, metrics: Metrics, txn_id: str, signing: Awaitable[_Result]
) -> _Result | Reply | None:
    """The signing's result, counted; None to send unsigned, a Reply to refuse (dkim.on_error)."""
    try:
        result = await signing
    except DKIMSignError as exc:
        metrics.dkim_signatures.labels("error").inc()
        log.error("txn %s: DKIM signing failed: %s", txn_id, exc)
        if runtime.settings.dkim.on_error == "send_unsigned":
            return None
        if exc.permanent:
            return Reply(550, "5.6.0", "The message header cannot be DKIM-signed; check its header lines")
        return R.r451_policy_error(txn_id)
    metrics.dkim_signatures.labels("signed" if result.signatures else result.skipped.replace("-", "_")).inc()
    for domain, _selector, _algorithm in result.signatures:  # domains of configured keys only: bounded
        metrics.dkim_domain_signatures.labels(domain).inc()
    return result
