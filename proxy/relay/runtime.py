"""What a transaction runs with: one config generation.

``Runtime`` is everything derived from one config: the settings, the policy pipeline, the
classifier and the upstream. A reload builds a new Runtime and swaps it in atomically;
a transaction keeps the Runtime it started with until it ends, so a reload never changes
the rules in the middle of a message. What lives across reloads (metrics, the audit log,
the users file, the machine's name) is ``proxy.smtp.listener.Services``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver

from proxy.config.settings import Settings
from proxy.relay.classify import Classifier
from proxy.relay.pipeline import Pipeline
from proxy.relay.upstream import MaildirUpstream, SmtpUpstream
from proxy.reputation.backoff import Backoff
from proxy.reputation.bounces import Bounces
from proxy.reputation.complaints import Complaints
from proxy.reputation.dkim import Signer
from proxy.stores.consent import ConsentStore
from proxy.stores.limits import LimitStore
from proxy.stores.pauses import PauseStore

__all__ = ("Runtime",)

log = logging.getLogger("sendguard.runtime")


@dataclass(eq=False)
class Runtime:
    """Everything built from one config. Resources may be shared with the previous generation
    (same upstream, same stores) and are closed only when no live generation uses them."""

    settings: Settings
    pipeline: Pipeline
    classifier: Classifier
    upstream: MaildirUpstream | SmtpUpstream
    pauses: PauseStore
    limits: LimitStore
    backoff: Backoff
    bounces: Bounces
    signer: Signer
    resolver: dns.asyncresolver.Resolver
    generation: int
    consent: ConsentStore | None = None  # opened only when a configured policy needs it
    complaints: Complaints | None = None  # feedback reports, read by the unsubscribe mailto listener
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        if self.in_flight:
            await self._idle.wait()

    def resources(self) -> list[Any]:
        """The closable resources, each with an ``async close()``."""
        return [r for r in (self.pipeline, self.upstream, self.pauses, self.limits, self.consent) if r is not None]
