"""Webhooks: opt-outs, suppressions, complaints and pauses pushed to the configured URLs.

Every event becomes one outbox row per endpoint (``state.py``: in the consent store's
database, so it survives restarts and several instances share it) before anything is sent;
the ``Deliverer`` sends due rows, one attempt at a time per row, and retries with
exponential backoff up to ``max_age``.

Consent events reach the outbox two ways, and are queued once (the row's ``source`` is
``consent:<id>``, unique per endpoint): at once, from the store's observer, when this process
records them; and from the sweep, which follows the append-only log by id from a cursor kept
in the same database. The sweep is what makes it safe: an opt-out committed just before a
crash, one recorded by ``sendguard consent revoke`` or by another instance, is told all the
same. On PostgreSQL the sweep stays ``SWEEP_LAG_POSTGRES`` behind the newest record, because
identity values are handed out before commit: a lower id may become visible after a higher
one. Bulk imports (method ``import``) are not told: the system that sent them knows them.

The signature (documented in the README) lets the receiver check both origin and freshness::

    Sendguard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

``t`` is the time of the attempt, so a receiver refuses anything older than its replay window
(``verify_signature``: 5 minutes), and the ``id`` in the body is the same on every attempt,
for the receiver to drop a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, ClassVar

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.api.config import WEBHOOK_EVENTS, WebhooksConfig
from proxy.api.state import ApiState, OutboxRow, QueuedRow, dumps
from proxy.stores.consent import OPTED_OUT, SUPPRESSED, ConsentEvent, ConsentStore, utcnow
from proxy.stores.pauses import Pause

__all__ = (
    "REPLAY_WINDOW",
    "SIGNATURE_HEADER",
    "Deliverer",
    "Notifier",
    "WebhookMetrics",
    "sign",
    "verify_signature",
)

log = logging.getLogger("sendguard.webhooks")

SIGNATURE_HEADER = "Sendguard-Signature"
REPLAY_WINDOW = 300.0
SWEEP_LAG_POSTGRES = 10.0
SWEEP_BATCH = 500


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: str, header: str, body: bytes, *, now: float | None = None, window: float = REPLAY_WINDOW
) -> bool:
    """What a receiver does: the MAC over timestamp and body, and the timestamp within the window."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > window:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


class WebhookMetrics:
    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, WebhookMetrics]] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outbox = Gauge(
            "sendguard_webhook_outbox",
            "Webhook deliveries in the outbox: pending (not yet delivered) and failed (given up after max_age)",
            ["state"],
            multiprocess_mode="livemax",  # set by the one deliverer (proxy/supervisor.py)
            registry=registry,
        )
        self.attempts = Counter(
            "sendguard_webhook_attempts_total",
            "Webhook delivery attempts by result (delivered, retry, failed)",
            ["result"],
            registry=registry,
        )
        self.enqueued = Counter(
            "sendguard_webhook_events_total", "Events put in the webhook outbox, by event", ["event"], registry=registry
        )
        for state in ("pending", "failed"):
            self.outbox.labels(state)
        for result in ("delivered", "retry", "failed"):
            self.attempts.labels(result)
        for event in WEBHOOK_EVENTS:
            self.enqueued.labels(event)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> WebhookMetrics:
        existing = cls._by_registry.get(registry)
        if existing is None:
            existing = cls._by_registry[registry] = cls(registry)
        return existing


def event_name(event: ConsentEvent) -> str | None:
    """The webhook event of a consent event, or None for one nobody is told of."""
    if event.kind not in (OPTED_OUT, SUPPRESSED) or event.method == "import":
        return None
    return "complaint" if event.method == "complaint" else event.kind


class Notifier:
    """Turns what happened into outbox rows. Called after the fact is on record; a failure to
    queue is logged and counted, never raised into the opt-out or the mail that caused it."""

    def __init__(
        self,
        state: ApiState,
        config: Callable[[], WebhooksConfig],
        metrics: WebhookMetrics,
        consent: Callable[[], ConsentStore | None] = lambda: None,
    ) -> None:
        self.state = state
        self.config = config
        self.metrics = metrics
        self.consent = consent
        #: Called once rows are queued (the deliverer's wake): told within milliseconds, not
        #: at the next interval.
        self.on_queued: Callable[[], None] = lambda: None
        #: (scope, value, source) -> until of the last pause told: a backoff rule that re-pauses
        #: on every refusal would otherwise send one webhook per refused message.
        self._paused: dict[tuple[str, str, str], float] = {}

    async def consent_events(self, events: Sequence[ConsentEvent]) -> None:
        """The store's observer: queue at once what this process recorded."""
        rows = [row for event in events for row in self._rows_for(event)]
        await self._enqueue(rows)

    async def sweep(self) -> int:
        """Queue what the log holds past the cursor (see the module docstring); return how many
        events were read."""
        store = self.consent()
        if store is None or not self.config().endpoints:
            return 0
        start = await self.state.cursor()
        events = await store.since(start, SWEEP_BATCH)
        lag = SWEEP_LAG_POSTGRES if store.backend == "postgres" else 0.0
        horizon = utcnow() - timedelta(seconds=lag)
        last, rows = start, []
        for event in events:
            if event.recorded_at is not None and event.recorded_at > horizon:
                break  # too fresh on PostgreSQL: a lower id may still commit
            assert event.id is not None
            last = event.id
            rows.extend(self._rows_for(event))
        if rows:
            await self._enqueue(rows)
        if last > start:
            await self.state.advance(last)
        return last - start

    def _rows_for(self, event: ConsentEvent) -> list[QueuedRow]:
        name = event_name(event)
        if name is None or event.id is None:
            return []
        body = self._body(f"consent-{event.id}", name, {"record": event.as_dict()})
        return [
            QueuedRow(endpoint.url, name, body, f"consent:{event.id}")
            for endpoint in self.config().endpoints
            if name in endpoint.events
        ]

    @staticmethod
    def _body(event_id: str, name: str, data: dict[str, Any]) -> str:
        return dumps(
            {
                "id": event_id,
                "type": name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data": data,
            }
        )

    async def _enqueue(self, rows: Sequence[QueuedRow]) -> None:
        if not rows:
            return
        try:
            await self.state.enqueue(rows, time.time())
        except Exception:
            log.exception("webhook(s) %s could not be queued", ", ".join(sorted({row.event for row in rows})))
            return
        for row in rows:
            self.metrics.enqueued.labels(row.event).inc()
        self.on_queued()

    async def pause(self, pause: Pause) -> None:
        key = (pause.scope, pause.value, pause.source)
        now = time.time()
        if self._paused.get(key, 0.0) > now:
            return
        self._paused = {k: until for k, until in self._paused.items() if until > now}
        self._paused[key] = pause.until
        await self.emit(
            "paused",
            {
                "scope": pause.scope,
                "value": pause.value,
                "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pause.until)),
                "reason": pause.reason,
                "source": pause.source,
                "message_class": pause.message_class,
            },
        )

    async def emit(self, name: str, data: dict[str, Any]) -> None:
        """Queue an event that is not in the consent log (a pause) for every endpoint that wants it."""
        body = self._body(str(uuid.uuid4()), name, data)
        await self._enqueue([QueuedRow(e.url, name, body) for e in self.config().endpoints if name in e.events])


class Deliverer:
    """Sends due outbox rows; one per process, and any number of processes may share an outbox."""

    def __init__(
        self,
        state: ApiState,
        config: Callable[[], WebhooksConfig],
        metrics: WebhookMetrics,
        *,
        clock: Callable[[], float] = time.time,
        sweep: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.state = state
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.sweep = sweep
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                self._wake.clear()  # before the round: a row queued during it wakes the next one
                try:
                    await self.round(session)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("webhook delivery round failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), float(self.config().interval))

    async def round(self, session: aiohttp.ClientSession) -> int:
        """Send what is due now; return how many attempts were made."""
        config = self.config()
        if self.sweep is not None:
            try:
                await self.sweep()
            except Exception as exc:  # the log cannot be read now: what is queued still goes
                log.warning("webhook sweep of the consent log failed: %s", exc)
        rows = await self.state.claim_due(self.clock(), float(config.timeout) + 5.0, 20)
        if rows:
            await asyncio.gather(*(self._attempt(session, config, row) for row in rows))
        counts = await self.state.counts()
        for state in ("pending", "failed"):
            self.metrics.outbox.labels(state).set(counts.get(state, 0))
        return len(rows)

    async def _attempt(self, session: aiohttp.ClientSession, config: WebhooksConfig, row: OutboxRow) -> None:
        endpoint = next((e for e in config.endpoints if e.url == row.endpoint), None)
        if endpoint is None:
            await self._failed(row, "the endpoint is no longer configured", give_up=True)
            return
        body = row.body.encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(endpoint.secret, body, int(self.clock())),
            "Sendguard-Event": row.event,
            "User-Agent": "sendguard-webhooks",
        }
        try:
            timeout = aiohttp.ClientTimeout(total=float(config.timeout))
            async with session.post(row.endpoint, data=body, headers=headers, timeout=timeout) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._failed(row, f"{type(exc).__name__}: {exc}"[:300])
            return
        if 200 <= status < 300:
            await self.state.delivered(row.id)
            self.metrics.attempts.labels("delivered").inc()
        else:
            await self._failed(row, f"HTTP {status}")

    async def _failed(self, row: OutboxRow, error: str, *, give_up: bool = False) -> None:
        config = self.config()
        now = self.clock()
        delay = min(float(config.retry_min) * 2**row.attempts, float(config.retry_max))
        give_up = give_up or now + delay - row.created_at > float(config.max_age)
        await self.state.retry(row.id, now + delay, error, give_up=give_up)
        self.metrics.attempts.labels("failed" if give_up else "retry").inc()
        if give_up:
            log.error("webhook %s #%d to %s given up: %s", row.event, row.id, row.endpoint, error)
        else:
            log.warning(
                "webhook %s #%d to %s failed (%s); next try in %.0fs", row.event, row.id, row.endpoint, error, delay
            )
