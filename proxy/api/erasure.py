"""What an erasure reaches beyond the consent events: the erasers the process and the CLI add
to ``ConsentStore.erasers``.

The consent store rewrites its own rows into tombstones (``ConsentStore.erase``); these remove
the address from the other places sendguard keeps it: the API's idempotency answers and the
webhook outbox (``api/state.py``, in the consent database), the retry queue (``relay/spool.py``)
and the hard-bounce counter in the shared state store. The audit log is the operator's
append-only record and is not rewritten (docs/architecture.md "Erasure").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from proxy.api.state import ApiState
from proxy.relay.spool import Spool
from proxy.reputation.bounces import address_counter
from proxy.stores.consent import ConsentStore, Eraser
from proxy.stores.pauses import PauseStore

__all__ = ("api_eraser", "attach_erasers", "counter_eraser", "spool_eraser")

log = logging.getLogger("sendguard.consent")


def api_eraser(state: ApiState) -> Eraser:
    async def erase_api_rows(spellings: Sequence[str], tombstone: str) -> dict[str, int]:
        return await state.forget_address(spellings, tombstone)

    return erase_api_rows


def spool_eraser(spool: Spool) -> Eraser:
    async def erase_queued(spellings: Sequence[str], tombstone: str) -> dict[str, int]:
        gone = await spool.forget(spellings)
        if gone:
            # Transaction ids only: the operator finds the messages in the audit log.
            log.warning(
                "erasure: dropped %d queued row(s) of transaction(s) %s", len(gone), ", ".join(sorted(set(gone)))
            )
        return {"retry queue rows": len(gone)}

    return erase_queued


def counter_eraser(pauses: PauseStore) -> Eraser:
    async def erase_counters(spellings: Sequence[str], tombstone: str) -> dict[str, int]:
        return {"bounce counters": sum([await pauses.forget(address_counter(s)) for s in spellings])}

    return erase_counters


def attach_erasers(store: ConsentStore, erasers: Sequence[Eraser]) -> None:
    """Set the store's erasers: one of each kind (by name), the newest winning, so that a store
    shared by several config generations reaches the newest generation's pause store."""
    names = {getattr(e, "__name__", "") for e in erasers}
    store.erasers[:] = [e for e in store.erasers if getattr(e, "__name__", "") not in names] + list(erasers)
