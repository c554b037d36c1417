"""What a running sendguard is made of, per config generation and for its whole life.

``Runtime`` is everything derived from one config: the settings, the policy pipeline, the
classifier and the upstream. A reload builds a new Runtime and swaps it in atomically;
a transaction keeps the Runtime it started with until it ends, so a reload never changes
the rules in the middle of a message. ``Services`` lives across reloads: metrics, the
audit log, the users file, the machine's name.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver

from proxy.config.settings import ListenerConfig, Settings
from proxy.observability.logsetup import AuditLog
from proxy.observability.metrics import Metrics
from proxy.relay.classify import Classifier
from proxy.relay.pipeline import Pipeline
from proxy.relay.upstream import MaildirUpstream, SmtpUpstream
from proxy.reputation.backoff import Backoff
from proxy.reputation.bounces import Bounces
from proxy.reputation.dkim import Signer
from proxy.schema import address_in
from proxy.smtp.auth import AuthFailureTracker, UserStore
from proxy.stores.consent import ConsentStore
from proxy.stores.limits import LimitStore
from proxy.stores.pauses import PauseStore

__all__ = ("ListenerState", "Runtime", "Services", "build_server_tls_context")

log = logging.getLogger("sendguard.runtime")


@dataclass
class Services:
    metrics: Metrics
    audit: AuditLog
    users: UserStore
    hostname: str


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


def build_server_tls_context(config: ListenerConfig) -> ssl.SSLContext | None:
    if config.tls.mode == "none" or not config.tls.cert or not config.tls.key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


class ListenerState:
    """Shared by every session of one listener: its config, TLS context and counters."""

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.tls_context = build_server_tls_context(config)
        self.active = 0
        self.per_ip: Counter[str] = Counter()
        self.auth_failures = AuthFailureTracker(config.max_auth_failures)
        self.sessions: set[object] = set()

    @property
    def name(self) -> str:
        return self.config.name

    @staticmethod
    def check_tls(config: ListenerConfig) -> None:
        """Load the certificate and key into a throwaway context: raises (ssl.SSLError,
        OSError) on a bad pair, before anything is changed."""
        build_server_tls_context(config)

    def update(self, config: ListenerConfig) -> None:
        """Take a reloaded config. The certificate is reloaded into the same SSLContext,
        so a renewed certificate takes effect for new handshakes without a restart."""
        self.config = config
        self.auth_failures.limit = config.max_auth_failures
        if self.tls_context is not None and config.tls.cert and config.tls.key:
            self.tls_context.load_cert_chain(config.tls.cert, config.tls.key)

    def is_trusted(self, ip: str) -> bool:
        return address_in(ip, self.config.trusted_networks)
