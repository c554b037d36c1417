"""DKIM-signing the final bytes of a message: the last change before the upstream."""

from __future__ import annotations

import logging

from policies.base import Reply
from proxy import replies as R
from proxy.observability.metrics import Metrics
from proxy.relay.runtime import Runtime
from proxy.relay.transaction import RelayTransaction
from proxy.reputation.dkim import DKIMSignError

__all__ = ("sign", "sign_bytes")

log = logging.getLogger("sendguard.smtp")


async def sign(t: RelayTransaction, content: bytes) -> bytes | Reply:
    """DKIM-sign the final bytes (the last change before the upstream); a Reply when the
    message cannot be signed and dkim.on_error says to refuse it."""
    return await sign_bytes(t.runtime, t.services.metrics, t.txn.txn_id, content)


async def sign_bytes(runtime: Runtime, metrics: Metrics, txn_id: str, content: bytes) -> bytes | Reply:
    """``sign`` outside a transaction (the queue's DSNs): the config generation and metrics given."""
    if not runtime.signer.enabled:
        return content
    try:
        result = await runtime.signer.sign_async(content)
    except DKIMSignError as exc:
        metrics.dkim_signatures.labels("error").inc()
        log.error("txn %s: DKIM signing failed: %s", txn_id, exc)
        if runtime.settings.dkim.on_error == "send_unsigned":
            return content
        if exc.permanent:
            return Reply(550, "5.6.0", "The message header cannot be DKIM-signed; check its header lines")
        return R.r451_policy_error(txn_id)
    metrics.dkim_signatures.labels("signed" if result.signatures else result.skipped.replace("-", "_")).inc()
    for domain, _selector, _algorithm in result.signatures:  # domains of configured keys only: bounded
        metrics.dkim_domain_signatures.labels(domain).inc()
    return result.message
